"""Factored Hessians against the real bergson (anchor venv, driven by subprocess).

* bergson's ``hessian --method kfac --ev_correction`` and ours, empirical Fisher
  (dataset labels, so nothing is sampled), on the same model and documents,
  give the same factor sums, position count and eigenvalue grids;
* our reader applies bergson's Hessian dir exactly as bergson's own
  ``FactoredPreconditioner`` does, and bergson's preconditioner reads our
  3-file dir and agrees with ours.

bergson's run is cached under ``~/.cache/bergson-anchor/interop-runs``. Skipped
without the anchor (``bash scripts/bergson_anchor.sh``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import anchor
import pytest
import torch
from anchor import MODEL, RUNS, needs_anchor
from helpers import rel
from safetensors.torch import load_file, save_file

from bergson_ray.hessians.factored_io import read_factored
from bergson_ray.hessians.preconditioner import load_preconditioner

DATA = anchor.DATA / "pydoc"
SPLIT = "train[:16]"

pytestmark = [
    pytest.mark.slow,
    needs_anchor,
]

_APPLY = """
import sys, torch
from safetensors.torch import load_file, save_file
from bergson.config.config import InversionConfig
from bergson.hessians.preconditioner import FactoredPreconditioner
path, grads, out = sys.argv[1:4]
g = load_file(grads)
res = {}
for ev in (False, True):
    for power in (-1.0, -0.5):
        p = FactoredPreconditioner.from_path(path, inversion_cfg=InversionConfig(), power=power,
                                             ev_correction=ev)
        for k, v in p.apply(dict(g)).items():
            res[f"{k}|{ev}|{power}"] = v.contiguous()
save_file(res, out)
print("{}")
"""


@pytest.fixture(scope="module")
def bergson_run() -> Path:
    path = RUNS / "hessian_kfac_ev"
    if not (path / "eigenvalue_correction_sharded").exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        cmd = [
            "bergson", "hessian", str(path), "--method", "kfac", "--ev_correction", "true",
            "--use_dataset_labels", "true", "--model", str(MODEL), "--dataset", str(DATA),
            "--split", SPLIT, "--overwrite", "true",
        ]  # fmt: skip
        log = RUNS / "hessian_kfac_ev.log"
        proc = anchor.run(cmd, cwd=RUNS, log=log)
        if proc.returncode != 0:
            pytest.fail(f"bergson hessian failed:\n{log.read_text()[-3000:]}")
    return path


@pytest.fixture(scope="module")
def our_run(tmp_path_factory) -> Path:
    from bergson_ray.pipelines.hessian import hessian

    return hessian(
        run_path=str(tmp_path_factory.mktemp("interop") / "ours"),
        model=str(MODEL), dataset=str(DATA), split=SPLIT, method="kfac", ev_correction=True,
        use_dataset_labels=True, num_shards=3, window_size=8, executor="process",
    )  # fmt: skip


def test_same_factors_as_bergson(bergson_run, our_run):
    theirs = read_factored(bergson_run, with_factors=True)
    ours = read_factored(our_run, with_factors=True)
    assert list(theirs) == list(ours)
    n_theirs = int(torch.load(bergson_run / "total_processed.pt", weights_only=True))
    assert json.loads((our_run / "hessian_info.json").read_text())["total_processed"] == n_theirs
    for m in ours:
        for f in ("A", "S", "eigenvalues", "factor_eig_a", "factor_eig_g"):
            assert rel(getattr(ours[m], f), getattr(theirs[m], f)) < 1e-4, (m, f)
        # bergson's lambda pass skips the collection mask; with dataset labels the
        # masked (last) position has g = 0, so the corrections agree too
        assert rel(ours[m].correction, theirs[m].correction) < 1e-3, m


def _apply_both(path: Path, tmp_path: Path):
    facs = read_factored(path)
    g = torch.Generator().manual_seed(0)
    grads = {m: torch.randn(2, kf.shape[0] * kf.shape[1], generator=g) for m, kf in facs.items()}
    save_file(grads, str(tmp_path / "g.safetensors"))
    proc = anchor.run(
        ["python", "-c", textwrap.dedent(_APPLY), str(path), str(tmp_path / "g.safetensors"),
         str(tmp_path / "out.safetensors")],
        timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"bergson apply failed:\n{proc.stderr[-3000:]}")
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for ev in (False, True):
        pre = load_preconditioner(str(path), ev_correction=ev)
        for power in (-1.0, -0.5):
            out = pre.apply_inverse(grads, power)
            for m in grads:
                assert rel(out[m], theirs[f"{m}|{ev}|{power}"]) < 1e-4, (m, ev, power)


def test_our_reader_applies_bergson_dir_like_bergson(bergson_run, tmp_path):
    _apply_both(bergson_run, tmp_path)


def test_bergson_reads_our_sharded_dir(our_run, tmp_path):
    assert len(list((our_run / "eigen_gradient_sharded").iterdir())) == 3
    _apply_both(our_run, tmp_path)
