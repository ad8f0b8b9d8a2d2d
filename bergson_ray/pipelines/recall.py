"""``recall``: grade an existing score dir on bergson's synthetic facts benchmark.

As bergson's ``recall`` does, this evaluates scores someone already computed; it does
not train or score (the usual recipe is ``train`` on the statements, ``build`` the
questions, ``score`` the statements: see ``docs/methods/recall.md``). Steps:

1. open the score dir (ours or bergson's) and settle its orientation;
2. generate the synthetic statements/questions datasets of ``--num_people/--seed``, or
   reuse the cached ones (``recall/generate.py``);
3. check one score row per statement and one column per question;
4. rank each question's gold statements (``recall/metrics.py``), all before any output;
5. write ``recall.csv``, ``summary.csv`` (bergson's files), ``summary.json`` and
   ``config.yaml`` into ``RUN_PATH.part`` and rename it to ``RUN_PATH``.

Nothing here needs Ray or a model: it is one pass over the score columns.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..config.coerce import as_config
from ..config.recall import RecallConfig
from ..config.sections import require
from ..recall.generate import ensure_recall_datasets, gold_documents
from ..recall.metrics import evaluate
from ..recall.report import summary_of, write_recall_csv, write_summary_csv
from ..recall.scores import check_shape, open_scores
from ..store.run_dir import RunDir

log = logging.getLogger(__name__)


def _bergson_view(cfg: RecallConfig) -> dict[str, Any]:
    """``config.yaml``'s step body in bergson's ``Recall`` shape (bergson and our pipeline
    files both replay it)."""
    return {
        "run_path": cfg.run.run_path,
        "scores": cfg.scores,
        "data": dataclasses.asdict(cfg.data),
        "k": cfg.k,
        "higher_is_better": cfg.higher_is_better,
    }


def recall(cfg: RecallConfig | dict | None = None, **overrides: Any) -> Path:
    """Run ``recall`` and return the committed run directory (metrics in its
    ``summary.json``)."""
    from datasets import load_from_disk

    cfg = as_config(RecallConfig, cfg, **overrides)
    require(bool(cfg.run.run_path), "recall needs a run path")
    scores = open_scores(cfg.scores, cfg.higher_is_better)
    data = cfg.data
    statements_path, questions_path = ensure_recall_datasets(
        data.data_dir, data.num_people, data.seed, data.single_paraphrase
    )
    statements = load_from_disk(str(statements_path))
    questions = load_from_disk(str(questions_path))
    check_shape(scores, len(statements), len(questions), str(statements_path), str(questions_path))
    if not scores.is_complete():
        log.warning("not every score in %s was written; the metrics may be off", cfg.scores)
    gold = gold_documents(
        statements["identifier"], statements["field"], questions["identifier"], questions["field"]
    )

    result = evaluate(scores.columns(), gold, cfg.k)  # one pass; may still reject NaN scores

    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    run.write_config(_bergson_view(cfg), command="recall")
    write_recall_csv(
        run.path / "recall.csv", result, questions["identifier"], questions["field"],
        questions["answer"],
    )
    write_summary_csv(run.path / "summary.csv", result, data.num_people)
    summary = {
        **summary_of(result, len(statements), data.num_people),
        "higher_is_better": scores.higher_is_better,
        "orientation": scores.orientation_source,
        "scores_complete": scores.is_complete(),
        "scores": str(cfg.scores),
        "statements": str(statements_path),
        "questions": str(questions_path),
    }
    run.write_summary(summary)
    log.info(
        "MRR %.4f, Recall@%d %.4f over %d questions",
        result.mrr, result.k, result.recall_at_k, result.num_queries,
    )
    return run.commit()


__all__ = ["recall"]
