"""``test_model_configuration``: run the checks, escalate the settings, print the flags.

1. chat-template special tokens (``special_tokens.py``);
2. a document alone vs batched with random tokens of its length, at the base setting
   (does *batching* alone change gradients?);
3. a document alone vs padded next to a longer one, at each setting of
   ``settings.escalation`` in turn, stopping at the first with no flagged trial.

Each setting loads the model through ``runners/model_loading.load_model`` with that
setting's flags, exactly as ``build`` would, and torch's global kernel switches are
restored afterwards. No Ray.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config.diagnostics import DiagnoseConfig
from ..config.sections import DataConfig, ModelConfig
from ..errors import BadInputError
from .padding import Trial, count_flagged, equal_length_trials, padding_trials
from .settings import Setting, escalation, kernel_state
from .special_tokens import SpecialTokenCheck, check_special_tokens

Printer = Callable[[str], None]


@dataclass
class SettingResult:
    setting: Setting
    trials: list[Trial]
    flagged: int

    @property
    def min_cos(self) -> float:
        return min(t.cos_sim for t in self.trials)


@dataclass
class Diagnosis:
    """Everything ``test_model_configuration`` found."""

    base_precision: str
    special_tokens: SpecialTokenCheck
    equal_length: list[Trial]
    equal_length_flagged: int
    settings: list[SettingResult] = field(default_factory=list)

    @property
    def passing(self) -> Setting | None:
        last = self.settings[-1] if self.settings else None
        return last.setting if last is not None and last.flagged == 0 else None

    @property
    def recommended_flags(self) -> list[str] | None:
        """Flags to add (``[]``: defaults are fine; ``None``: no setting helped)."""
        good = self.passing
        return None if good is None else good.flags(self.base_precision)


def pick_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for but torch sees no GPU")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def load_documents(cfg: DiagnoseConfig, tokenizer) -> list[torch.Tensor]:
    """The first ``max_documents`` documents of at least ``min_len`` tokens, cut to ``max_len``."""
    from ..data.loading import load_dataset_rows

    ds = load_dataset_rows(DataConfig(dataset=cfg.dataset, split=cfg.split,
                                      prompt_column=cfg.prompt_column))
    if cfg.prompt_column not in ds.column_names:
        raise BadInputError(
            f"dataset {cfg.dataset} has no column {cfg.prompt_column!r} (columns: {ds.column_names})"
        )
    docs: list[torch.Tensor] = []
    for start in range(0, len(ds), 256):
        texts = ds[start : start + 256][cfg.prompt_column]
        for ids in tokenizer([str(t) for t in texts], verbose=False)["input_ids"]:
            if len(ids) >= cfg.min_len:
                docs.append(torch.tensor(ids[: cfg.max_len], dtype=torch.long))
            if len(docs) >= cfg.max_documents:
                return docs
    if len(docs) < 2:
        raise BadInputError(
            f"dataset {cfg.dataset} has {len(docs)} documents of at least {cfg.min_len} tokens; "
            "the test needs two"
        )
    return docs


def _summary(trials: list[Trial], threshold: float) -> str:
    cos = [t.cos_sim for t in trials]
    std = statistics.pstdev(cos) if len(cos) > 1 else 0.0
    return (
        f"cos_sim mean={statistics.fmean(cos):.6f} std={std:.6f} min={min(cos):.6f} "
        f"max={max(cos):.6f}; flagged {count_flagged(trials, threshold)}/{len(trials)} "
        f"below {threshold}"
    )


def _table(trials: list[Trial], threshold: float, out: Printer) -> None:
    out(f"{'trial':>6} {'short':>6} {'long':>6} {'ratio':>6} {'cos_sim':>10} {'loss_diff':>12}")
    for t in trials:
        mark = " <<<" if t.cos_sim < threshold else ""
        out(f"{t.trial:>6} {t.short_len:>6} {t.long_len:>6} {t.ratio:>6.1f} "
            f"{t.cos_sim:>10.6f} {t.loss_diff:>12.6f}{mark}")


def diagnose(
    cfg: DiagnoseConfig,
    *,
    out: Printer = print,
    verbose: bool = False,
    loader: Callable[[ModelConfig, str], tuple] | None = None,
) -> Diagnosis:
    """Run every check; print the report through ``out``; return what was found.

    ``loader(model_cfg, device) -> (model, tokenizer)`` defaults to the loader every
    command uses; ``verbose`` prints each trial.
    """
    if loader is None:
        from ..runners.model_loading import load_model as loader
    device = pick_device(cfg.device)
    on_gpu = device.startswith("cuda")
    base_model = ModelConfig(model=cfg.model, precision=cfg.precision, model_kwargs=cfg.model_kwargs)
    out(f"Model:     {cfg.model}\nPrecision: {cfg.precision}\nDevice:    {device}")
    out(f"Trials:    {cfg.n_trials} per setting\nThreshold: {cfg.threshold}")

    with kernel_state():
        model, tokenizer = loader(base_model, device)
    special = check_special_tokens(tokenizer)
    out("\n== Special tokens (chat template) ==")
    for line in special.lines:
        out(f"  {line}")

    docs = load_documents(cfg, tokenizer)
    out(f"\nDocuments: {len(docs)} ({cfg.min_len}-{cfg.max_len} tokens)")

    out("\n== Equal-length batching (no padding) ==")
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    with kernel_state():
        eq = equal_length_trials(model.eval(), docs, cfg.n_trials, cfg.seed, vocab)
    if verbose:
        _table(eq, cfg.threshold, out)
    out(f"  {_summary(eq, cfg.threshold)}")
    del model

    result = Diagnosis(cfg.precision, special, eq, count_flagged(eq, cfg.threshold))
    for setting in escalation(cfg.precision, on_gpu):
        label = setting.label(cfg.precision)
        out(f"\n== Padding: {label} ==")
        with kernel_state():
            model, _ = loader(setting.model_config(base_model), device)
            trials = padding_trials(model.eval(), docs, cfg.n_trials, cfg.seed)
        del model
        if verbose:
            _table(trials, cfg.threshold, out)
        out(f"  {_summary(trials, cfg.threshold)}")
        result.settings.append(SettingResult(setting, trials, count_flagged(trials, cfg.threshold)))
        if result.settings[-1].flagged == 0:
            break
    report(result, cfg, out)
    return result


def report(d: Diagnosis, cfg: DiagnoseConfig, out: Printer = print) -> None:
    """The closing summary and the flags to add."""
    out(f"\n== Report for {cfg.model} ({cfg.n_trials} trials per setting) ==")
    tokens = "PASS" if d.special_tokens.passed else "FAIL"
    if not d.special_tokens.applicable:
        tokens += " (no chat template)"
    out(f"  {tokens}  special tokens")
    eq_min = min(t.cos_sim for t in d.equal_length)
    out(f"  {'PASS' if d.equal_length_flagged == 0 else 'FAIL'}  equal-length batching "
        f"(min cos_sim={eq_min:.6f})")
    for r in d.settings:
        out(f"  {'PASS' if r.flagged == 0 else 'FAIL'}  padding, {r.setting.label(d.base_precision)} "
            f"(min cos_sim={r.min_cos:.6f})")
    flags = d.recommended_flags
    out("")
    if flags == []:
        out("RESULT: gradients are consistent with default settings; no flags needed.")
    elif flags:
        joined = " ".join(flags)
        out("RESULT: gradients need non-default settings to be consistent.")
        out(f"  Add to build / score / hessian:  {joined}")
        precision = [] if any(f.startswith("--precision") for f in flags) else [
            f"--precision {cfg.precision}"
        ]
        out("  e.g. bergson-ray build <run_path> " + " ".join([f"--model {cfg.model}", *precision, *flags]))
    else:
        out("RESULT: gradients stay inconsistent under every setting tried; the model's "
            "architecture is sensitive to padding (batch one document at a time: "
            "--max_batch_size 1).")
    if d.equal_length_flagged:
        out("NOTE: gradients change even without padding when a second document shares the "
            "batch; --max_batch_size 1 avoids batching altogether.")
