"""Saved training states for the MAGIC replay: in memory, or one directory per state.

The reverse pass needs the state *before* every update ``t`` (parameters, optimizer
buffers, RNG); it keeps only bergson's ``save_mode`` schedule and recomputes the rest.
A state is ``(params, opt_state, rng)`` exactly as the trainer holds it, so restoring
one and re-running the trainer's own step gives bit-identical parameters.

On disk a state is the trainer's checkpoint layout (``training/export.py``:
``model.safetensors`` + ``trainer_state.safetensors``) plus ``rng_state.safetensors``,
written into a temporary directory and renamed, so a crash never leaves half a state.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..training import export

RNG_FILE = "rng_state.safetensors"
FINAL = "final.ckpt"


@dataclass
class State:
    """The trainer's state before one update (``opt_state["step"]`` updates done)."""

    params: dict[str, Tensor]
    opt_state: dict
    rng: Tensor

    def detached(self) -> State:
        """A copy that shares no autograd graph (and no storage) with the trainer's."""
        return State(
            {k: v.detach().clone() for k, v in self.params.items()},
            {
                k: ({n: t.detach().clone() for n, t in v.items()} if isinstance(v, dict) else v)
                for k, v in self.opt_state.items()
            },
            self.rng.clone(),
        )


def step_dir(root: Path, step: int) -> Path:
    """bergson's checkpoint name: the state before update ``step``."""
    return root / f"step_{step}.ckpt"


def write_state(directory: Path, state: State) -> Path:
    """Write ``state`` to ``directory`` atomically (temporary sibling, then rename)."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    export.save_checkpoint(tmp, state.params, state.opt_state)
    save_file({"rng": state.rng.contiguous()}, str(tmp / RNG_FILE))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_state(directory: Path) -> State:
    """Inverse of :func:`write_state`."""
    params, opt_state = export.load_checkpoint(directory)
    return State(params, opt_state, load_file(str(directory / RNG_FILE))["rng"])


class StateStore:
    """States by step index; in memory when ``root`` is None, else under ``root``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[int, State] = {}
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, state: State) -> None:
        if self.root is None:
            self._mem[step] = state.detached()
        else:
            write_state(step_dir(self.root, step), state)

    def load(self, step: int) -> State:
        if self.root is None:
            return self._mem[step].detached()
        return read_state(step_dir(self.root, step))

    def steps(self) -> list[int]:
        """Saved step indices, ascending (half-written temporaries are never listed)."""
        if self.root is None:
            return sorted(k for k in self._mem if k >= 0)
        out = []
        for p in self.root.glob("step_*.ckpt"):
            if (p / RNG_FILE).is_file():
                out.append(int(p.name[len("step_") : -len(".ckpt")]))
        return sorted(out)

    def save_final(self, state: State) -> None:
        """The trained state (after the last update), what every query starts from."""
        if self.root is None:
            self._mem[-1] = state.detached()
        else:
            write_state(self.root / FINAL, state)

    def load_final(self) -> State:
        if self.root is None:
            return self._mem[-1].detached()
        return read_state(self.root / FINAL)

    def has_final(self) -> bool:
        return -1 in self._mem if self.root is None else (self.root / FINAL / RNG_FILE).is_file()

    def clear(self) -> None:
        """Delete every saved state (checkpoint clean-up once all scores are written)."""
        self._mem.clear()
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root)
