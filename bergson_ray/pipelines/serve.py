"""``serve`` / ``status`` / ``stop``: the query service's lifecycle on a Ray cluster.

A service named N is a set of *detached* named actors in namespace ``bergson_ray``:

* ``N::shard-0 .. N::shard-{K-1}`` — :class:`~bergson_ray.actors.index_actor.IndexShardActor`,
  one FAISS shard each (rows partitioned), loaded from the index saved next to the store
  or built and saved on first start;
* ``N`` — :class:`~bergson_ray.actors.query_actor.QueryActor`, the entry point clients
  call (model, query gradients, fan-out and merge);
* optionally the Ray Serve app ``bergson_ray-N`` (HTTP, bearer token).

Detached actors outlive the process that started them: ``serve`` returns once they are
ready, and only ``stop`` (or the cluster going down) ends them. Ray restarts a crashed
actor up to ``max_restarts`` times; shards reload their saved index, so nothing is lost.

The store path must be readable at the same path by this process (which checks it and
prepares the index directory) and by the nodes the actors land on (a shared filesystem
on a multi-node cluster).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

from ..config import ServeConfig, as_config, is_shard_name, shard_actor_name
from ..errors import BadInputError, StoreError
from ..query.client import user_error
from ..utils.net import free_port
from ..utils.ray_env import loopback_env

log = logging.getLogger(__name__)

TOKEN_ENV = "BERGSON_RAY_HTTP_TOKEN"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def start_local_head() -> str:
    """Start a persistent single-node Ray head on loopback (``ray start --head``).

    Needed when no cluster is running: a ``ray.init()`` cluster would die with this
    process, and the service's detached actors with it.
    """
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_bin):
        ray_bin = shutil.which("ray") or "ray"
    port = free_port()
    env = loopback_env()  # loopback only; see README before exposing
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false"]
    log.info("no Ray cluster found; starting one: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{proc.stdout}\n{proc.stderr}")
    address = f"127.0.0.1:{port}"
    log.warning("started a local Ray head at %s (stop it with `ray stop` when done)", address)
    return address


def connect_cluster(address: str | None, namespace: str, *, start_if_missing: bool) -> None:
    """Attach this process to a running cluster (``address``, ``RAY_ADDRESS`` or ``auto``)."""
    import ray

    from ..utils.ray_env import init_ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        init_ray(address, namespace=namespace)
    except ConnectionError as err:
        if address != "auto" or not start_if_missing:
            raise BadInputError(f"cannot connect to a Ray cluster at {address!r}: {err}") from None
        init_ray(start_local_head(), namespace=namespace)


def _get_actor(name: str, namespace: str):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _kill(name: str, namespace: str) -> bool:
    import ray

    handle = _get_actor(name, namespace)
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    return True


def validate(cfg: ServeConfig):
    """Check the request before anything starts; returns the opened store spec."""
    from ..query.faiss_index import make_index, shard_bounds_remainder_last
    from ..query.store_spec import open_store_spec

    if not cfg.store:
        raise BadInputError("serve needs a gradient store path")
    if not NAME_RE.match(cfg.name) or is_shard_name(cfg.name):
        raise BadInputError(
            f"service name {cfg.name!r} must be 1-64 letters, digits, '_', '.' or '-'"
        )
    spec = open_store_spec(cfg.store)
    shard_bounds_remainder_last(spec.num_rows, cfg.faiss.num_shards)
    make_index(spec.dim, cfg.faiss.index_factory)  # a bad factory string fails here
    if cfg.load_model and spec.build is None:
        raise StoreError(
            f"{spec.path} has no build config.yaml, so text queries are impossible; "
            "serve it with --load_model false and use query_gradients"
        )
    return spec


def serve(cfg: ServeConfig | None = None, **overrides: Any) -> dict:
    """Start service ``cfg.name`` for store ``cfg.store``; returns its ``info()``.

    ``overrides`` are ServeConfig or FaissConfig field names
    (``serve(store="runs/idx", name="idx", num_shards=3, index_factory="IVF256,Flat")``).
    """
    import ray

    from ..actors.index_actor import IndexShardActor
    from ..actors.query_actor import QueryActor
    from ..query.index_store import IndexDir

    cfg = as_config(ServeConfig, cfg, **overrides)
    cfg = dataclasses.replace(cfg, store=os.path.abspath(os.path.expanduser(cfg.store)))
    spec = validate(cfg)
    if cfg.http:
        require_serve()
    connect_cluster(cfg.address, cfg.namespace, start_if_missing=True)
    if _get_actor(cfg.name, cfg.namespace) is not None:
        raise BadInputError(
            f"a service named {cfg.name!r} is already running; `bergson-ray stop --name "
            f"{cfg.name}` first, or pick another --name"
        )
    for i in range(cfg.faiss.num_shards + 64):  # leftovers of a half-stopped service
        if not _kill(shard_actor_name(cfg.name, i), cfg.namespace) and i >= cfg.faiss.num_shards:
            break
    if cfg.faiss.save:
        IndexDir(
            spec.path, cfg.faiss, num_rows=spec.num_rows, dim=spec.dim, grad_sizes=spec.grad_sizes
        ).prepare()

    common = dict(lifetime="detached", namespace=cfg.namespace, max_restarts=cfg.max_restarts)
    t0 = time.perf_counter()
    shards = [
        IndexShardActor.options(
            name=shard_actor_name(cfg.name, i),
            num_cpus=cfg.cpus_per_shard,
            num_gpus=cfg.gpus_per_index,
            max_task_retries=2,  # search is idempotent: retry across a restart
            **common,
        ).remote(str(spec.path), cfg.faiss, i)
        for i in range(cfg.faiss.num_shards)
    ]
    front = QueryActor.options(
        name=cfg.name,
        num_cpus=cfg.cpus_for_model,
        num_gpus=cfg.gpus_for_model,
        max_task_retries=1,
        **common,
    ).remote(cfg)
    try:
        ray.get([s.ping.remote() for s in shards], timeout=cfg.ready_timeout_s)
        ray.get(front.ping.remote(), timeout=cfg.ready_timeout_s)
    except BaseException as exc:
        for h in [front, *shards]:
            ray.kill(h, no_restart=True)
        err = user_error(exc)
        if err is not exc:
            raise err from None
        raise
    log.info("service %r ready in %.1fs", cfg.name, time.perf_counter() - t0)
    try:
        info = ray.get(front.info.remote(), timeout=60)
        if cfg.http:
            info["http"] = start_http(cfg)
    except BaseException:  # a failed serve leaves nothing running behind it
        for h in [front, *shards]:
            ray.kill(h, no_restart=True)
        raise
    return info


def require_serve() -> None:
    """``--http`` needs Ray Serve: say so before anything starts."""
    import importlib.util

    if importlib.util.find_spec("ray.serve") is None or importlib.util.find_spec("fastapi") is None:
        raise BadInputError("--http needs Ray Serve: pip install 'bergson_ray[serve]'")


def start_http(cfg: ServeConfig) -> dict:
    """Put the HTTP gateway in front of the query actor (Ray Serve); returns url + token."""
    try:
        from ray import serve as rserve

        from ..actors.http_gateway import HttpGateway, token_digest
    except ImportError as err:
        raise BadInputError(
            f"--http needs Ray Serve: pip install 'bergson_ray[serve]' ({err})"
        ) from None
    token = cfg.http_token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    rserve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    rserve.run(
        HttpGateway.bind(cfg.name, cfg.namespace, token_digest(token)),
        name=http_app_name(cfg.name),
        route_prefix=f"/{cfg.name}",
        blocking=False,
    )
    url = f"http://{cfg.http_host}:{cfg.http_port}/{cfg.name}"
    generated = not (cfg.http_token or os.environ.get(TOKEN_ENV))
    return {"url": url, "token": token if generated else "<as given>"}


def http_app_name(name: str) -> str:
    return f"bergson_ray-{name}"


def list_services(namespace: str | None = "bergson_ray") -> list[dict]:
    """``info()`` of every running service (in ``namespace``, or all namespaces)."""
    import ray

    entries = ray.util.list_named_actors(all_namespaces=True)
    out = []
    for e in entries:
        if namespace is not None and e["namespace"] != namespace:
            continue
        if is_shard_name(e["name"]):
            continue
        handle = _get_actor(e["name"], e["namespace"])
        if handle is None or not hasattr(handle, "info"):
            continue
        try:
            info = ray.get(handle.info.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - show a sick service, don't crash status
            info = {
                "name": e["name"],
                "namespace": e["namespace"],
                "error": str(user_error(exc))[:200],
            }
        if isinstance(info, dict) and ("store" in info or "error" in info):
            out.append(info)
    return out


def stop(name: str, namespace: str = "bergson_ray") -> list[str]:
    """Kill service ``name``'s actors (and its HTTP app); returns what was stopped."""
    import ray

    front = _get_actor(name, namespace)
    if front is None:
        running = [s.get("name") for s in list_services(namespace)]
        raise BadInputError(
            f"no service named {name!r} in namespace {namespace!r}"
            + (f" (running: {', '.join(running)})" if running else " (none is running)")
        )
    num_shards = 0
    http = False
    try:
        cfg = ray.get(front.config.remote(), timeout=10)
        num_shards, http = cfg.faiss.num_shards, cfg.http
    except Exception:  # noqa: BLE001 - a broken front still gets its shards stopped
        pass
    stopped = []
    if http:
        try:
            from ray import serve as rserve

            rserve.delete(http_app_name(name))
            stopped.append(http_app_name(name))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete the HTTP app: %s", exc)
    ray.kill(front, no_restart=True)
    stopped.append(name)
    i = 0
    while True:  # every shard, including leftovers beyond the configured count
        killed = _kill(shard_actor_name(name, i), namespace)
        if killed:
            stopped.append(shard_actor_name(name, i))
        elif i >= num_shards:
            break
        i += 1
    return stopped
