"""Gradient-processor files saved beside every gradient store (bergson-spec §2.2).

A store's gradients only mean something together with how they were made: the
projection settings, the optimizer-moment normalizers and, after preconditioning,
the Hessians. bergson saves those as ``processor_config.yaml`` plus ``.pth`` pickles.

What we write:

* ``processor_config.yaml`` with bergson's keys in bergson's order, so bergson's
  ``GradientProcessor.load_config`` reads it unchanged;
* tensors as safetensors (``normalizers.safetensors``, ``hessians.safetensors``,
  ``hessians_eigen.safetensors``), never pickles;
* ``total_processed.json`` and, for bergson, ``total_processed.pt``.

Optionally (``write_pth=True`` in :func:`save_processor`) we also write bergson's
``normalizers.pth`` / ``hessians.pth`` / ``hessians_eigen.pth``. ``torch.save`` of
plain dicts of tensors and strings is safe to *write*, and bergson's
``GradientProcessor.load`` requires those files to exist.

What we read: ours first, then bergson's ``.pth`` files (including the legacy
``preconditioners*.pth`` names), always with ``torch.load(weights_only=True)`` so a
hostile file cannot run code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bergson_ray.errors import StoreError
from bergson_ray.store.files import load_tensors_only, read_yaml

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.yaml"
NORMALIZERS_ST = "normalizers.safetensors"
NORMALIZERS_PTH = "normalizers.pth"
HESSIANS_ST = "hessians.safetensors"
HESSIANS_PTH = ("hessians.pth", "preconditioners.pth")
EIGEN_ST = "hessians_eigen.safetensors"
EIGEN_PTH = ("hessians_eigen.pth", "preconditioners_eigen.pth")
TOTAL_PROCESSED_JSON = "total_processed.json"
TOTAL_PROCESSED_PT = "total_processed.pt"

NORMALIZER_KINDS = ("AdamNormalizer", "AdafactorNormalizer")

PROJECTION_VERSION = 2
"""Default version of the random projection matrices recorded in ``processor_config.yaml``.

bergson numbers its projection-matrix generators: version 1 is the md5 -> PCG64
Rademacher / torch-normal scheme of bergson-spec §3.3; bergson 2.5 generates version 2
(Philox4x32-10 counter-based) and refuses to score against a projected store whose
version differs. Both are implemented in ``bergson_ray.gradients.projection``; the
version a store was built with comes from ``GradientConfig.projection_version`` (via
:meth:`ProcessorConfig.from_gradient_config`), so the file always records the generator
that actually produced the rows. Files without the key are version 1 (older bergson).
"""

_LEGACY_DEFAULTS = {
    "projection_type": "normal",
    "include_bias": False,
    "projection_scale": "row_norm",
    "projection_version": 1,
}
"""Values bergson assumes for keys missing from configs written by older versions."""

_ST_FORMAT = "bergson_ray.normalizers.v1"


@dataclass
class ProcessorConfig:
    """Projection settings of a gradient store, in ``processor_config.yaml`` key order.

    The order of the fields is bergson's ``asdict(GradientProcessor)`` order minus the
    tensor fields, so the YAML we write is the YAML bergson writes.
    """

    projection_dim: int | None = None
    """``None`` (bergson's spelling of "no projection"); 0 is normalised to ``None``."""
    reshape_to_square: bool = False
    projection_type: str = "rademacher"
    projection_target: str = "per_module"
    projection_scale: str = "jl"
    include_bias: bool = False
    projection_seed: int | None = None
    """Appended to projection identifiers as ``/seed<n>`` by bergson >= 2.5 when set."""
    projection_version: int = PROJECTION_VERSION

    def __post_init__(self) -> None:
        if self.projection_dim == 0:
            self.projection_dim = None
        if self.projection_dim is None:
            # bergson does the same: without a projection there is nothing global about it.
            self.projection_target = "per_module"

    @classmethod
    def from_gradient_config(cls, grad: Any, **overrides: Any) -> ProcessorConfig:
        """Build from a :class:`bergson_ray.config.GradientConfig` (duck-typed)."""
        values = {f.name: getattr(grad, f.name) for f in fields(cls) if hasattr(grad, f.name)}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "") -> ProcessorConfig:
        """Parse a YAML mapping, filling keys older bergson versions did not write."""
        if not isinstance(raw, Mapping):
            raise StoreError(
                f"{source or PROCESSOR_CONFIG}: expected a mapping of processor settings, "
                f"found {type(raw).__name__}"
            )
        values = dict(_LEGACY_DEFAULTS)
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in raw.items() if k in known})
        ignored = sorted(set(raw) - known)
        if ignored:
            logger.debug("%s: ignoring unknown processor keys %s", source, ignored)
        return cls(**values)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROCESSOR_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            yaml.safe_dump(asdict(self), f, sort_keys=False)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ProcessorConfig | None:
        """Read ``processor_config.yaml`` from ``directory``; ``None`` if there is none."""
        path = Path(directory) / PROCESSOR_CONFIG
        if not path.is_file():
            return None
        return cls.from_dict(read_yaml(path) or {}, source=str(path))


@dataclass
class NormalizerState:
    """One module's optimizer-moment normalizer, as stored (no math here).

    ``kind`` is bergson's class name (``AdamNormalizer``: ``weight_avg_sq [O, I]``,
    optional ``bias_avg_sq [O]``; ``AdafactorNormalizer``: ``row [O]``, ``col [I]``,
    optional ``bias_avg_sq [O]``). The gradient engine turns it into math.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZER_KINDS:
            raise StoreError(
                f"unknown normalizer class {self.kind!r}; expected one of {NORMALIZER_KINDS}"
            )
        if "avg_sq" in self.tensors:  # renamed in bergson; accept old files
            self.tensors["weight_avg_sq"] = self.tensors.pop("avg_sq")


# --------------------------------------------------------------------------- helpers


def _torch_load(path: Path) -> Any:
    """``torch.load`` that can never execute code from the file."""
    return load_tensors_only(path)


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"cannot read {path} as safetensors: {e}") from e
    return tensors, metadata


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _split_key(key: str, path: Path) -> tuple[str, str]:
    """``"<module>/<field>"`` -> (module, field). Module names never contain ``/``."""
    module, sep, name = key.rpartition("/")
    if not sep or not module:
        raise StoreError(f"{path}: tensor key {key!r} is not of the form '<module>/<field>'")
    return module, name


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


# ------------------------------------------------------------------------ normalizers


def save_normalizers(
    directory: str | Path,
    normalizers: Mapping[str, NormalizerState],
    *,
    write_pth: bool = False,
) -> Path:
    """Write ``normalizers.safetensors`` (and bergson's ``normalizers.pth`` if asked).

    Keys are ``<module>/<field>``; the safetensors metadata entry ``classes`` is a JSON
    object module -> normalizer class, since safetensors holds only tensors.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    for module, state in normalizers.items():
        classes[module] = state.kind
        for name, tensor in state.tensors.items():
            flat[f"{module}/{name}"] = _cpu_contiguous(tensor)
    path = directory / NORMALIZERS_ST
    save_file(flat, str(path), metadata={"format": _ST_FORMAT, "classes": json.dumps(classes)})
    if write_pth:
        pth = {
            module: {
                "__class__": state.kind,
                **{k: _cpu_contiguous(v) for k, v in state.tensors.items()},
            }
            for module, state in normalizers.items()
        }
        torch.save(pth, directory / NORMALIZERS_PTH)
    return path


def load_normalizers(directory: str | Path) -> dict[str, NormalizerState]:
    """Read ours (safetensors) or bergson's ``normalizers.pth``; ``{}`` if neither exists."""
    directory = Path(directory)
    st = directory / NORMALIZERS_ST
    if st.is_file():
        tensors, metadata = _load_safetensors(st)
        try:
            classes = json.loads(metadata.get("classes", "{}"))
        except json.JSONDecodeError as e:
            raise StoreError(f"{st}: metadata entry 'classes' is not JSON: {e}") from e
        grouped: dict[str, dict[str, torch.Tensor]] = {m: {} for m in classes}
        for key, tensor in tensors.items():
            module, name = _split_key(key, st)
            if module not in classes:
                raise StoreError(f"{st}: tensor {key!r} belongs to no module listed in 'classes'")
            grouped[module][name] = tensor
        return {m: NormalizerState(classes[m], grouped[m]) for m in classes}

    pth = directory / NORMALIZERS_PTH
    if not pth.is_file():
        return {}
    raw = _torch_load(pth)
    if not isinstance(raw, Mapping):
        raise StoreError(
            f"{pth}: expected a dict module -> normalizer state, found {type(raw).__name__}"
        )
    out: dict[str, NormalizerState] = {}
    for module, state in raw.items():
        if not isinstance(state, Mapping) or not isinstance(state.get("__class__"), str):
            raise StoreError(f"{pth}: entry {module!r} has no '__class__' name")
        tensors = {
            k: v for k, v in state.items() if k != "__class__" and isinstance(v, torch.Tensor)
        }
        out[str(module)] = NormalizerState(state["__class__"], tensors)
    return out


# --------------------------------------------------------------------------- hessians


def save_hessians(
    directory: str | Path, hessians: Mapping[str, torch.Tensor], *, write_pth: bool = False
) -> Path:
    """Dense per-module ``[d, d]`` second-moment matrices -> ``hessians.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {m: _cpu_contiguous(h) for m, h in hessians.items()}
    path = directory / HESSIANS_ST
    save_file(flat, str(path))
    if write_pth:
        torch.save(flat, directory / HESSIANS_PTH[0])
    return path


def load_hessians(directory: str | Path) -> dict[str, torch.Tensor]:
    """Ours, else bergson's ``hessians.pth``, else legacy ``preconditioners.pth``; else ``{}``."""
    directory = Path(directory)
    st = directory / HESSIANS_ST
    if st.is_file():
        return _load_safetensors(st)[0]
    pth = _first_existing(directory, HESSIANS_PTH)
    if pth is None:
        return {}
    raw = _torch_load(pth)
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise StoreError(f"{pth}: expected a dict module -> [d, d] tensor")
    return {str(k): v for k, v in raw.items()}


def save_hessians_eigen(
    directory: str | Path,
    eigen: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    write_pth: bool = False,
) -> Path:
    """``module -> (eigenvalues [d], eigenvectors [d, d])`` as ``<module>/eigenvalues`` etc."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for module, (values, vectors) in eigen.items():
        flat[f"{module}/eigenvalues"] = _cpu_contiguous(values)
        flat[f"{module}/eigenvectors"] = _cpu_contiguous(vectors)
    path = directory / EIGEN_ST
    save_file(flat, str(path))
    if write_pth:
        pth = {m: (_cpu_contiguous(v), _cpu_contiguous(q)) for m, (v, q) in eigen.items()}
        torch.save(pth, directory / EIGEN_PTH[0])
    return path


def load_hessians_eigen(directory: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ours, else bergson's ``hessians_eigen.pth`` / ``preconditioners_eigen.pth``; else ``{}``."""
    directory = Path(directory)
    st = directory / EIGEN_ST
    if st.is_file():
        tensors = _load_safetensors(st)[0]
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, name = _split_key(key, st)
            parts.setdefault(module, {})[name] = tensor
        out = {}
        for module, p in parts.items():
            if set(p) != {"eigenvalues", "eigenvectors"}:
                raise StoreError(
                    f"{st}: module {module!r} needs eigenvalues and eigenvectors, found {sorted(p)}"
                )
            out[module] = (p["eigenvalues"], p["eigenvectors"])
        return out
    pth = _first_existing(directory, EIGEN_PTH)
    if pth is None:
        return {}
    raw = _torch_load(pth)
    if not isinstance(raw, Mapping):
        raise StoreError(f"{pth}: expected a dict module -> (eigenvalues, eigenvectors)")
    out = {}
    for module, pair in raw.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise StoreError(f"{pth}: entry {module!r} is not an (eigenvalues, eigenvectors) pair")
        out[str(module)] = (pair[0], pair[1])
    return out


# -------------------------------------------------------------------- total_processed


def write_total_processed(directory: str | Path, total: int) -> None:
    """Number of gradient-carrying token positions, as JSON (ours) and ``.pt`` (bergson's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOTAL_PROCESSED_JSON).write_text(
        json.dumps({"total_processed": int(total)}) + "\n"
    )
    torch.save(torch.tensor(int(total), dtype=torch.int64), directory / TOTAL_PROCESSED_PT)


def read_total_processed(directory: str | Path) -> int | None:
    """Ours (JSON) or bergson's ``total_processed.pt``; ``None`` if neither exists."""
    directory = Path(directory)
    js = directory / TOTAL_PROCESSED_JSON
    if js.is_file():
        try:
            return int(json.loads(js.read_text())["total_processed"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f'{js}: expected {{"total_processed": <int>}}: {e}') from e
    pt = directory / TOTAL_PROCESSED_PT
    if not pt.is_file():
        return None
    value = _torch_load(pt)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    if isinstance(value, int):
        return value
    raise StoreError(f"{pt}: expected a 0-d integer tensor, found {type(value).__name__}")


# ------------------------------------------------------------------------ everything


@dataclass
class ProcessorState:
    """All processor files of one directory, loaded."""

    config: ProcessorConfig | None
    normalizers: dict[str, NormalizerState] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians_eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def save_processor(
    directory: str | Path,
    config: ProcessorConfig,
    *,
    normalizers: Mapping[str, NormalizerState] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    hessians_eigen: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    write_pth: bool = True,
) -> None:
    """Save every processor file. ``write_pth`` (default on) also writes bergson's
    ``.pth`` triple so bergson's ``GradientProcessor.load`` accepts the directory."""
    config.save(directory)
    save_normalizers(directory, normalizers or {}, write_pth=write_pth)
    save_hessians(directory, hessians or {}, write_pth=write_pth)
    save_hessians_eigen(directory, hessians_eigen or {}, write_pth=write_pth)


def load_processor(directory: str | Path) -> ProcessorState:
    return ProcessorState(
        config=ProcessorConfig.load(directory),
        normalizers=load_normalizers(directory),
        hessians=load_hessians(directory),
        hessians_eigen=load_hessians_eigen(directory),
    )
