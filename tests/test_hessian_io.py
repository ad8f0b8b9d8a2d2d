"""bergson's sharded factor layout: write with K files, read with any count."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.hessians.accumulator import Factors
from bergson_ray.hessians.factored import fit_kronecker
from bergson_ray.hessians.factored_io import (
    SUBDIRS,
    is_factored_dir,
    read_factored,
    shard_bounds_remainder_first,
    shard_slices,
    write_shard_file,
)
from bergson_ray.hessians.preconditioner import (
    DensePreconditioner,
    FactoredPreconditioner,
    load_preconditioner,
)
from bergson_ray.store.processor import save_hessians


def module_factors(o, i, seed):
    g = torch.Generator().manual_seed(seed)
    xa, xg = torch.randn(3 * i, i, generator=g), torch.randn(3 * o, o, generator=g)
    kf = fit_kronecker(Factors(xa.T @ xa, xg.T @ xg, 40), num_documents=8)
    kf.correction = kf.eigenvalues * 1.5
    return kf


MODULES = {"a.q": (7, 5), "a.o": (3, 9), "b.up": (1, 4), "b.down": (10, 2)}


def write_dir(root, num_files, owners):
    """Files 0..K-1 each gather their row block of every module from each 'actor'."""
    kfs = {n: module_factors(o, i, k) for k, (n, (o, i)) in enumerate(MODULES.items())}
    per_actor = [{n: kfs[n] for n in names} for names in owners]
    for r in range(num_files):
        write_shard_file(root, r, [shard_slices(part, r, num_files) for part in per_actor])
    return kfs


def test_shard_bounds_remainder_on_first():
    bounds = shard_bounds_remainder_first
    assert [bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [bounds(2, r, 4) for r in range(4)] == [(0, 2), (2, 2), (2, 2), (2, 2)]
    for dim in (1, 5, 17):
        for w in (1, 2, 3, 8):
            rows = [shard_bounds_remainder_first(dim, r, w) for r in range(w)]
            assert rows[0][0] == 0 and rows[-1][1] == dim
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


@pytest.mark.parametrize("num_files", [1, 2, 3, 5, 12])
def test_roundtrip_any_shard_count(tmp_path, num_files):
    owners = [["a.q", "b.down"], ["a.o"], ["b.up"]]
    kfs = write_dir(tmp_path, num_files, owners)
    assert is_factored_dir(tmp_path)
    got = read_factored(tmp_path, with_factors=True)
    assert set(got) == set(MODULES)
    for name, kf in kfs.items():
        for field in SUBDIRS:
            assert torch.equal(getattr(got[name], field), getattr(kf, field)), (name, field)
    # factor_eig_a is replicated in full in every file; row-sharded fields are split
    for r in range(num_files):
        fa = load_file(str(tmp_path / "factor_eig_a" / f"shard_{r}.safetensors"))
        assert all(torch.equal(fa[n], kfs[n].factor_eig_a) for n in MODULES)
        q = load_file(str(tmp_path / "eigen_activation_sharded" / f"shard_{r}.safetensors"))
        lo, hi = shard_bounds_remainder_first(MODULES["a.q"][1], r, num_files)
        assert torch.equal(q["a.q"], kfs["a.q"].q_a[lo:hi])


def test_reader_errors(tmp_path):
    write_dir(tmp_path, 2, [list(MODULES)])
    (tmp_path / "eigenvalue_sharded" / "shard_1.safetensors").rename(
        tmp_path / "eigenvalue_sharded" / "shard_7.safetensors"
    )
    with pytest.raises(StoreError, match="without gaps"):
        read_factored(tmp_path)
    with pytest.raises(StoreError, match="not a factored"):
        read_factored(tmp_path / "nothing")
    with pytest.raises(BadInputError, match="does not exist"):
        load_preconditioner(str(tmp_path / "nothing"))


def test_load_preconditioner_detects_kind(tmp_path):
    kfs = write_dir(tmp_path / "f", 3, [list(MODULES)])
    pre = load_preconditioner(str(tmp_path / "f"), ev_correction=True)
    assert isinstance(pre, FactoredPreconditioner)
    ref = FactoredPreconditioner(kfs, ev_correction=True)
    x = torch.randn(2, 7 * 5)
    assert torch.allclose(pre.apply_module("a.q", x), ref.apply_module("a.q", x), atol=1e-6)
    only = load_preconditioner(str(tmp_path / "f"), modules=["a.q", "not.there"])
    assert only.modules == ["a.q"]

    h = torch.randn(6, 6)
    save_hessians(tmp_path / "d", {"m": h @ h.T}, write_pth=True)
    dense = load_preconditioner(str(tmp_path / "d"))
    assert isinstance(dense, DensePreconditioner)
    (tmp_path / "d" / "hessians.safetensors").unlink()  # bergson's hessians.pth alone
    assert isinstance(load_preconditioner(str(tmp_path / "d")), DensePreconditioner)
    with pytest.raises(BadInputError, match="factored"):
        load_preconditioner(str(tmp_path / "d"), ev_correction=True)
