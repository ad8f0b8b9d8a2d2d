"""Configuration of the query side: how an index is built and searched, how a service runs.

Field names follow bergson's ``FaissConfig`` / ``QueryConfig`` (spec §1.3) where the two
overlap, so a bergson command line translates flag for flag. Everything that decides the
*contents* of a saved index (factory, cosine, preconditioner, sharding, training sample)
is listed in :data:`BUILD_FIELDS`; a saved index built with other values is never reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]

BUILD_FIELDS = (
    "index_factory",
    "unit_norm",
    "hessian_path",
    "damping_factor",
    "inversion",
    "max_train_examples",
)
"""FaissConfig fields that change what a saved index holds (see ``index_store.py``).
``num_shards`` is not one: shard files are named by their row range, so layouts with
different shard counts live side by side in one directory."""


@dataclass
class FaissConfig:
    """How gradient rows become a FAISS index and how it is searched."""

    index_factory: str = "Flat"
    """FAISS factory string: ``Flat``, ``IVF1024,Flat``, ``IVF256,SQfp16``, ``PQ32``, ``HNSW32``...
    Every index uses the inner-product metric (cosine = inner product of unit rows)."""
    unit_norm: bool = False
    """Cosine search: rows and queries are unit-normalized (after preconditioning)."""
    hessian_path: str | None = None
    """Dir holding a dense ``hessians.safetensors`` (module -> ``[d, d]``). With ``unit_norm``
    both sides get ``H^-1/2`` (then normalization); without, the query alone gets ``H^-1``."""
    damping_factor: float = 0.1
    """c in the damped inverse ``1 / (lambda + c * mean(lambda))`` (spec §3.8)."""
    inversion: str = "damped_inverse"
    """Eigenvalue multiplier: damped_inverse, tikhonov_filtered or pseudoinverse."""
    num_shards: int = 1
    """Row partitions; each is built, saved and searched separately (bounds peak memory,
    and in a service each shard lives in its own actor)."""
    nprobe: int = 10
    """IVF lists probed per query (search time only; never forces a rebuild)."""
    mmap_index: bool = False
    """Memory-map saved shards instead of reading them into RAM (CPU only)."""
    max_train_examples: int | None = None
    """Rows sampled (evenly strided over the shard) to train IVF/PQ/SQ indexes.
    None = ``min(shard rows, max(20_000, 64 * nlist))``."""
    batch_size: int = 4096
    """Rows read, preconditioned and normalized at a time while building (bounds memory)."""
    device: Device = "auto"
    """``auto`` = GPU when this process sees one and FAISS has GPU support, else CPU."""
    save: bool = True
    """Save built shards next to the store and reuse them on the next start."""
    threads: int = 1
    """OpenMP threads FAISS uses for search (1 is fastest on small shared CPUs)."""


@dataclass
class ServeConfig:
    """``bergson-ray serve``: which store, under which name, on which cluster."""

    store: str = ""
    name: str = "bergson"
    """Name of the service's query actor; shards are ``<name>::shard-<i>``."""
    namespace: str = "bergson_ray"
    """Ray namespace of the service's named actors."""
    address: str | None = None
    """Ray cluster to attach to; None = ``RAY_ADDRESS``, else a running local cluster
    (``auto``), else start one."""
    faiss: FaissConfig = field(default_factory=FaissConfig)
    model: str = ""
    """Override the model recorded in the store's ``config.yaml`` (e.g. another checkpoint)."""
    text_field: str = "text"
    """Column of the store's dataset returned with each hit."""
    cpus_per_shard: float = 0.1
    """Logical CPUs each index-shard actor reserves: a shard idles between queries and a
    search takes milliseconds, so a small share keeps a 2-core node from starving."""
    cpus_for_model: float = 0.25
    """Logical CPUs the query actor (model + query gradients) reserves."""
    gpus_per_index: float = 0.0
    """GPUs per index shard actor (> 0 puts a GPU FAISS index on a GPU node)."""
    gpus_for_model: float = 0.0
    """GPUs for the query actor's model."""
    max_restarts: int = 5
    """How often Ray restarts a crashed actor (it reloads the saved index)."""
    max_batch_size: int = 32
    """Most queries the query actor runs through the model in one pass."""
    batch_wait_ms: float = 5.0
    """How long the query actor waits to fill a batch once a query is queued."""
    load_model: bool = True
    """False serves ``query_gradients`` only (no model in memory)."""
    http: bool = False
    """Also start an HTTP endpoint (Ray Serve, needs the ``serve`` extra)."""
    http_host: str = "127.0.0.1"
    """Address the HTTP endpoint binds to (keep it on loopback or a private network)."""
    http_port: int = 8000
    """Port of the HTTP endpoint."""
    http_token: str = ""
    """Bearer token clients must send; empty = read ``BERGSON_RAY_HTTP_TOKEN`` or generate one."""
    ready_timeout_s: float = 600.0
    """How long ``serve`` waits for the actors to load (or build) their index."""


SHARD_SEP = "::shard-"


def shard_actor_name(service: str, i: int) -> str:
    """Ray actor name of index shard ``i`` of service ``service``."""
    return f"{service}{SHARD_SEP}{i}"


def is_shard_name(actor_name: str) -> bool:
    return SHARD_SEP in actor_name
