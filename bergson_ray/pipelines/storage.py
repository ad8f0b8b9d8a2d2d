"""Where a run's output lives on a cluster, and proof that every node can reach it.

On one machine every path works. On a multi-node cluster the driver writes the store
while workers (and later the query service's actors) run on other nodes, so:

* **POSIX run paths** must be on a file system mounted at the same path on every node
  (NFS, EFS, Filestore, Lustre ...). :func:`check_cluster_visibility` proves it before
  any GPU time is spent: the driver writes a random token into ``<run>.part`` and a
  zero-CPU task on every alive node must read the same token back (and see the
  dataset / model if they are local paths). Workers repeat the check when they start,
  which covers nodes an autoscaler adds later. Any miss is a :class:`BadInputError`
  naming the node and the path.
* **Object-store URIs** (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://`` --
  anything ``pyarrow.fs.FileSystem.from_uri`` opens) cannot be memory-mapped, so the
  run is written to a local staging directory on the driver's node and the finished
  store is uploaded with ``pyarrow.fs`` (:func:`remote_output`); ``summary.json`` is
  uploaded last and marks a complete upload. Query stores given as URIs are downloaded
  once into a local cache (:func:`localize_store`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, RunExistsError

log = logging.getLogger(__name__)

PROBE_FILE = ".bergson_ray_visibility"
STAGING_ENV = "BERGSON_RAY_STAGING"
"""Local directory for staging object-store runs (default ``~/.cache/bergson_ray/staging``)."""
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SUMMARY = "summary.json"


# ----------------------------------------------------------------------------- URIs
def is_uri(path: str | os.PathLike | None) -> bool:
    return bool(path) and bool(URI_RE.match(os.fspath(path)))


def _filesystem(uri: str):
    """``(pyarrow FileSystem, path inside it)``, or a clear error."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types here
        raise BadInputError(
            f"cannot open {uri!r} with pyarrow: {err}. Supported run paths are a POSIX "
            "path on storage every node mounts, or a URI pyarrow can write (s3://, gs://, "
            "abfs://, hdfs://) with credentials on the driver's node"
        ) from err


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def staging_dir(uri: str) -> Path:
    """Deterministic local directory for ``uri`` (so ``--resume`` finds it again)."""
    base = Path(os.path.expanduser(os.environ.get(STAGING_ENV) or "~/.cache/bergson_ray/staging"))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1]) or "run"
    digest = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:12]
    return base / f"{name}-{digest}" / name


def check_remote_target(uri: str, *, overwrite: bool, resume: bool) -> None:
    """Fail before any work if the URI exists (without --overwrite) or is not writable."""
    fs, path = _filesystem(uri)
    if _exists(fs, path + "/" + SUMMARY) and not overwrite:
        if resume:
            raise RunExistsError(f"{uri} is already complete; use --overwrite to compute it again")
        raise RunExistsError(f"{uri} already exists; pass --overwrite to replace it")
    probe = f"{path}.probe-{secrets.token_hex(4)}"
    try:
        if "/" in path:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # no-op on object stores
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as err:  # noqa: BLE001
        raise BadInputError(f"cannot write to {uri!r}: {err}") from err


def upload_run(local: Path, uri: str, *, overwrite: bool) -> None:
    """Copy a finished run directory to ``uri``; ``summary.json`` goes last."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    if _exists(fs, path):
        if not overwrite and _exists(fs, path + "/" + SUMMARY):
            raise RunExistsError(f"{uri} appeared while this run was writing; pass --overwrite")
        log.info("replacing %s", uri)
        fs.delete_dir(path)
    local_fs = pafs.LocalFileSystem()
    files = sorted(
        (Path(root) / f).relative_to(local)
        for root, _dirs, names in os.walk(local)
        for f in names
        if f != PROBE_FILE
    )
    files.sort(key=lambda rel: str(rel) == SUMMARY)  # summary.json last: marks completion
    made: set[str] = set()
    for rel in files:
        dest = f"{path}/{rel.as_posix()}"
        parent = dest.rsplit("/", 1)[0]
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(
            str(local / rel), dest, source_filesystem=local_fs, destination_filesystem=fs
        )
    log.info("uploaded %s -> %s", local, uri)


def localize_store(path: str) -> str:
    """A local copy of a store given as a URI (cached by URI); local paths pass through."""
    if not is_uri(path):
        return path
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
    if not _exists(fs, inner + "/" + SUMMARY) and not _exists(fs, inner + "/info.json"):
        raise BadInputError(f"{path} is not a finished store (no summary.json or info.json)")
    local = staging_dir(path).parent / "download"
    if not (local / "info.json").exists():
        tmp = local.with_name("download.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pafs.copy_files(
            inner, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    return str(local)


def remote_output(config_cls: type):
    """Decorator for a pipeline ``fn(cfg, *, faults=None, **overrides) -> Path``.

    Local run paths go straight through. For a URI the pipeline runs with a local
    staging ``run_path``, the finished directory is uploaded to the URI, the staging
    copy is removed, and the URI string is returned. ``--resume`` reuses the staging
    ``.part`` on the same driver node (point ``BERGSON_RAY_STAGING`` at shared storage
    to resume from another node).
    """

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg=None, *, faults=None, **overrides):
            from ..config import as_config

            cfg = as_config(config_cls, cfg, **overrides)
            check_run_path(cfg.run.run_path)
            uri = cfg.run.run_path
            if not is_uri(uri):
                return fn(cfg, faults=faults)
            check_remote_target(uri, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
            local = staging_dir(uri)
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.exists():  # an earlier upload that did not finish
                shutil.rmtree(local)
            log.info("%s is an object-store URI: staging the run in %s", uri, local)
            staged = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_path=str(local)))
            done = Path(fn(staged, faults=faults))
            upload_run(done, uri, overwrite=cfg.run.overwrite)
            shutil.rmtree(done.parent, ignore_errors=True)
            return uri

        return inner

    return wrap


# ----------------------------------------------------------------------------- jobs
def check_run_path(path: str) -> None:
    """A relative path inside a Ray job lands in the job's temporary working dir."""
    if not path or is_uri(path) or os.path.isabs(os.path.expanduser(path)):
        return
    cwd = os.getcwd()
    if "runtime_resources" in cwd.split(os.sep):  # Ray's unpacked --working-dir
        raise BadInputError(
            f"run path {path!r} is relative, and this Ray job runs in a temporary copy of "
            f"its working dir ({cwd}) that Ray deletes: pass an absolute path on storage "
            "every node mounts (e.g. /mnt/shared/runs/...) or an s3:// / gs:// URI"
        )


# ----------------------------------------------------------------------------- visibility
@dataclass
class Probe:
    """What a node must see: the run dir (holding ``token``) and local input paths."""

    run_dir: str
    token: str
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """``{"dataset": path, "model": path}`` -- only inputs that are local paths."""

    def verify(self, blind: bool = False) -> None:
        """Raise :class:`BadInputError` if this node cannot see the probe (worker side).

        ``blind`` (tests only: ``FaultPlan.unshared_nodes``) makes this node see none of
        the driver's paths, as a node without the shared file system would.
        """
        problems = probe_problems(self, blind)
        if problems:
            import socket

            raise BadInputError(unshared_message(socket.gethostname(), problems))


def _local_input(name: str) -> str | None:
    from ..config import TINY

    if not name or name == TINY or is_uri(name):
        return None
    p = os.path.expanduser(name)
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(p):
        return os.path.abspath(p)
    return None  # a Hub id: every node downloads it itself


def make_probe(run_dir: str | os.PathLike, data_cfg=None, model_cfg=None) -> Probe:
    """Write a fresh token into ``run_dir`` and describe what nodes must see."""
    token = secrets.token_hex(16)
    run_dir = os.path.abspath(os.fspath(run_dir))
    Path(run_dir, PROBE_FILE).write_text(token)
    inputs = {}
    for key, name in (
        ("dataset", getattr(data_cfg, "dataset", "")),
        ("model", getattr(model_cfg, "model", "")),
        ("tokenizer", getattr(model_cfg, "tokenizer", "")),
    ):
        path = _local_input(name or "")
        if path:
            inputs[key] = path
    return Probe(run_dir, token, inputs)


def probe_problems(probe: Probe, blind: bool = False) -> list[str]:
    """What this process cannot see (empty = all good); ``blind``: see :meth:`Probe.verify`."""
    problems = []
    tok = Path(probe.run_dir, PROBE_FILE)
    try:
        seen = None if blind else tok.read_text()
    except OSError:
        seen = None
    if seen != probe.token:
        problems.append(
            f"run path {probe.run_dir} is not the driver's"
            + (" (missing)" if seen is None else " (another directory with that name)")
        )
    for key, path in probe.inputs.items():
        if blind or not os.path.exists(path):
            problems.append(f"{key} path {path} does not exist")
    return problems


def unshared_message(node: str, problems: list[str]) -> str:
    return (
        f"node {node} cannot see what the driver wrote/reads: {'; '.join(problems)}. On a "
        "multi-node cluster the run path, and any local dataset or model path, must be on a "
        "file system mounted at the same path on every node (NFS, EFS, Filestore ...), or "
        "the run path must be an s3:// / gs:// URI"
    )


def check_cluster_visibility(probe: Probe, timeout_s: float = 300.0, faults=None) -> int:
    """Run the probe on every alive node of the connected cluster; returns the node count.

    Single-node clusters are skipped (the driver is on the only node). A node that is
    alive but cannot run a zero-CPU task within ``timeout_s`` is reported as an error.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)

    @ray.remote(num_cpus=0, max_retries=0)
    def _check(p: Probe, faults) -> list[str]:
        node = ray.get_runtime_context().get_node_id()
        return probe_problems(p, blind=faults is not None and faults.hides_storage(node))

    refs = {
        f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(probe, faults)
        for n in nodes
    }
    bad = []
    for node, ref in refs.items():
        try:
            problems = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            problems = [f"no answer within {timeout_s:.0f}s"]
        except ray.exceptions.RayError as err:
            if "node" in str(err).lower() and "dead" in str(err).lower():
                continue  # the node left meanwhile; its workers will not run there
            problems = [f"check failed: {err}"]
        if problems:
            bad.append(unshared_message(node, problems))
    if bad:
        raise BadInputError(" | ".join(bad))
    log.info("storage check: all %d nodes see %s", len(nodes), probe.run_dir)
    return len(nodes)


def cluster_probe(run_dir, data_cfg=None, model_cfg=None, faults=None) -> Probe:
    """Driver side, once Ray is up: write the probe and check every node sees it.

    ``faults`` (tests only) is a :class:`~bergson_ray.testing.faults.FaultPlan`.
    """
    probe = make_probe(run_dir, data_cfg, model_cfg)
    check_cluster_visibility(probe, faults=faults)
    return probe
