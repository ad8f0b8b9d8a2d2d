"""Forward/backward taps on target modules: the one place hooks are registered.

A *consumer* sees each target module's input activation ``a [N, S, I]`` during the
forward pass and the gradient of its output ``g [N, S, O]`` during the backward
pass. Per-example gradient collectors, Hessian accumulators and the query-time
tracer are all consumers; none of them touch hook registration.

We hook the module *output tensor* (``Tensor.register_hook``) rather than using
``register_full_backward_hook``: it fires exactly once per use with the output
gradient and does not interfere with in-place ops elsewhere in the model.

Fused MoE experts (``moe.py``) run each expert on its routed tokens only; their taps
scatter those rows back to sequence positions (zero elsewhere), so consumers always see
``[N, S, *]``.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
from torch import nn


class TapConsumer(Protocol):
    def on_forward(self, name: str, module: nn.Module, a: torch.Tensor) -> None: ...

    def on_backward(self, name: str, module: nn.Module, g: torch.Tensor) -> None: ...


class ModuleTaps:
    """Context manager registering the taps; removes them on exit, even on error."""

    def __init__(self, modules: dict[str, nn.Module], consumer: TapConsumer):
        self.modules = modules
        self.consumer = consumer
        self._handles: list = []

    def __enter__(self) -> ModuleTaps:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(partial(self._forward, name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward(self, name: str, module: nn.Module, inputs, output) -> None:
        a = inputs[0]
        # A module that saw only some positions (an MoE expert: its routed tokens,
        # packed [N, W, *]) says where its rows came from; consumers get [N, S, *].
        layout = getattr(module, "row_layout", None)
        if layout is not None:
            a = layout.to_sequence(a)
        self.consumer.on_forward(name, module, a.detach())
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, name, module, layout))

    def _backward(self, name: str, module: nn.Module, layout, g: torch.Tensor) -> None:
        if layout is not None:
            g = layout.to_sequence(g)
        self.consumer.on_backward(name, module, g.detach())


class InputGradSwitch:
    """Make the input embeddings' *output* require grad instead of any parameter.

    With every weight frozen, autograd would build no graph. bergson unfreezes the
    embedding matrix (and accumulates a useless ``[V, H]`` gradient every batch);
    marking the embedding output as a grad-requiring leaf builds the same graph for
    free.
    """

    def __init__(self, model: nn.Module):
        self.embed = model.get_input_embeddings()
        self._handle = None

    def __enter__(self) -> InputGradSwitch:
        def hook(_mod, _inp, out):
            return out.detach().requires_grad_(True)

        self._handle = self.embed.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
