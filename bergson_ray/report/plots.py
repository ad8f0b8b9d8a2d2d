"""The report's figures as PNG files (matplotlib, Agg canvas, no pyplot state).

Every function takes plain arrays and a path, draws one figure and saves it; nothing
here reads runs. Figures are built with :class:`matplotlib.figure.Figure` directly, so
no GUI backend is touched and nothing global changes in the calling process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError

INSTALL_HINT = (
    "the report needs matplotlib, which is not installed: pip install 'bergson_ray[report]'"
)
DPI = 100


def require_matplotlib() -> None:
    """Fail with one sentence, before anything is read or written, without matplotlib."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise BadInputError(INSTALL_HINT) from None


def _figure(width: float = 6.0, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", bbox_inches="tight")  # keeps outside legends
    return path


def histogram(values: np.ndarray, path: Path, title: str, xlabel: str = "score") -> Path:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v):
        ax.hist(v, bins=min(50, max(5, int(math.sqrt(len(v))))), color="#4c72b0")
        ax.axvline(float(np.median(v)), color="#c44e52", linestyle="--", label="median")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no written scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return _save(fig, path)


def scatter_grid(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: Path,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One scatter per ``(title, x, y)`` panel, four to a row, with a least-squares line."""
    n = max(len(panels), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 2.8 * rows)
    for i, (title, x, y) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=12, color="#4c72b0")
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, icept = np.polyfit(x[ok], y[ok], 1)
            xs = np.array([x[ok].min(), x[ok].max()])
            ax.plot(xs, slope * xs + icept, color="#c44e52", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i >= n - cols:
            ax.set_xlabel(xlabel, fontsize=8)
    return _save(fig, path)


def bars(
    labels: Sequence[str], values: Sequence[float], path: Path, title: str, ylabel: str,
    xlabel: str = "",
) -> Path:
    """One bar per label, with the NaN-aware mean as a dashed line."""
    fig = _figure(min(14.0, max(4.0, 0.45 * len(labels) + 2)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    v = np.asarray(values, dtype=np.float64)
    pos = np.arange(len(labels))
    shown = np.nan_to_num(v)
    ax.bar(pos, shown, color=["#4c72b0" if x >= 0 else "#c44e52" for x in shown])
    if np.isfinite(v).any():
        ax.axhline(float(np.nanmean(v)), color="black", linestyle="--", linewidth=1,
                   label=f"mean {np.nanmean(v):.3f}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    _ticks(ax, pos, labels)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    return _save(fig, path)


def _ticks(ax: Any, pos: np.ndarray, labels: Sequence[str]) -> None:
    """Long or many labels are slanted so they do not run into each other."""
    slant = len(labels) > 12 or max((len(str(x)) for x in labels), default=0) > 6
    ax.set_xticks(pos)
    ax.set_xticklabels(list(labels), fontsize=8, rotation=30 if slant else 0,
                       ha="right" if slant else "center")


def grouped_bars(
    groups: Sequence[str], series: Sequence[str], matrix: np.ndarray, path: Path,
    title: str, ylabel: str, xlabel: str = "",
) -> Path:
    """``matrix[s, g]``: one bar per series within each group (e.g. runs within queries)."""
    m = np.asarray(matrix, dtype=np.float64)
    fig = _figure(min(14.0, max(5.0, 0.12 * m.size + 3)), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(series), 1)
    pos = np.arange(len(groups))
    for s, name in enumerate(series):
        ax.bar(pos + (s - (len(series) - 1) / 2) * width, np.nan_to_num(m[s]), width, label=name)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    _ticks(ax, pos, groups)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)


def latency_histogram(samples_ms: np.ndarray, percentiles: dict[int, float], path: Path,
                      title: str) -> Path:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    s = np.asarray(samples_ms, dtype=np.float64)
    ax.hist(s, bins=min(30, max(5, len(s) // 2)), color="#4c72b0")
    for (p, v), color in zip(sorted(percentiles.items()), ("#55a868", "#dd8452", "#c44e52", "#8172b3")):
        ax.axvline(v, color=color, linestyle="--", linewidth=1, label=f"p{p} {v:.1f} ms")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("queries")
    return _save(fig, path)
