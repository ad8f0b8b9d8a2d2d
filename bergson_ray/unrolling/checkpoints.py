"""Finding a trajectory's checkpoints and what their training run recorded.

No Ray and no datasets here: only the files a training run leaves behind.

* A checkpoint is an HF model dir (``config.json``: bergson's exported
  ``checkpoint-<N>``, an HF Trainer checkpoint, any saved model), a
  ``bergson-ray train`` state ``RUN/checkpoints/step_<N>.ckpt`` (trainable parameters
  in ``model.safetensors``, optimizer buffers in ``trainer_state.safetensors``), or a
  training ``RUN`` dir, which stands for all its ``step_<N>.ckpt`` with ``N > 0`` (the
  initial state ``step_0`` closes no segment).
* The training run a checkpoint came from is found the way bergson finds it: the
  directory holding ``config.yaml`` two levels up (``<run>/checkpoints/step_N.ckpt``,
  ``<run>/exported/checkpoint-N``) or one level up (``<run>/checkpoint-N``). Its
  ``config.yaml`` gives the base model, the optimizer and its hyperparameters; its
  ``log_history.json`` the learning rate of every step.
* ``step_<N>.ckpt`` states are exported as HF dirs (the base model with the state's
  parameters) so that every worker loads every checkpoint the same way.

Nothing is unpickled: tensors come from safetensors, metadata from JSON/YAML; bergson's
``optimizer.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import BadInputError
from ..training.export import LOG_HISTORY, OPTIMIZER_PT, PARAMS_FILE, STATE_FILE
from .segments import checkpoint_step

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
HF_CONFIG = "config.json"
TRAINER_STATE_JSON = "trainer_state.json"
"""What an HF Trainer checkpoint keeps its ``log_history`` in."""


@dataclass(frozen=True)
class Checkpoint:
    """One point of the trajectory, as given."""

    source: Path
    step: int | None
    """The step its name encodes (None if it encodes none)."""
    train_run: Path | None
    """The training run directory it came from (holding ``config.yaml``), if found."""
    train_state: bool
    """A ``bergson-ray train`` state (``step_<N>.ckpt``) that must be exported first."""


def _is_train_state(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() and (path / STATE_FILE).is_file()


def _train_run_of(path: Path) -> Path | None:
    for candidate in (path.parent.parent, path.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    return None


def _states_of_run(run: Path) -> list[Path]:
    found = []
    for entry in (run / "checkpoints").iterdir():
        step = checkpoint_step(entry.name) if entry.name.startswith("step_") else None
        if step is not None and step > 0 and entry.is_dir() and _is_train_state(entry):
            found.append((step, entry))
    return [p for _, p in sorted(found)]


def find_checkpoints(entries: Sequence[str]) -> list[Checkpoint]:
    """The checkpoints named by ``--checkpoints``, in the order given (run dirs expanded)."""
    if not entries:
        raise BadInputError(
            "no checkpoints given: pass --checkpoints with HF model dirs, the "
            "RUN/checkpoints/step_<N>.ckpt dirs of `bergson-ray train`, or its RUN dir"
        )
    out: list[Checkpoint] = []
    for entry in entries:
        path = Path(os.path.abspath(os.path.expanduser(str(entry))))
        if not path.exists():
            raise BadInputError(f"checkpoint {entry} does not exist")
        if not path.is_dir():
            raise BadInputError(f"checkpoint {entry} is not a directory")
        if (path / "checkpoints").is_dir() and not (path / HF_CONFIG).is_file():
            states = _states_of_run(path)
            if not states:
                raise BadInputError(
                    f"training run {entry} holds no checkpoints after step 0: train it with "
                    "--save_mode interval (or all, sqrt, log) so RUN/checkpoints/step_<N>.ckpt exist"
                )
            out += [Checkpoint(p, checkpoint_step(p.name), path, True) for p in states]
        elif _is_train_state(path):
            out.append(Checkpoint(path, checkpoint_step(path.name), _train_run_of(path), True))
        elif (path / HF_CONFIG).is_file():
            out.append(Checkpoint(path, checkpoint_step(path.name), _train_run_of(path), False))
        elif (path / ".metadata").is_file():
            raise BadInputError(
                f"checkpoint {entry} is a torch.distributed checkpoint of bergson's trainer; "
                "export it to an HF dir first (bergson exports them to <run>/exported/checkpoint-<N>)"
            )
        else:
            raise BadInputError(
                f"checkpoint {entry} is neither an HF model dir (no {HF_CONFIG}) nor a "
                f"`bergson-ray train` state ({PARAMS_FILE} + {STATE_FILE})"
            )
    return out


# --------------------------------------------------------------------- the training run


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run's ``config.yaml`` says about the trajectory (ours or bergson's)."""

    model: str | None = None
    optimizer: str | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_eps: float | None = None
    eps_root: float | None = None


def read_training_record(run: Path | None) -> TrainingRecord | None:
    """The training settings of ``run`` (None when it has no training config)."""
    if run is None or not (run / RUN_CONFIG).is_file():
        return None
    try:
        doc = yaml.safe_load((run / RUN_CONFIG).read_text()) or {}
    except yaml.YAMLError:
        return None
    steps = doc.get("steps") if isinstance(doc, dict) else doc
    if isinstance(steps, list) and steps and isinstance(steps[0], dict):
        body: Any = next(iter(steps[0].values()), None)
    else:
        body = doc
    if not isinstance(body, dict):
        return None
    # ours: {model: {model: ...}, training: {optimizer: ...}}; bergson's: one flat mapping
    training = body.get("training") if isinstance(body.get("training"), dict) else body
    model = body.get("model")
    if isinstance(model, dict):
        model = model.get("model")
    if "optimizer" not in training:
        return None  # an attribution run's config, not a training run's

    def num(key: str) -> float | None:
        value = training.get(key)
        return float(value) if isinstance(value, (int, float, str)) and str(value) else None

    return TrainingRecord(
        model=str(model) if model else None,
        optimizer=str(training.get("optimizer")),
        adam_beta1=num("adam_beta1"),
        adam_beta2=num("adam_beta2"),
        adam_eps=num("adam_eps"),
        eps_root=num("eps_root"),
    )


def derive_momentum(record: TrainingRecord | None) -> float:
    """The heavy-ball β a run trained with: SGD's is ``adam_beta1`` (bergson's trainer);
    AdamW's first moment is handled by its preconditioner, so 0; unknown -> 0."""
    if record is None:
        return 0.0
    if record.optimizer == "sgd":
        return float(record.adam_beta1 or 0.0)
    if record.optimizer not in ("adamw", None):
        log.warning(
            "approxunrolling: no SOURCE momentum for optimizer %r; using 0 (pass --momentum "
            "if that is wrong)", record.optimizer,
        )
    return 0.0


def read_log_history(checkpoints: Sequence[Checkpoint]) -> list[dict] | None:
    """The per-step learning rates: the training run's ``log_history.json`` (in
    ``checkpoints/`` or the run dir), one beside the checkpoints, or the last checkpoint's
    HF ``trainer_state.json``."""
    candidates = []
    run = checkpoints[0].train_run
    if run is not None:
        candidates += [run / "checkpoints" / LOG_HISTORY, run / LOG_HISTORY]
    candidates.append(checkpoints[0].source.parent / LOG_HISTORY)
    for path in candidates:
        if path.is_file():
            return _json_list(path)
    state = checkpoints[-1].source / TRAINER_STATE_JSON
    if state.is_file():
        doc = json.loads(state.read_text())
        if isinstance(doc, dict) and isinstance(doc.get("log_history"), list):
            return doc["log_history"]
    return None


def _json_list(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, list):
        raise BadInputError(f"{path} should hold a list of {{step, learning_rate}} entries")
    return doc


# --------------------------------------------------------------------- parameters


def parameter_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, without loading weights (safetensors header, or the HF
    config's model built on the meta device)."""
    if ckpt.train_state:
        from safetensors import safe_open

        with safe_open(str(ckpt.source / PARAMS_FILE), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..errors import load_error

    try:
        cfg = AutoConfig.from_pretrained(str(ckpt.source))
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise load_error("checkpoint", str(ckpt.source), err) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def check_same_architecture(
    checkpoints: Sequence[Checkpoint], shapes: Sequence[Mapping[str, tuple[int, ...]]]
) -> None:
    """Every checkpoint must have the first one's parameters and shapes (one sentence
    naming the first difference otherwise)."""
    first = shapes[0]
    for ckpt, mine in zip(checkpoints[1:], shapes[1:]):
        if mine == first:
            continue
        missing = sorted(set(first) - set(mine)) or sorted(set(mine) - set(first))
        if missing:
            what = f"parameter {missing[0]} is in one but not the other"
        else:
            name = next(k for k in first if first[k] != mine[k])
            what = f"parameter {name} is {list(first[name])} vs {list(mine[name])}"
        raise BadInputError(
            f"checkpoint {ckpt.source} has a different architecture from {checkpoints[0].source} "
            f"({what}); all checkpoints must come from one training run"
        )


def export_train_state(ckpt: Checkpoint, base_model: str, dest: Path) -> Path:
    """Write ``ckpt`` (a ``step_<N>.ckpt``) as an HF model dir at ``dest`` (atomically):
    the base model and tokenizer carrying the state's parameters."""
    import shutil

    from safetensors.torch import load_file

    from ..config.sections import ModelConfig
    from ..training.export import save_model_dir
    from ..training.model import make_model

    params = load_file(str(ckpt.source / PARAMS_FILE))
    dtype = next(iter(params.values())).dtype if params else torch.float32
    model, tokenizer = make_model(ModelConfig(model=base_model), dtype=dtype)
    own = dict(model.named_parameters())
    for name, value in params.items():
        if name not in own or tuple(own[name].shape) != tuple(value.shape):
            raise BadInputError(
                f"checkpoint {ckpt.source} does not fit the base model {base_model} "
                f"(parameter {name}); pass the model it was trained from as --model_path"
            )
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    save_model_dir(model, params, tokenizer, part)
    if (ckpt.source / OPTIMIZER_PT).is_file():  # travels with its checkpoint, as in bergson's export
        shutil.copy2(ckpt.source / OPTIMIZER_PT, part / OPTIMIZER_PT)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------- optimizer state


@dataclass
class SecondMoments:
    """One checkpoint's Adam second moments and the hyperparameters to correct them."""

    moments: dict[str, torch.Tensor]
    """Parameter name -> ``v`` (not bias-corrected)."""
    step: int
    beta2: float
    eps: float
    eps_root: float


def has_second_moments(ckpt: Checkpoint, record: TrainingRecord | None) -> bool:
    """Whether :func:`read_second_moments` will find an Adam state (checked before Ray)."""
    if ckpt.train_state and record is not None and record.optimizer == "adamw":
        return True
    return (ckpt.source / OPTIMIZER_PT).is_file()


def read_second_moments(ckpt: Checkpoint, record: TrainingRecord | None) -> SecondMoments:
    """The Adam state of ``ckpt``: ``trainer_state.safetensors`` (with the run's
    hyperparameters) for our states, else an ``optimizer.pt`` in the checkpoint dir."""
    if ckpt.train_state and record is not None and record.optimizer == "adamw":
        from safetensors import safe_open

        moments: dict[str, torch.Tensor] = {}
        with safe_open(str(ckpt.source / STATE_FILE), "pt") as f:
            step = int((f.metadata() or {}).get("step", 0))
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind == "exp_avg_sq":
                    moments[name] = f.get_tensor(key)
        if moments:
            return SecondMoments(
                moments,
                step,
                float(record.adam_beta2 if record.adam_beta2 is not None else 0.999),
                float(record.adam_eps if record.adam_eps is not None else 1e-8),
                float(record.eps_root or 0.0),
            )
    pt = ckpt.source / OPTIMIZER_PT
    if pt.is_file():
        return _moments_from_optimizer_pt(pt)
    raise BadInputError(
        f"--use_adam_preconditioner needs the Adam second moments of checkpoint {ckpt.source}: "
        f"it has no {OPTIMIZER_PT} and is not an AdamW state of `bergson-ray train`"
    )


def _moments_from_optimizer_pt(path: Path) -> SecondMoments:
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusals and damaged files alike
        raise BadInputError(f"cannot read {path} (weights only): {' '.join(str(err).split())[:160]}") from None
    groups = doc.get("param_groups") or [{}]
    betas, eps = groups[0].get("betas"), groups[0].get("eps")
    if betas is None or eps is None:
        raise BadInputError(
            f"{path} has no betas/eps in its param_groups: the preconditioner cannot be built; "
            "re-save it with the optimizer hyperparameters"
        )
    moments: dict[str, torch.Tensor] = {}
    steps = set()
    for idx, entry in (doc.get("state") or {}).items():
        name = entry.get("param_name")
        if name is None or "exp_avg_sq" not in entry:
            continue
        if "step" not in entry:
            raise BadInputError(f"{path}: state entry {idx} has no step (needed for bias correction)")
        step = entry["step"]
        steps.add(int(step.item() if torch.is_tensor(step) else step))
        moments[str(name)] = entry["exp_avg_sq"]
    if not moments:
        raise BadInputError(f"{path} holds no named exp_avg_sq entries")
    if len(steps) > 1:
        raise BadInputError(f"{path}: its parameters were updated different numbers of times {sorted(steps)}")
    return SecondMoments(
        moments, steps.pop(), float(betas[1]), float(eps), float(groups[0].get("eps_root", 0.0))
    )
