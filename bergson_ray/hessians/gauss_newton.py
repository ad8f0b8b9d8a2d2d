"""Gauss-Newton Hessian-vector products of the training loss, in the gradient stores' layout.

LiSSA (``hessians/lissa.py``) needs ``G v`` for the Gauss-Newton Hessian ``G`` of the
cross-entropy training loss with respect to the weights of the tracked modules, without
ever forming ``G``. For a batch of documents

    G = (1 / B) * sum_docs sum_positions w_s J_s^T (diag(p_s) - p_s p_s^T) J_s

where ``J_s`` is the Jacobian of position ``s``'s logits with respect to the weights,
``p_s`` the model's softmax there (so ``G`` is positive semi-definite and needs no
labels beyond which positions carry loss), ``w_s`` 1 for a position with a label (or
``1 / label count`` of its document under ``--loss_reduction mean``), and ``B`` the
batch size. This is bergson's ``GaussNewtonProduct``: the mean over documents, the sum
over a document's tokens, the full (never projected) ``[O, I]`` weight blocks (``[O, I+1]``
with ``--include_bias``, bias last), module names relative to the base model.

One product is one forward pass with forward-mode AD (``J v`` comes out next to the
logits), the softmax Hessian applied per position, and one backward pass (``J^T``).
Pure torch: the model and the padded batches are given; nothing here reads data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from ..gradients.modules import weight_shape

IGNORE_INDEX = -100


def _is_transposed(module: nn.Module) -> bool:
    """HF ``Conv1D`` stores its weight as ``[I, O]``; ``nn.Linear`` as ``[O, I]``."""
    return not isinstance(module, nn.Linear)


class GaussNewtonProduct:
    """``G_B v`` over ``modules`` of ``model`` for padded batches of documents."""

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        *,
        include_bias: bool = False,
        loss_reduction: str = "sum",
    ):
        self.model = model
        self.names = list(modules)
        self.mean_reduction = loss_reduction == "mean"
        owner = {id(p): n for n, p in model.named_parameters()}
        self.modules = dict(modules)
        self.weight_param: dict[str, str] = {}
        self.bias_param: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for name, mod in self.modules.items():
            self.weight_param[name] = owner[id(mod.weight)]
            o, i = weight_shape(mod)
            has_bias = include_bias and getattr(mod, "bias", None) is not None
            if has_bias:
                self.bias_param[name] = owner[id(mod.bias)]
            self.shapes[name] = (o, i + int(has_bias))
        all_params = dict(model.named_parameters())
        keys = [*self.weight_param.values(), *self.bias_param.values()]
        self.params = {k: all_params[k] for k in keys}
        for p in self.params.values():
            p.requires_grad_(True)

    @property
    def sizes(self) -> dict[str, int]:
        """Flat size of each module's block (``O * I``, or ``O * (I + 1)`` with bias)."""
        return {n: o * i for n, (o, i) in self.shapes.items()}

    # -- layout: flat [O, I(+1)] blocks <-> parameter tensors ---------------------------
    def to_params(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Flat blocks -> tangents shaped (and oriented) like the parameters."""
        out: dict[str, Tensor] = {}
        for name in self.names:
            o, i = self.shapes[name]
            block = v[name].reshape(o, i)
            if name in self.bias_param:
                out[self.bias_param[name]] = block[:, -1].contiguous()
                block = block[:, :-1]
            if _is_transposed(self.modules[name]):
                block = block.T
            out[self.weight_param[name]] = block.contiguous()
        return out

    def to_flat(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_params` (parameter-shaped tensors -> flat blocks)."""
        out: dict[str, Tensor] = {}
        for name in self.names:
            w = grads[self.weight_param[name]]
            if _is_transposed(self.modules[name]):
                w = w.T
            if name in self.bias_param:
                w = torch.cat([w, grads[self.bias_param[name]][:, None]], dim=1)
            out[name] = w.reshape(-1)
        return out

    # -- the product ---------------------------------------------------------------------
    def product(
        self, v: Mapping[str, Tensor], input_ids: Tensor, labels: Tensor, batch_size: int
    ) -> dict[str, Tensor]:
        """This micro-batch's share of ``G_B v`` for a batch of ``batch_size`` documents.

        ``input_ids`` / ``labels`` are right-padded ``[N, S]`` (labels ``-100`` where a
        position carries no loss; position ``s`` predicts ``labels[s + 1]``). The shares of
        a batch's micro-batches add up to the product on the whole batch.
        """
        dtype = next(iter(self.params.values())).dtype
        tangents = {k: t.to(dtype) for k, t in self.to_params(v).items()}
        with fwAD.dual_level():
            duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in self.params.items()}
            out = functional_call(self.model, duals, (input_ids,)).logits[:, :-1]
            logits, jvp = fwAD.unpack_dual(out)
            if jvp is None:  # no tracked module reaches the logits
                jvp = torch.zeros_like(logits)
            jvp = jvp.detach()

        mask = (labels[:, 1:] != IGNORE_INDEX).to(logits.dtype)
        weight = mask / batch_size
        if self.mean_reduction:
            weight = weight / mask.sum(dim=1, keepdim=True).clamp_min(1)
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            hjvp = probs * (jvp - (probs * jvp).sum(dim=-1, keepdim=True))
            hjvp = hjvp * weight[..., None]
        del jvp, probs
        keys = list(self.params)
        grads = torch.autograd.grad(
            logits, [self.params[k] for k in keys], hjvp, allow_unused=True
        )
        grads = [torch.zeros_like(self.params[k]) if g is None else g for k, g in zip(keys, grads)]
        return {n: g.float() for n, g in self.to_flat(dict(zip(keys, grads))).items()}


__all__ = ["IGNORE_INDEX", "GaussNewtonProduct"]
