"""Leave-k-out validation of attribution scores: the pure parts (no Ray).

* ``subsets.py`` — subsets drawn exactly as bergson draws them, ``subsets.json``;
* ``scores.py`` — score stores read as loss-signed ``[docs, queries]`` matrices;
* ``losses.py`` — per-retrain query losses, one atomically written file each;
* ``bank.py`` — bergson's bank layout (``retrained/base``, ``retrained/subset_<i>``);
* ``lds.py`` / ``stats.py`` — the LDS and its Spearman/Pearson statistics;
* ``csv_out.py`` — ``validation.csv``, ``summary.csv`` and the filter CSVs, as bergson's.

The Ray side is ``actors/retrain_worker.py`` and ``pipelines/validate.py``.
"""

from .lds import LdsResult, compute_lds
from .losses import LossBook
from .scores import LossSignedScores, load_loss_signed
from .stats import pearson, spearman
from .subsets import draw_subsets, load_subsets, save_subsets

__all__ = [
    "LdsResult",
    "LossBook",
    "LossSignedScores",
    "compute_lds",
    "draw_subsets",
    "load_loss_signed",
    "load_subsets",
    "pearson",
    "save_subsets",
    "spearman",
]
