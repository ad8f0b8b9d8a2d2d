"""``bergson-ray validate``: leave-k-out validation of attribution scores (bergson 2.5.1's
``ValidationConfig``, with its ``--method lds|filter|weight_step`` sub-configs).

bergson selects one method sub-config on its command line; ours carries all three as
sections (``lds``, ``filter``, ``weight_step``) and ``method`` says which one runs, so every
option has one flag and one ``--help`` line. bergson's flags ``--fraction``, ``--count`` and
``--paths`` belong to the selected method there; ``cli/validate.py`` maps them the same way.
Old flat keys (``num_subsets``, ``subset_fraction``, ``retrained_dir``, ...) and bergson's
nested ``method: {kind: ...}`` mapping are translated by :func:`migrate_validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import BadInputError
from .sections import DataConfig, ModelConfig, RayConfig, RunConfig, require
from .training import TrainingConfig

Method = Literal["lds", "filter", "weight_step"]


@dataclass
class LdsConfig:
    """Correlate each subset's summed scores with the loss change of retraining without it."""

    subsets: Literal["retrain", "bank"] = "retrain"
    """Where the leave-k-out models come from: retrained here, or saved banks (--paths)."""
    count: int = 100
    """Number of leave-k-out subsets (with --fraction 0: parts of one disjoint partition)."""
    fraction: float = 0.0
    """0: partition the documents into --count disjoint subsets; in (0, 1]: independent draws of that fraction."""
    manifest: str = ""
    """A subsets.json to reuse instead of drawing subsets from --seed."""
    paths: list[str] = field(default_factory=list)
    """Banks (run dirs written with --save_models) to evaluate with --subsets bank; several are averaged."""
    start: int = 0
    """First subset to retrain (split the work over several runs with --start/--stop)."""
    stop: int | None = None
    """One past the last subset to retrain (None = all)."""

    def __post_init__(self) -> None:
        self.paths = _paths(self.paths)
        require(self.count >= 1, f"--count must be >= 1, got {self.count}")
        require(
            self.fraction == 0 or 0 < self.fraction <= 1,
            f"--fraction must be 0 (disjoint partition) or in (0, 1], got {self.fraction}",
        )
        require(
            self.start >= 0 and (self.stop is None or self.stop > self.start),
            f"--start/--stop need 0 <= start < stop, got {self.start}/{self.stop}",
        )
        require(
            self.subsets != "bank" or bool(self.paths),
            "--subsets bank needs --paths DIR[,DIR...] of saved banks",
        )


@dataclass
class ControlsConfig:
    """Random removals of as many documents, to compare the filter with."""

    kind: Literal["retrain", "bank", "none"] = "retrain"
    """Random removals retrained here, read from banks (--filter.controls.paths), or none (alias --controls)."""
    count: int | None = 3
    """Number of random removals (None = every model of the bank)."""
    paths: list[str] = field(default_factory=list)
    """Banks of random removals (retrained with --method lds --fraction equal to the filter's)."""

    def __post_init__(self) -> None:
        self.paths = _paths(self.paths)
        require(self.count is None or self.count >= 1, "--filter.controls.count must be >= 1")
        require(
            self.kind != "bank" or bool(self.paths),
            "--controls bank needs --filter.controls.paths DIR[,DIR...]",
        )


@dataclass
class FilterConfig:
    """Retrain without one tail of each query's score ranking."""

    direction: Literal["proponents", "detractors"] = "proponents"
    """Which end of the ranking to remove: proponents (lower the loss) or detractors."""
    fraction: float = 0.01
    """Fraction of the eligible documents removed per query."""
    controls: ControlsConfig = field(default_factory=ControlsConfig)

    def __post_init__(self) -> None:
        require(0 < self.fraction <= 1, f"--filter.fraction must be in (0, 1], got {self.fraction}")

    @property
    def name(self) -> str:
        """bergson's name of the method, which names its CSV (``filter_proponents.csv``)."""
        return f"filter-{self.direction}"


@dataclass
class WeightStepConfig:
    """Retrain with document weights 1 - lr * score and compare with the first-order prediction."""

    lrs: list[float] = field(default_factory=lambda: [1.0])
    """Step sizes of the data-weight step, one retrain each."""

    def __post_init__(self) -> None:
        self.lrs = [float(x) for x in self.lrs]
        require(bool(self.lrs), "--lrs needs at least one step size")


@dataclass
class ValidateConfig:
    """Everything ``bergson-ray validate`` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    scores: str = ""
    """Score directory to validate (ours or bergson's; signs read from its config.yaml)."""
    higher_is_better: bool | None = None
    """Override the score sign: true = higher scores help the query (None = read from --scores)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    """The query set (flags --query.*); an empty --query.dataset means the training data."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    method: Method = "lds"
    """Validation method: lds (leave-k-out correlation), filter (remove a tail) or weight_step."""
    lds: LdsConfig = field(default_factory=LdsConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    weight_step: WeightStepConfig = field(default_factory=WeightStepConfig)
    subset_weight: float = 0.0
    """Training weight of a subset's documents in its retrain (0 = leave them out)."""
    exclude_zero_scores: bool = False
    """Leave documents whose scores are all zero out of every subset."""
    save_models: bool = False
    """Save each retrained model as a bank (retrained/base, retrained/subset_<i>) for later reuse."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        require(self.method in ("lds", "filter", "weight_step"), f"unknown --method {self.method!r}")
        if self.save_models and self.method == "lds":
            require(
                self.lds.subsets == "retrain",
                "--save_models saves retrained models; --subsets bank retrains nothing",
            )

    def query_data(self) -> DataConfig:
        """The query set: --query.*, or the training data as bergson defaults it."""
        return self.query if self.query.dataset else self.data


LEGACY_KEYS = frozenset(
    {"num_subsets", "subset_fraction", "subsets", "subset_start", "subset_stop",
     "weight_lrs", "controls", "retrained_dir"}
)
"""bergson's flat validation keys before the method sub-configs (still accepted there)."""


def _paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p for p in value.split(",") if p]
    return list(value or [])


def migrate_validation(obj: dict[str, Any]) -> dict[str, Any]:
    """bergson's validation keys -> our ``method``/``lds``/``filter``/``weight_step``.

    Accepts bergson 2.5.1's ``method: {kind: lds|filter|weight_step, ...}`` and the older
    flat keys (``num_subsets``, ``subset_fraction``, ``subsets``, ``subset_start``,
    ``subset_stop``, ``weight_lrs``, ``controls``, ``retrained_dir``, ``method:
    filter-proponents``); other keys pass through unchanged.
    """
    obj = dict(obj)
    method = obj.get("method")
    legacy = LEGACY_KEYS & set(obj)
    if isinstance(method, dict):
        if legacy:
            raise BadInputError(f"cannot mix a nested method with the old keys {sorted(legacy)}")
        body = dict(method)
        kind = body.pop("kind", "lds")
        if kind not in ("lds", "filter", "weight_step"):
            raise BadInputError(f"method.kind must be lds, filter or weight_step, got {kind!r}")
        if kind == "filter" and isinstance(body.get("controls"), dict):
            controls = dict(body["controls"])
            if "controls" in controls:  # bergson's alias of kind
                controls["kind"] = controls.pop("controls")
            body["controls"] = controls
        obj["method"] = kind
        obj[kind] = body
        return obj
    if method in (None, "lds", "filter", "weight_step") and not legacy:
        return obj
    method = obj.pop("method", "lds") or "lds"
    old = {k: obj.pop(k) for k in legacy}
    count = old.get("num_subsets", 100)
    fraction = old.get("subset_fraction", 0.0)
    paths = _paths(old.get("retrained_dir"))
    if method == "lds":
        if old.get("weight_lrs") and not paths:
            obj["method"], obj["weight_step"] = "weight_step", {"lrs": list(old["weight_lrs"])}
            return obj
        obj["method"] = "lds"
        obj["lds"] = {
            "subsets": "bank" if paths else "retrain", "paths": paths, "count": count,
            "fraction": fraction, "manifest": old.get("subsets", "") or "",
            "start": old.get("subset_start", 0), "stop": old.get("subset_stop"),
        }
        return obj
    if method not in ("filter-proponents", "filter-detractors"):
        raise BadInputError(f"unknown validation method {method!r}")
    if fraction == 0:
        if count <= 0:
            raise BadInputError("subset_fraction must be positive when num_subsets is 0")
        fraction = 1 / count
    mode = old.get("controls", "auto")
    if mode not in ("auto", "load", "retrain", "skip"):
        raise BadInputError(f"unknown legacy controls mode {mode!r}")
    if mode == "load" and not paths:
        raise BadInputError("controls: load needs retrained_dir")
    if mode == "skip":
        controls: dict[str, Any] = {"kind": "none"}
    elif paths and mode != "retrain":
        controls = {"kind": "bank", "paths": paths, "count": None}
    elif count > 0:
        controls = {"kind": "retrain", "count": count}
    else:
        controls = {"kind": "none"}
    obj["method"] = "filter"
    obj["filter"] = {
        "direction": method.removeprefix("filter-"), "fraction": fraction, "controls": controls,
    }
    return obj
