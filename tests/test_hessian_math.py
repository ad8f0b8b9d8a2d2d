"""Inversions and preconditioner application against explicit dense matrices.

Pure torch, no model: small random PSD matrices and Kronecker-factored Hessians
whose explicit ``[O·I', O·I']`` matrix is cheap to form.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel

from bergson_ray.errors import BadInputError
from bergson_ray.hessians.accumulator import Factors
from bergson_ray.hessians.autocorrelation import GramAccumulator
from bergson_ray.hessians.factored import fit_kronecker, recompose
from bergson_ray.hessians.inversion import INVERSIONS, eigen_multiplier
from bergson_ray.hessians.kfac import KFACAccumulator
from bergson_ray.hessians.methods import make_factor_accumulator
from bergson_ray.hessians.preconditioner import DensePreconditioner, FactoredPreconditioner

DENSE_INVERSIONS = [i for i in INVERSIONS if i != "factored_tikhonov"]


def random_psd(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 2 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def matrix_function(h, inversion, c, power):
    """Explicit reference: f(H) from the definitions, via eigh of the explicit matrix."""
    lam, q = torch.linalg.eigh(h.double())
    lam = lam.clamp_min(0)
    mu = lam.mean()
    if inversion == "damped_inverse":
        m = 1 / (lam + c * mu)
    elif inversion == "tikhonov_filtered":
        m = lam / (lam**2 + (c * mu) ** 2)
    elif inversion == "pseudoinverse":
        m = torch.where(lam > c * mu, 1 / lam, torch.zeros_like(lam))
    if power == -0.5:
        m = m.clamp_min(0).sqrt()
    return (q * m) @ q.T


def random_kronecker(o=4, i=3, seed=0, correction=False):
    """A fitted module from random factors (and, optionally, a random corrected grid)."""
    g = torch.Generator().manual_seed(seed)
    A, S = random_psd(i, seed=seed) * 7, random_psd(o, seed=seed + 1) * 3
    kf = fit_kronecker(Factors(A, S, 50), num_documents=10, dtype=torch.float64)
    if correction:
        kf.correction = kf.eigenvalues * torch.rand(o, i, generator=g, dtype=torch.float64) * 2
    return kf


# ------------------------------------------------------------------ dense inversions


@pytest.mark.parametrize("inversion", DENSE_INVERSIONS)
@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_dense_matches_explicit_matrix_function(inversion, power):
    h = random_psd(6, rank=4)  # rank deficient: zero eigenvalues exercise every branch
    pre = DensePreconditioner({"m": h}, inversion=inversion, damping_factor=0.1)
    x = torch.randn(5, 6, dtype=torch.float64)
    got = pre.apply_inverse({"m": x.float()}, power)["m"]
    assert rel(got, x @ matrix_function(h, inversion, 0.1, power)) < 1e-5


def test_zero_damping_is_true_inverse_and_pinv():
    h = random_psd(5)
    x = torch.randn(3, 5, dtype=torch.float64)
    pre = DensePreconditioner({"m": h}, damping_factor=0.0)
    assert rel(pre.apply_module("m", x.float()), x @ torch.linalg.inv(h)) < 1e-4
    low = random_psd(6, rank=3)
    pinv = DensePreconditioner({"m": low}, inversion="pseudoinverse", damping_factor=1e-6)
    assert (
        rel(
            pinv.apply_module("m", x[:, :1].repeat(1, 6).float()),
            x[:, :1].repeat(1, 6) @ torch.linalg.pinv(low, hermitian=True),
        )
        < 1e-4
    )


@pytest.mark.parametrize("inversion", DENSE_INVERSIONS)
def test_dense_half_power_twice_is_inverse(inversion):
    h = random_psd(7, rank=5, seed=2)
    pre = DensePreconditioner({"m": h}, inversion=inversion, damping_factor=0.05)
    x = torch.randn(4, 7)
    twice = pre.apply_module("m", pre.apply_module("m", x, -0.5), -0.5)
    assert rel(twice, pre.apply_module("m", x, -1.0)) < 1e-5
    assert torch.allclose(pre.matrix_power("m", -1), pre.matrix_power("m", -1).T, atol=1e-6)


def test_factored_tikhonov_falls_back_on_dense():
    h = random_psd(4)
    a = DensePreconditioner({"m": h}, inversion="factored_tikhonov")
    b = DensePreconditioner({"m": h}, inversion="damped_inverse")
    x = torch.randn(2, 4)
    assert torch.equal(a.apply_module("m", x), b.apply_module("m", x))


# --------------------------------------------------------------- factored inversions


@pytest.mark.parametrize("inversion", DENSE_INVERSIONS)
@pytest.mark.parametrize("ev_correction", [False, True])
@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_factored_apply_equals_explicit_kronecker_inverse(inversion, ev_correction, power):
    """Rotate/scale/rotate on [O, I'] blocks = rows @ f(H) with H formed explicitly."""
    kf = random_kronecker(correction=ev_correction)
    pre = FactoredPreconditioner(
        {"m": kf}, inversion=inversion, damping_factor=0.1, ev_correction=ev_correction
    )
    H = recompose(kf, ev_correction)
    x = torch.randn(6, 12, dtype=torch.float64)
    got = pre.apply_inverse(x.float(), power, grad_sizes={"m": 12})
    assert rel(got, x @ matrix_function(H, inversion, 0.1, power)) < 1e-5


def test_factored_tikhonov_is_kronecker_of_damped_factors():
    kf = random_kronecker(o=3, i=4, seed=4)
    c = 0.3
    pre = FactoredPreconditioner({"m": kf}, inversion="factored_tikhonov", damping_factor=c)
    la, lg = kf.factor_eig_a, kf.factor_eig_g
    mu = kf.eigenvalues.mean()
    pi = (la.mean() / lg.mean()).sqrt()
    FA = (kf.q_a * (la + pi * (c * mu).sqrt())) @ kf.q_a.T
    FG = (kf.q_g * (lg + (c * mu).sqrt() / pi)) @ kf.q_g.T
    explicit = torch.kron(torch.linalg.inv(FG), torch.linalg.inv(FA))
    x = torch.randn(5, 12, dtype=torch.float64)
    assert rel(pre.apply_module("m", x.float()), x @ explicit) < 1e-5
    # ... and bergson's expanded form of the damped grid is the same thing
    lam = kf.eigenvalues
    bergson = lam + pi * (c * mu).sqrt() * lg[:, None] + (c * mu).sqrt() / pi * la[None, :] + c * mu
    m = eigen_multiplier("factored_tikhonov", lam, c, -1.0, factor_eig_a=la, factor_eig_g=lg)
    assert torch.allclose(m, 1 / bergson, rtol=1e-10)
    with pytest.raises(BadInputError):
        FactoredPreconditioner(
            {"m": random_kronecker(correction=True)},
            inversion="factored_tikhonov",
            ev_correction=True,
        )


@pytest.mark.parametrize("inversion", INVERSIONS)
@pytest.mark.parametrize("ev_correction", [False, True])
def test_factored_half_power_twice_is_inverse(inversion, ev_correction):
    if inversion == "factored_tikhonov" and ev_correction:
        pytest.skip("incompatible by definition")
    kf = random_kronecker(o=5, i=4, seed=7, correction=ev_correction)
    pre = FactoredPreconditioner({"m": kf}, inversion=inversion, ev_correction=ev_correction)
    x = torch.randn(3, 20)
    twice = pre.apply_module("m", pre.apply_module("m", x, -0.5), -0.5)
    assert rel(twice, pre.apply_module("m", x, -1.0)) < 1e-5


def test_flat_rows_and_passthrough():
    """Flat [B, D] rows are split by grad_sizes; modules without a Hessian pass through."""
    kf = random_kronecker()
    pre = FactoredPreconditioner({"m": kf})
    x = torch.randn(4, 12 + 3)
    out = pre.apply_inverse(x, -1.0, grad_sizes={"m": 12, "other": 3})
    assert torch.equal(out[:, 12:], x[:, 12:])
    assert torch.allclose(out[:, :12], pre.apply_module("m", x[:, :12]))
    with pytest.raises(BadInputError):
        pre.apply_module("m", torch.randn(2, 11))
    with pytest.raises(BadInputError):
        pre.apply_inverse(x, -0.25, grad_sizes={"m": 12, "other": 3})


# -------------------------------------------------------------------- accumulators


@pytest.mark.parametrize("method", ["kfac", "tkfac", "shampoo"])
def test_merge_equals_single_accumulator(method):
    """Splitting batches over workers and merging gives the single-worker sums."""
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(3, 5, 4, generator=g),
            torch.randn(3, 5, 6, generator=g),
            torch.rand(3, 5, generator=g) > 0.3,
        )
        for _ in range(6)
    ]
    one = make_factor_accumulator(method, 4, 6, bias=True, dtype=torch.float64)
    parts = [
        make_factor_accumulator(method, 4, 6, bias=True, dtype=torch.float64) for _ in range(3)
    ]
    for k, (a, gr, m) in enumerate(batches):
        one.update(a, gr, m)
        parts[k % 3].update(a, gr, m)
    merged = make_factor_accumulator(method, 4, 6, bias=True, dtype=torch.float64)
    for p in parts:
        merged.merge(p.state_dict())
    for key, v in one.state_dict().items():
        assert torch.allclose(merged.state_dict()[key], v), key
    fa, fb = one.finalize(), merged.finalize()
    assert torch.allclose(fa.A, fb.A) and torch.allclose(fa.S, fb.S) and fa.count == fb.count


def test_kfac_mask_and_bias():
    a = torch.randn(2, 4, 3)
    g = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    acc = KFACAccumulator(3, 5, bias=True, dtype=torch.float64)
    acc.update(a, g, mask)
    a1 = torch.cat([a[mask], torch.ones(5, 1)], 1).double()
    assert torch.allclose(acc.state_dict()["A"], a1.T @ a1, atol=1e-6)
    assert acc.count == 5
    with pytest.raises(ValueError):
        acc.merge({"A": torch.zeros(4, 4)})


def test_gram_accumulator_counts_empty_rows():
    rows = torch.randn(10, 4, dtype=torch.float64)
    acc = GramAccumulator(4, dtype=torch.float64)
    acc.update_rows(rows[:6])
    acc.update_rows(rows[6:])
    acc.add_rows_count(2)  # two short documents: zero rows that still count
    assert torch.allclose(acc.finalize(), rows.T @ rows / 12)


def test_half_precision_storage_accumulates_in_fp32():
    a, g = torch.randn(1, 4000, 3), torch.randn(1, 4000, 2)
    ref = KFACAccumulator(3, 2, dtype=torch.float64)
    bf = KFACAccumulator(3, 2, dtype=torch.bfloat16)
    ref.update(a, g, None)
    bf.update(a, g, None)
    assert bf.state_dict()["A"].dtype == torch.bfloat16
    assert rel(bf.state_dict()["A"], ref.state_dict()["A"]) < 1e-2
