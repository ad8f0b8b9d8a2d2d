"""Applying ``H^p`` (p = -1 or -½) of a dense or factored Hessian to gradient rows.

The rule for using it (spec §3.8): inner-product scores precondition the *query*
only, with ``H⁻¹``; cosine scores precondition *both* sides with ``H^{-½}`` and then
unit-normalize. :meth:`Preconditioner.apply_inverse` is the one call ``build``,
``reduce``, ``score`` and query code need.

Dense: ``H^p = Q diag(m(λ)) Qᵀ`` per module, computed in fp64 from the stored
Gram once per power and applied as ``rows @ H^p``.

Factored: each row block is reshaped to ``G [O, I']`` and mapped to
``Q_G (m(Λ) ⊙ (Q_Gᵀ G Q_A)) Q_Aᵀ``; the ``[O·I', O·I']`` matrix is never formed,
the cost is two small GEMMs per side.

Modules with no Hessian pass through unchanged (bergson's behaviour), with one
warning naming them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from ..errors import BadInputError
from ..utils.columns import column_offsets
from .factored import KroneckerFactors
from .inversion import check_power, eigen_multiplier

log = logging.getLogger(__name__)

Rows = torch.Tensor | Mapping[str, torch.Tensor]


class Preconditioner(ABC):
    """Applies a regularised inverse power of a per-module Hessian to gradients."""

    kind: str = ""

    def __init__(self, inversion: str, damping_factor: float, device: torch.device | str):
        self.inversion = inversion
        self.damping_factor = float(damping_factor)
        self.device = torch.device(device)
        self._cache: dict[tuple[str, float], object] = {}
        self._warned: set[str] = set()

    @property
    @abstractmethod
    def modules(self) -> list[str]:
        """Module names the Hessian covers."""

    @abstractmethod
    def module_dim(self, name: str) -> int:
        """Width of the gradient block this module's Hessian acts on."""

    @abstractmethod
    def _apply_block(self, name: str, block: torch.Tensor, power: float) -> torch.Tensor:
        """``block [B, d]`` (fp32 on ``self.device``) -> preconditioned ``[B, d]``."""

    def apply_module(self, name: str, block: torch.Tensor, power: float = -1.0) -> torch.Tensor:
        """Precondition one module's ``[B, d]`` block; returned in its dtype and device."""
        power = check_power(power)
        if name not in self.modules:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("no Hessian for module %s: its gradients are not preconditioned", name)
            return block
        d = self.module_dim(name)
        if block.shape[-1] != d:
            raise BadInputError(
                f"{self.kind} Hessian of {name} acts on {d}-wide gradients, got {block.shape[-1]}; "
                "was it fit with the same --projection_dim / --include_bias?"
            )
        out = self._apply_block(name, block.to(self.device, torch.float32), power)
        return out.to(device=block.device, dtype=block.dtype)

    def apply_inverse(
        self,
        grads: Rows,
        power: float = -1.0,
        grad_sizes: Mapping[str, int] | None = None,
    ) -> Rows:
        """``H^power`` applied to gradients.

        ``grads`` is either ``{module: [B, d_m]}`` (returns the same shape of dict) or
        flat rows ``[B, D]`` laid out per ``grad_sizes`` (module -> width, in column
        order, as in a gradient store's ``info.json``); returns ``[B, D]``.
        """
        if isinstance(grads, Mapping):
            return {k: self.apply_module(k, v, power) for k, v in grads.items()}
        if grad_sizes is None:
            raise BadInputError("flat gradient rows need grad_sizes to find each module's columns")
        if sum(grad_sizes.values()) != grads.shape[-1]:
            raise BadInputError(
                f"grad_sizes add up to {sum(grad_sizes.values())} columns, rows have {grads.shape[-1]}"
            )
        parts = [
            self.apply_module(name, grads[..., lo:hi], power)
            for name, (lo, hi) in column_offsets(grad_sizes).items()
        ]
        return torch.cat(parts, dim=-1)


class DensePreconditioner(Preconditioner):
    """Per-module dense ``[d, d]`` second-moment matrices (autocorrelation)."""

    kind = "dense"

    def __init__(
        self,
        hessians: Mapping[str, torch.Tensor],
        *,
        inversion: str = "damped_inverse",
        damping_factor: float = 0.1,
        device: torch.device | str = "cpu",
    ):
        super().__init__(inversion, damping_factor, device)
        if inversion == "factored_tikhonov":
            log.info("factored_tikhonov has no dense form; using damped_inverse")
            self.inversion = "damped_inverse"
        self.hessians = dict(hessians)

    @property
    def modules(self) -> list[str]:
        return list(self.hessians)

    def module_dim(self, name: str) -> int:
        return int(self.hessians[name].shape[0])

    def matrix_power(self, name: str, power: float) -> torch.Tensor:
        """``H^power`` of module ``name`` (fp32 on ``self.device``), cached."""
        key = (name, check_power(power))
        if key not in self._cache:
            h = self.hessians[name].to(torch.float64)
            lam, q = torch.linalg.eigh((h + h.T) / 2)
            m = eigen_multiplier(self.inversion, lam, self.damping_factor, power)
            self._cache[key] = ((q * m) @ q.T).to(self.device, torch.float32)
        return self._cache[key]  # type: ignore[return-value]

    def _apply_block(self, name: str, block: torch.Tensor, power: float) -> torch.Tensor:
        return block @ self.matrix_power(name, power)


class FactoredPreconditioner(Preconditioner):
    """Kronecker-factored Hessians (KFAC / TKFAC / Shampoo, optionally EK-FAC)."""

    kind = "factored"

    def __init__(
        self,
        factors: Mapping[str, KroneckerFactors],
        *,
        inversion: str = "damped_inverse",
        damping_factor: float = 0.1,
        ev_correction: bool = False,
        device: torch.device | str = "cpu",
    ):
        super().__init__(inversion, damping_factor, device)
        if ev_correction and inversion == "factored_tikhonov":
            raise BadInputError(
                "--inversion factored_tikhonov damps the KFAC factors separately and cannot be "
                "combined with --ev_correction; pick another inversion"
            )
        missing = [k for k, f in factors.items() if ev_correction and f.correction is None]
        if missing:
            raise BadInputError(
                f"--ev_correction given but the Hessian has no eigenvalue correction for "
                f"{missing[0]} (fit it with `hessian --ev_correction`)"
            )
        self.ev_correction = ev_correction
        self.factors = {
            k: KroneckerFactors(
                q_a=f.q_a.to(self.device, torch.float32),
                q_g=f.q_g.to(self.device, torch.float32),
                eigenvalues=f.eigenvalues,
                factor_eig_a=f.factor_eig_a,
                factor_eig_g=f.factor_eig_g,
                correction=f.correction,
            )
            for k, f in factors.items()
        }

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    def module_dim(self, name: str) -> int:
        o, i = self.factors[name].shape
        return o * i

    def multiplier(self, name: str, power: float) -> torch.Tensor:
        """``m(Λ)^(-power)`` ``[O, I']`` (fp32 on ``self.device``), cached."""
        key = (name, check_power(power))
        if key not in self._cache:
            f = self.factors[name]
            m = eigen_multiplier(
                self.inversion,
                f.grid(self.ev_correction),
                self.damping_factor,
                power,
                factor_eig_a=f.factor_eig_a,
                factor_eig_g=f.factor_eig_g,
            )
            self._cache[key] = m.to(self.device, torch.float32)
        return self._cache[key]  # type: ignore[return-value]

    def _apply_block(self, name: str, block: torch.Tensor, power: float) -> torch.Tensor:
        f = self.factors[name]
        o, i = f.shape
        g = block.reshape(-1, o, i)
        rotated = f.q_g.T @ g @ f.q_a  # Q_Gᵀ G Q_A
        rotated = rotated * self.multiplier(name, power)
        return (f.q_g @ rotated @ f.q_a.T).reshape(block.shape)


def load_preconditioner(
    hessian_path: str,
    *,
    inversion: str = "damped_inverse",
    damping_factor: float = 0.1,
    ev_correction: bool = False,
    device: torch.device | str = "cpu",
    modules: list[str] | None = None,
) -> Preconditioner:
    """Open a Hessian dir (ours or bergson's, dense or factored) for :meth:`apply_inverse`.

    Factored iff ``eigen_activation_sharded/`` exists (bergson's rule); otherwise a
    processor dir with ``hessians.safetensors`` (ours) or ``hessians.pth`` (bergson's).
    ``modules`` restricts loading to those modules (others pass through).
    """
    from pathlib import Path

    from ..errors import StoreError
    from ..store.processor import load_hessians
    from .factored_io import is_factored_dir, read_factored

    path = Path(hessian_path)
    if not path.exists():
        raise BadInputError(f"--hessian_path {path} does not exist")
    if is_factored_dir(path):
        factors = read_factored(path, modules=modules, strict=False)
        return FactoredPreconditioner(
            factors,
            inversion=inversion,
            damping_factor=damping_factor,
            ev_correction=ev_correction,
            device=device,
        )
    if ev_correction:
        raise BadInputError(
            f"--ev_correction needs a factored (EK-FAC) Hessian, but {path} is a dense one"
        )
    hessians = load_hessians(path)
    if not hessians:
        raise StoreError(
            f"{path} holds no Hessian: expected eigen_activation_sharded/ (factored) or "
            "hessians.safetensors / hessians.pth (dense)"
        )
    if modules is not None:
        hessians = {k: v for k, v in hessians.items() if k in set(modules)}
    return DensePreconditioner(
        hessians, inversion=inversion, damping_factor=damping_factor, device=device
    )
