"""Python client of a running query service: ``bergson_ray.connect(...)``.

    client = bergson_ray.connect(address="auto", name="idx")
    hits = client.query(["def foo(): ..."], k=10)   # per query: ids, scores, texts
    hits = client.query_gradients(grads, k=10)

Works from any process that can join the cluster as a Ray driver (a script on a cluster
node, a Ray job, a notebook). Service errors come back as the original
:class:`~bergson_ray.errors.BadInputError` / :class:`~bergson_ray.errors.StoreError`,
never as Ray's wrappers. This is the one module of ``bergson_ray.query`` that uses Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import BadInputError, unwrap
from .results import QueryResult

log = logging.getLogger(__name__)


def user_error(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers.

    ``RayTaskError(BadInputError)`` is itself a subclass of ``BadInputError`` whose message
    is the remote traceback, so follow ``.cause`` first, then the usual cause chain.
    """
    cur, seen = exc, set()
    while id(cur) not in seen:
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)
        if not isinstance(cause, BaseException):
            break
        cur = cause
    return unwrap(cur)


class ServiceClient:
    """A handle on service ``name``; cheap to create, safe to share between threads."""

    def __init__(self, handle: Any, name: str, namespace: str, timeout: float | None):
        self.handle = handle
        self.name = name
        self.namespace = namespace
        self.timeout = timeout

    def _get(self, ref: Any) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=self.timeout)
        except Exception as exc:
            err = user_error(exc)
            if err is not exc:
                raise err from None
            raise

    def query(self, queries: Any, k: int = 10, *, reverse: bool = False) -> list[QueryResult]:
        """Top-k (bottom-k with ``reverse``) rows for texts or (prompt, completion) pairs."""
        if isinstance(queries, str):
            queries = [queries]
        return self._get(self.handle.query.remote(queries, k, reverse))

    def query_gradients(
        self, grads: Any, k: int = 10, *, reverse: bool = False
    ) -> list[QueryResult]:
        """Top-k rows for raw query gradients ``[Q, dim]`` made like the store's rows."""
        if hasattr(grads, "detach"):  # torch tensor
            grads = grads.detach().float().cpu().numpy()
        return self._get(self.handle.query_gradients.remote(np.asarray(grads), k, reverse))

    def gradients(self, queries: Any) -> np.ndarray:
        """The raw query gradients the service makes for ``queries``."""
        if isinstance(queries, str):
            queries = [queries]
        return self._get(self.handle.gradients.remote(queries))

    def info(self) -> dict:
        return self._get(self.handle.info.remote())

    def __repr__(self) -> str:
        return f"ServiceClient(name={self.name!r}, namespace={self.namespace!r})"


def connect(
    address: str | None = "auto",
    name: str = "bergson",
    *,
    namespace: str = "bergson_ray",
    timeout: float | None = 300.0,
) -> ServiceClient:
    """Join the cluster at ``address`` (unless this process already has) and find ``name``.

    ``timeout`` bounds each call in seconds (None waits forever).
    """
    import ray

    if not ray.is_initialized():
        from ..utils.ray_env import init_ray

        try:
            init_ray(address, namespace=namespace)
        except ConnectionError as err:
            raise BadInputError(
                f"no Ray cluster at {address!r} ({err}); start one with `bergson-ray serve`"
            ) from None
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        from ..config import is_shard_name

        running = sorted(
            e["name"]
            for e in ray.util.list_named_actors(all_namespaces=True)
            if e["namespace"] == namespace and not is_shard_name(e["name"])
        )
        raise BadInputError(
            f"no query service named {name!r} in namespace {namespace!r}"
            + (f"; running: {', '.join(running)}" if running else "; none is running")
        ) from None
    return ServiceClient(handle, name, namespace, timeout)
