"""bergson's synthetic factual-recall benchmark: the pure parts (no Ray, no model).

* ``facts.py`` — people, their facts and the paraphrases stating them (built-in name
  lists and templates, written into ``data_dir`` in bergson's layout);
* ``generate.py`` — the cached statements/questions datasets and each question's gold
  statements;
* ``scores.py`` — a score dir (ours or bergson's) as oriented columns;
* ``metrics.py`` — gold ranks, MRR, Recall@k, strict Recall@k;
* ``report.py`` — ``recall.csv`` / ``summary.csv`` and the terminal table.

The command is ``pipelines/recall.py``. (Nothing is imported here, so that
``python -m bergson_ray.recall.generate`` runs its module exactly once.)
"""
