"""Small gradient stores for tests and benchmarks, written without Ray.

``tiny_store`` runs the build's own :class:`~bergson_ray.runners.gradient_runner.GradientRunner`
in this process over the first documents of the embedded tiny corpus and writes a real
store (``gradients.bin``, ``info.json``, ``data.hf`` with text, processor files and a
replayable ``config.yaml``), so query-side tests exercise exactly what ``build`` makes
in seconds instead of a Ray pipeline's minutes. ``random_store`` writes random rows for
latency benchmarks. Both reuse an existing store at the same path.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ..config import BuildConfig, DataConfig, GradientConfig, PreprocessConfig, RunConfig

log = logging.getLogger(__name__)


def tiny_store(
    path: str | Path,
    *,
    n_docs: int = 64,
    projection_dim: int = 16,
    preprocess: PreprocessConfig | None = None,
) -> Path:
    """A store of the first ``n_docs`` tiny-corpus documents (text kept in ``data.hf``)."""
    import datasets

    from ..defaults.tiny import ensure_tiny_assets
    from ..runners.gradient_runner import GradientRunner, RunnerSpec
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir

    path = Path(path)
    if (path / "info.json").exists():
        return path
    assets = ensure_tiny_assets()
    subset_dir = path.with_name(path.name + "-corpus")
    if not subset_dir.exists():
        corpus = datasets.load_from_disk(str(assets.corpus_dir))
        corpus.select(range(n_docs)).save_to_disk(str(subset_dir))
    cfg = BuildConfig(
        run=RunConfig(run_path=str(path)),
        data=DataConfig(dataset=str(subset_dir)),
        grad=GradientConfig(projection_dim=projection_dim),
        preprocess=preprocess or PreprocessConfig(),
        drop_columns=False,
    )
    spec = RunnerSpec(
        model=cfg.model, grad=cfg.grad, data=cfg.data, batch=cfg.batch, preprocess=cfg.preprocess
    )
    runner = GradientRunner(spec)
    out = runner.gradients(np.arange(n_docs))
    run = RunDir(path, overwrite=True)  # no finished store here: only stale leftovers
    part = Path(run.part)
    with GradientStoreWriter(
        part, num_items=n_docs, grad_sizes=runner.engine.grad_sizes, dtype="float32"
    ) as w:
        w.write_rows(out["idx"], out["grads"])
    run.write_config(cfg)
    ds = datasets.load_from_disk(str(subset_dir))
    ds = ds.add_column("length", out["length"].tolist()).add_column("loss", out["loss"].tolist())
    ds.save_to_disk(str(part / "data.hf"))
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    run.commit()
    return path


def random_store(
    path: str | Path, *, num_rows: int, dim: int = 256, seed: int = 0, clusters: int = 1024
) -> Path:
    """``num_rows`` clustered random float32 rows (one module ``gradients``), no model.

    Written in chunks, so a 1M x 256 store (1 GiB) never sits in memory at once. Rows
    are near ``clusters`` random centres: gradient-like, and IVF-friendly unlike pure
    Gaussians (ray-on-2-cores.md §7).
    """
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor

    path = Path(path)
    if (path / "info.json").exists():
        return path
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    part = path.with_name(path.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    with GradientStoreWriter(
        part, num_items=num_rows, grad_sizes={"gradients": dim}, dtype="float32"
    ) as w:
        step = 65536
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            lab = rng.integers(0, clusters, size=hi - lo)
            rows = centres[lab] + 0.5 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
            w.write_rows(np.arange(lo, hi), rows)
    # processor files (no projection) so bergson's Attributor opens the store too
    save_processor(part, ProcessorConfig())
    part.rename(path)
    return path

