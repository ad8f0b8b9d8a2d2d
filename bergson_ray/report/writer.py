"""``write_report``: runs in, one self-contained report directory out.

Everything is read and checked first (an unknown directory fails before anything is
written), then the page and its PNGs are written into a hidden temporary directory
beside the destination, which is renamed into place at the very end: a report that
fails midway leaves nothing behind, and an earlier report is only replaced by a
complete one. A directory is only ever replaced if it is itself a report (it holds
:data:`MARKER`), so ``--out`` pointed at the wrong place cannot delete anything.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInputError
from . import plots
from .html import Cell, Page
from .kinds import SCORE, Part, detect
from .latency import LatencyReport
from .score_report import ScoreReport, score_report
from .validate_report import Comparison, ValidateReport, compare, validate_report

log = logging.getLogger(__name__)

INDEX = "index.html"
MARKER = ".bergson_ray_report"
"""Written into every report; only a directory holding it may be replaced."""
REPORT_DIR = "report"


@dataclass
class Contents:
    """What one report shows, read before anything is written."""

    scores: list[ScoreReport] = field(default_factory=list)
    validations: list[ValidateReport] = field(default_factory=list)
    latency: LatencyReport | None = None

    @property
    def comparisons(self) -> list[Comparison]:
        return compare(self.validations)


def default_out(runs: Sequence[str | Path], latency: LatencyReport | None) -> Path:
    """``RUN/report`` for the first run; ``<service>_report`` for a service alone."""
    if runs:
        return Path(runs[0]) / REPORT_DIR
    if latency is not None:
        return Path(f"{latency.name}_report")
    raise BadInputError("give at least one RUN directory (or --service NAME) to report on")


def check_out(out: Path) -> None:
    """Refuse to replace anything that is not an earlier report."""
    if out.exists() and not (out.is_dir() and (out / MARKER).is_file()):
        raise BadInputError(
            f"{out} already exists and is not a report written by bergson-ray report; "
            "pass another --out"
        )


def read_contents(
    runs: Sequence[str | Path], top: int, max_queries: int, latency: LatencyReport | None = None
) -> Contents:
    if top < 1:
        raise BadInputError(f"--top must be at least 1, got {top}")
    if max_queries < 1:
        raise BadInputError(f"--max_queries must be at least 1, got {max_queries}")
    parts: list[Part] = [p for run in runs for p in detect(run)]  # all checked first
    contents = Contents(latency=latency)
    for part in parts:
        if part.kind == SCORE:
            contents.scores.append(score_report(part.path, top, max_queries))
        else:
            contents.validations.append(validate_report(part.path))
    _unique_labels(contents.validations)
    return contents


def _unique_labels(reports: list[ValidateReport]) -> None:
    """Two runs with the same name are told apart by their parent directory."""
    seen: dict[str, int] = {}
    for r in reports:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in reports:
        if seen[r.label] > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"


def write_report(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    top: int = 10,
    max_queries: int = 16,
    latency: LatencyReport | None = None,
) -> Path:
    """Write the report of ``runs`` (and of a measured service) to ``out`` (default
    ``RUN/report``); returns the report directory."""
    plots.require_matplotlib()
    out = Path(out) if out is not None else default_out(runs, latency)
    check_out(out)
    contents = read_contents(runs, top, max_queries, latency)
    if not (contents.scores or contents.validations or contents.latency):
        raise BadInputError("nothing to report")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        page = render(contents, tmp, max_queries)
        (tmp / INDEX).write_text(page.render(), encoding="utf-8")
        (tmp / MARKER).write_text("bergson-ray report\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("report written to %s", out / INDEX)
    return out


def _commit(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier report is moved aside first, removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ page


def render(contents: Contents, root: Path, max_queries: int) -> Page:
    """Draw every figure into ``root`` and return the page that shows them."""
    page = Page("bergson-ray report")
    for i, rep in enumerate(contents.scores):
        render_scores(page, rep, root, f"s{i}")
    for i, rep in enumerate(contents.validations):
        render_validation(page, rep, root, f"v{i}", max_queries)
    for i, comp in enumerate(contents.comparisons):
        render_comparison(page, comp, root, f"c{i}")
    if contents.latency is not None:
        render_latency(page, contents.latency, root)
    return page


def _helpful(higher_is_better: bool | None) -> str:
    if higher_is_better is None:
        return "unknown (config.yaml records no higher_is_better)"
    if higher_is_better:
        return "highest scores help the query most (higher_is_better: true)"
    return "lowest scores help the query most (loss-signed, higher_is_better: false)"


def render_scores(page: Page, rep: ScoreReport, root: Path, prefix: str) -> None:
    page.heading(2, f"Scores: {rep.path}", prefix)
    page.key_values({
        "written by": rep.command,
        "rows": f"{rep.num_rows}" + (" (token rows)" if rep.per_token else ""),
        "query columns": rep.num_scores,
        "score dtype": rep.dtype,
        "direction": _helpful(rep.higher_is_better),
        "written cells": f"{100 * rep.written_fraction:.1f}%",
        "document text": rep.text_source,
        **{f"summary.json: {k}": v for k, v in rep.summary.items()},
    })
    for q in rep.queries:
        page.heading(3, f"Query {q.query}", f"{prefix}-q{q.query}")
        page.key_values(q.stats)
        name = f"{prefix}_hist_q{q.query}.png"
        plots.histogram(q.values, root / name, f"query {q.query}: scores of {len(q.values)} rows")
        page.image(name, f"histogram of the scores of query {q.query}")
        for side, rows, title in (("top", q.top, "Highest"), ("bottom", q.bottom, "Lowest")):
            page.para(f"{title} {len(rows)} scores")
            cols = ["rank", "row", "document", "score", "text"]
            if rep.per_token:
                cols.insert(3, "token")
            body, attrs = [], []
            for r in rows:
                cells = [r.rank, r.row, r.doc, Cell.num(r.score), Cell.text(r.text)]
                if rep.per_token:
                    cells.insert(3, r.token)
                body.append(cells)
                attrs.append({"query": q.query, "side": side, "rank": r.rank, "row": r.row,
                              "score": repr(r.score)})
            page.table(cols, body, attrs, cls="ranked")
    if rep.omitted_queries:
        page.para(
            f"{rep.omitted_queries} more query column(s) not shown (raise --max_queries).",
            note=True,
        )


def render_validation(page: Page, rep: ValidateReport, root: Path, prefix: str,
                      max_queries: int) -> None:
    page.heading(2, f"Validation: {rep.label}", prefix)
    items = {"run": str(rep.path), "validation method": rep.method}
    if rep.scores_path:
        items["scores"] = rep.scores_path
    if rep.bank_label:
        items["subsets"] = rep.bank_label
    if rep.lds:
        items["mean LDS (Spearman)"] = rep.mean_lds
    items.update({f"summary.json: {k}": v for k, v in rep.summary.items()})
    page.key_values(items)
    for note in rep.notes:
        page.para(note, note=True)
    if rep.lds:
        page.heading(3, "LDS per query")
        page.table(
            ["part", "query", "Spearman", "p", "Pearson", "p", "N", "baseline loss"],
            [[r.part or "all", r.query, r.spearman, r.spearman_p, r.pearson, r.pearson_p, r.n,
              r.baseline] for r in rep.lds],
            [{"query": r.query, "part": r.part, "spearman": repr(r.spearman)} for r in rep.lds],
            cls="lds",
        )
        shown = rep.lds_of()
        name = f"{prefix}_lds.png"
        plots.bars([str(r.query) for r in shown], [r.spearman for r in shown], root / name,
                   f"{rep.label}: LDS per query", "Spearman", "query")
        page.image(name, "LDS per query")
    if rep.points:
        page.heading(3, "Predicted vs actual loss change")
        pts = rep.points[:max_queries]
        name = f"{prefix}_scatter.png"
        plots.scatter_grid([(f"query {p.query}", p.predicted, p.actual) for p in pts],
                           root / name, "predicted (score sum)", "actual (loss change)")
        page.image(name, "predicted vs actual loss change per query")
        page.para(
            "One point per retrained subset: predicted = summed loss-signed scores of the "
            "removed documents, actual = baseline loss minus the retrained model's loss.",
            note=True,
        )
        if len(rep.points) > len(pts):
            page.para(f"{len(rep.points) - len(pts)} more queries not plotted.", note=True)
    if rep.weight_step:
        page.heading(3, "Weight step: predicted vs actual loss change")
        pts = rep.weight_step[:max_queries]
        name = f"{prefix}_weight_step.png"
        plots.scatter_grid([(f"query {p.query}", p.predicted, p.actual) for p in pts],
                           root / name, "predicted_diff", "diff")
        page.image(name, "weight step predicted vs actual")
    for t in rep.tables:
        page.heading(3, t.name)
        page.table(t.columns, t.rows)
        if t.total_rows > len(t.rows):
            page.para(f"first {len(t.rows)} of {t.total_rows} rows", note=True)


def render_comparison(page: Page, comp: Comparison, root: Path, prefix: str) -> None:
    page.heading(2, f"Comparison on {comp.label}", prefix)
    qs, m = comp.queries, comp.matrix()
    page.table(
        ["run", "scores", "mean LDS", *(f"q{q}" for q in qs)],
        [[r.label, r.scores_path or "", r.mean_lds, *m[i].tolist()]
         for i, r in enumerate(comp.runs)],
        [{"run": r.label, "mean": repr(r.mean_lds)} for r in comp.runs],
        cls="compare",
    )
    labels = [r.label for r in comp.runs]
    name = f"{prefix}_mean.png"
    plots.bars(labels, [r.mean_lds for r in comp.runs], root / name, "mean LDS per run",
               "Spearman")
    page.image(name, "mean LDS per run")
    name = f"{prefix}_per_query.png"
    plots.grouped_bars([str(q) for q in qs], labels, m, root / name, "LDS per query and run",
                       "Spearman", "query")
    page.image(name, "LDS per query and run")


def render_latency(page: Page, lat: LatencyReport, root: Path) -> None:
    page.heading(2, f"Query latency: {lat.name}", "latency")
    page.para(lat.what)
    page.key_values({f"service: {k}": v for k, v in lat.info.items()})
    pct = lat.percentiles
    page.table(
        ["", *(f"p{p}" for p in pct), "mean", "min", "max", "queries", "warm-up"],
        [["ms", *pct.values(), lat.stats["mean"], lat.stats["min"], lat.stats["max"],
          lat.stats["count"], lat.warmup_ms]],
        [{f"p{p}": repr(v) for p, v in pct.items()}],
        cls="latency",
    )
    name = "latency.png"
    plots.latency_histogram(lat.samples_ms, pct, root / name, f"{lat.name}: query latency")
    page.image(name, "query latency histogram")
