"""The two recall datasets, generated once per identity and cached (bergson's layout).

* **statements** — one row per paraphrase of a (person, field) fact, columns
  ``answer, fact, field, identifier, question, template``: the corpus a model is trained
  on and scored over (``--prompt_column fact``);
* **questions** — one row per (person, field), columns ``question, answer, text, field,
  identifier`` (``text`` is ``"<question> <answer>"``): the queries.

Both are ``save_to_disk`` directories under ``data_dir`` named by their identity,
``statements_<N>p_seed<S>[_single].hf`` / ``questions_...hf``, so datasets of different
sizes coexist and a run can always name exactly what it scored. Generation is pure
Python and seeded (:mod:`.facts`); the built-in name lists and templates are written into
``data_dir`` first where missing, so the directory is self-contained and bergson's own
``recall`` (which reads ``data_dir/names`` and ``data_dir/templates``) makes the same rows.

Run it alone, like bergson's module::

    python -m bergson_ray.recall.generate --num_people 1000 --seed 0 --data_dir data
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .facts import fact_rows, generate_profiles, read_sources, write_sources

log = logging.getLogger(__name__)


def dataset_paths(
    data_dir: str | os.PathLike, num_people: int, seed: int, single_paraphrase: bool = False
) -> tuple[Path, Path]:
    """``(statements, questions)`` paths of one dataset identity (bergson's names)."""
    tag = f"{num_people}p_seed{seed}" + ("_single" if single_paraphrase else "")
    root = Path(data_dir)
    return root / f"statements_{tag}.hf", root / f"questions_{tag}.hf"


def build_rows(
    data_dir: str | os.PathLike, num_people: int, seed: int, single_paraphrase: bool = False
) -> tuple[list[dict], list[dict]]:
    """The statement and question rows of one identity, from ``data_dir``'s lists."""
    if num_people < 1:
        raise BadInputError(f"--num_people must be >= 1, got {num_people}")
    names, templates = read_sources(data_dir)
    people = generate_profiles(names, num_people, seed)
    statements = list(fact_rows(people, templates, single_paraphrase=single_paraphrase))
    questions: list[dict] = []
    seen: set[tuple[int, str]] = set()
    for row in statements:
        key = (row["identifier"], row["field"])
        if key in seen:
            continue
        seen.add(key)
        questions.append(
            {
                "question": row["question"],
                "answer": row["answer"],
                "text": f"{row['question']} {row['answer']}",
                "field": row["field"],
                "identifier": row["identifier"],
            }
        )
    return statements, questions


def _save_atomically(rows: list[dict], path: Path) -> None:
    """``save_to_disk`` into a temporary sibling, then rename it into place (quietly)."""
    import datasets

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    if path.exists():  # half a pair from an interrupted earlier generation
        shutil.rmtree(path)
    os.replace(tmp, path)


def ensure_recall_datasets(
    data_dir: str | os.PathLike, num_people: int, seed: int, single_paraphrase: bool = False
) -> tuple[Path, Path]:
    """The cached ``(statements, questions)`` dirs, generated first if either is missing."""
    statements_path, questions_path = dataset_paths(data_dir, num_people, seed, single_paraphrase)
    if statements_path.is_dir() and questions_path.is_dir():
        log.info("reusing the recall datasets %s and %s", statements_path, questions_path)
        return statements_path, questions_path
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for path in write_sources(data_dir):
        log.info("wrote the built-in list %s", path)
    statements, questions = build_rows(data_dir, num_people, seed, single_paraphrase)
    _save_atomically(statements, statements_path)
    _save_atomically(questions, questions_path)
    log.info(
        "generated %d statements and %d questions for %d people in %s",
        len(statements), len(questions), num_people, data_dir,
    )
    return statements_path, questions_path


def gold_documents(
    statement_ids: Sequence[int],
    statement_fields: Sequence[str],
    question_ids: Sequence[int],
    question_fields: Sequence[str],
) -> list[np.ndarray]:
    """For each question, the statement rows that state its fact (every paraphrase of the
    same person and field), ascending."""
    rows: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(statement_ids, statement_fields)):
        rows[(int(key[0]), str(key[1]))].append(i)
    gold = []
    for q, (ident, field) in enumerate(zip(question_ids, question_fields)):
        found = rows.get((int(ident), str(field)))
        if not found:
            raise BadInputError(
                f"question {q} (person {ident}, {field}) has no statement in the statements "
                "dataset; the two datasets do not belong together"
            )
        gold.append(np.asarray(found, dtype=np.int64))
    return gold


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bergson_ray.recall.generate``: write the datasets, print their paths."""
    p = argparse.ArgumentParser(
        prog="python -m bergson_ray.recall.generate",
        description="Generate (or reuse) the synthetic facts datasets of `bergson-ray recall`.",
    )
    p.add_argument("--num_people", type=int, default=1000, help="people to generate (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    p.add_argument(
        "--single_paraphrase", type=_bool, nargs="?", const=True, default=False,
        help="keep one statement per person and field (default: false)",
    )
    p.add_argument("--data_dir", default="data", help="lists and cached datasets (default: data)")
    args = p.parse_args(argv)
    try:
        paths = ensure_recall_datasets(
            args.data_dir, args.num_people, args.seed, args.single_paraphrase
        )
    except BadInputError as err:
        p.exit(2, f"error: {err}\n")
    print(f"statements: {paths[0]}\nquestions:  {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
