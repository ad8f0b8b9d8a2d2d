"""Ray's actor calling convention for plain objects in this process.

A pipeline written against actor handles (``cls.options(...).remote(...)``,
``handle.method.remote(...)``, ``method.options(num_returns=k)``, ``ray.get``,
``ray.wait``, ``ray.kill``) runs unchanged on one machine without Ray when it is
given :class:`LocalClass` wrappers and :class:`LocalRay` instead of Ray's. Calls run
at once, in the order they are made; arguments that are :class:`LocalRef` results of
earlier calls are passed as their values (Ray resolves top-level refs the same way);
an exception is kept in its ref and raised by :meth:`LocalRay.get`, as Ray raises a
task's error at ``ray.get``.

Used for one worker in the driver's process (``--executor``, ``pipelines/in_process.py``)
by ``pipelines/sharded_fit.py`` (a Hessian fit) and ``actors/job_pool.py`` (retrains,
MAGIC columns, LiSSA repeats, SOURCE passes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def lazy_actor_classes(module: str, **actors: tuple[type, dict]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that makes each named Ray actor class on first use.

    ``Reducer = ray.remote(...)(RunningSum)`` at module level imports Ray with the module;
    a run in the driver's process uses the plain class and must not pay Ray's import
    (~0.4 s). ``__getattr__ = lazy_actor_classes(__name__, Reducer=(RunningSum, options))``
    makes ``from .reducer import Reducer`` import Ray then, once.
    """

    def __getattr__(name: str) -> Any:
        if name not in actors:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        import ray

        cls, options = actors[name]
        actor = ray.remote(**options)(cls)
        setattr(sys.modules[module], name, actor)
        return actor

    return __getattr__


@dataclass(eq=False)
class LocalRef:
    """A finished call's value (or the exception it raised); hashed by identity, as refs are."""

    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _resolve(v: Any) -> Any:
    return v.result() if isinstance(v, LocalRef) else v


class LocalMethod:
    def __init__(self, bound, num_returns: int = 1):
        self.bound = bound
        self.num_returns = num_returns

    def options(self, num_returns: int = 1, **_ignored) -> LocalMethod:
        return LocalMethod(self.bound, num_returns)

    def remote(self, *args, **kwargs) -> LocalRef | list[LocalRef]:
        try:
            out = self.bound(*map(_resolve, args), **{k: _resolve(v) for k, v in kwargs.items()})
        except Exception as exc:  # noqa: BLE001 - raised again at LocalRay.get
            return (
                LocalRef(error=exc)
                if self.num_returns == 1
                else [LocalRef(error=exc)] * self.num_returns
            )
        if self.num_returns == 1:
            return LocalRef(out)
        return [LocalRef(v) for v in out]


class LocalActor:
    """A handle whose ``handle.method.remote(...)`` calls the object's method now."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> LocalMethod:
        return LocalMethod(getattr(self._obj, name))


class LocalClass:
    """``LocalClass(Cls).options(...).remote(*args)`` builds ``Cls(*args)`` here."""

    def __init__(self, cls: type):
        self.cls = cls

    def options(self, **_ignored) -> LocalClass:
        return self  # resources and restart policies mean nothing in one process

    def remote(self, *args, **kwargs) -> LocalActor:
        return LocalActor(
            self.cls(*map(_resolve, args), **{k: _resolve(v) for k, v in kwargs.items()})
        )


class _LocalExceptions:
    """``ray.exceptions`` for :class:`LocalRay`: an object in this process cannot die on
    its own as an actor can, so its "actor died" error is never raised; a pipeline can
    catch ``self.ray.exceptions.RayActorError`` without importing Ray."""

    class RayActorError(Exception):
        pass


class LocalRay:
    """The part of the ``ray`` module an actor pipeline calls."""

    exceptions = _LocalExceptions

    @staticmethod
    def get(refs, **_ignored):
        if isinstance(refs, list):
            return [_resolve(r) for r in refs]
        return _resolve(refs)

    @staticmethod
    def wait(refs, num_returns: int = 1, **_ignored):
        refs = list(refs)
        return refs[:num_returns], refs[num_returns:]  # every call has already finished

    @staticmethod
    def kill(handle, **_ignored) -> None:
        if isinstance(handle, LocalActor):
            handle._obj = None  # drop the object (a worker's model) as a dead actor would


def get(ref: Any) -> Any:
    """``ray.get`` for a ref of either kind (code that may hold a local or a Ray handle)."""
    refs = ref if isinstance(ref, list) else [ref]
    if all(isinstance(r, LocalRef) for r in refs):
        return LocalRay.get(ref)
    import ray

    return ray.get(ref)


def kill(handle: Any) -> None:
    """``ray.kill`` for a handle of either kind."""
    if isinstance(handle, LocalActor):
        LocalRay.kill(handle)
        return
    import ray

    ray.kill(handle)
