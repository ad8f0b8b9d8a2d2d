"""``mix``: one autocorrelation Hessian from a query and a training one (TrackStar's step 3).

Reads two dense processor dirs (ours: ``hessians.safetensors``; bergson's:
``hessians.pth``), checks they were made with the same projection and modules, picks
λ with bergson's rule (``hessians/mix.py``) and writes ``λ·H_query + (1-λ)·H_train`` as a
processor dir in the same form our ``hessian --method autocorrelation`` writes, ``.pth``
files included, so both our ``--hessian_path`` and bergson's ``GradientProcessor.load``
read it. Like bergson's, the result keeps the query processor's settings and
normalizers. Unlike bergson's (which leaves ``hessians_eigen`` empty) it stores the
mixed matrices' eigendecomposition, as every dense Hessian dir of ours does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import as_config
from ..config.trackstar import MixConfig
from ..errors import BadInputError
from ..hessians.mix import LambdaChoice, choose_lambda, mix_hessians

log = logging.getLogger(__name__)

_PROJECTION_KEYS = (
    "projection_dim",
    "projection_type",
    "projection_target",
    "projection_scale",
    "include_bias",
    "projection_seed",
    "projection_version",
)


def recorded_method(path: Path) -> str | None:
    """The Hessian method a run dir's ``config.yaml`` records (ours or bergson's), if any."""
    from ..store.files import read_yaml

    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        return None
    doc = read_yaml(cfg_file) or {}
    for step in doc.get("steps") or []:
        for body in (step or {}).values():
            for key in ("hessian", "hessian_cfg"):  # ours, bergson's
                section = (body or {}).get(key) if isinstance(body, dict) else None
                if isinstance(section, dict) and section.get("method"):
                    return str(section["method"])
    return None


def load_dense(path: Path, what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(module -> H, processor state)`` of an autocorrelation Hessian dir, or a clear error."""
    from ..hessians.factored_io import is_factored_dir
    from ..store.processor import load_processor

    if not path.is_dir():
        raise BadInputError(f"{what} {path} is not a directory")
    method = recorded_method(path)
    if is_factored_dir(path) or (method is not None and method != "autocorrelation"):
        raise BadInputError(
            f"{what} {path} holds a {method or 'factored'} Hessian; mix needs autocorrelation ones"
        )
    state = load_processor(path)
    if not state.hessians:
        raise BadInputError(
            f"{what} {path} holds no Hessian (no hessians.safetensors or hessians.pth); "
            "fit one with `hessian --method autocorrelation`"
        )
    return state.hessians, state


def check_compatible(query: Any, train: Any, hq: dict, ht: dict, index_path: Path) -> None:
    """Same projection settings, same modules, same widths: else the sum means nothing."""
    if query.config is not None and train.config is not None:
        diffs = [
            f"{k}: query {getattr(query.config, k)!r} vs index {getattr(train.config, k)!r}"
            for k in _PROJECTION_KEYS
            if getattr(query.config, k) != getattr(train.config, k)
        ]
        if diffs:
            raise BadInputError(
                f"the index Hessian at {index_path} was made with other projection settings: "
                + "; ".join(diffs)
            )
    missing = [m for m in hq if m not in ht]
    if missing:
        raise BadInputError(
            f"the index Hessian at {index_path} has no module {missing[0]!r}; fit both on the "
            "same model and --modules"
        )
    bad = [m for m in hq if hq[m].shape != ht[m].shape]
    if bad:
        raise BadInputError(
            f"{bad[0]}: the query Hessian is {tuple(hq[bad[0]].shape)} but the index one "
            f"{tuple(ht[bad[0]].shape)}; fit both with the same --projection_dim"
        )


def rank_warning(choice: LambdaChoice) -> str | None:
    """Why the mix is meaningless for this query set, in one sentence (None if it is fine)."""
    if not choice.query_rank_deficient:
        return None
    return (
        f"the query Hessian has rank {choice.query_rank} < target_downweight_components "
        f"{choice.k}, so its {choice.k}-th eigenvalue is 0 and lambda = {choice.lam:.3f}: the "
        "mixed Hessian is (almost) the singular query Hessian alone and preconditioning is "
        "left to the damping; use more query rows, --target_downweight_components "
        f"<= {choice.query_rank}, or --mix_hessians false"
    )


def mix_dirs(cfg: MixConfig) -> tuple[Path, LambdaChoice]:
    """Mix and write; returns the committed output dir and the λ chosen."""
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir

    qpath, ipath = Path(cfg.query_path), Path(cfg.index_path)
    hq, query = load_dense(qpath, "--query_path")
    ht, train = load_dense(ipath, "--index_path")
    check_compatible(query, train, hq, ht, ipath)
    choice = choose_lambda(hq, ht, cfg.target_downweight_components)
    log.info(
        "mix: lambda = %.6f (%s; k=%d of %d, sigma_query=%.4g, sigma_index=%.4g)",
        choice.lam,
        choice.reason,
        choice.k,
        choice.total,
        choice.sigma_query,
        choice.sigma_train,
    )
    warning = rank_warning(choice)
    if warning:
        log.warning("mix: %s", warning)
    mixed = mix_hessians(hq, ht, choice.lam)
    eigen = {}
    for name, h in mixed.items():
        values, vectors = torch.linalg.eigh(h.to(torch.float64))
        eigen[name] = (values.to(h.dtype), vectors.to(h.dtype))
    run = RunDir(cfg.output_path, overwrite=cfg.overwrite)
    save_processor(
        run.part,
        query.config or ProcessorConfig(),
        normalizers=query.normalizers,
        hessians=mixed,
        hessians_eigen=eigen,
    )
    body = {
        "query_path": str(qpath),
        "index_path": str(ipath),
        "output_path": str(cfg.output_path),
        "target_downweight_components": cfg.target_downweight_components,
        # bergson's mix refuses inputs whose config.yaml names no autocorrelation hessian_cfg
        "hessian_cfg": {"method": "autocorrelation"},
    }
    run.write_config(body, command="mix")
    run.write_summary(
        {
            "command": "mix",
            "mixing_coefficient": choice.lam,
            "reason": choice.reason,
            "k": choice.k,
            "components": choice.total,
            "sigma_query": choice.sigma_query,
            "sigma_index": choice.sigma_train,
            "query_rank": choice.query_rank,
            "warning": warning,
        }
    )
    return Path(run.commit()), choice


def mix(cfg: MixConfig | dict | None = None, **overrides) -> Path:
    """``bergson_ray.mix(query_path=..., index_path=..., output_path=...)``; returns the dir."""
    cfg = as_config(MixConfig, cfg, **overrides)
    return mix_dirs(cfg)[0]
