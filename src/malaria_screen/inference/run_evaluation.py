"""What ``train`` does with a finished run folder: count-calibrate its threshold, score a split.

Both load the run with :class:`~malaria_screen.inference.Predictor` (the same path as ``predict``
and ``evaluate``), so the threshold and the metrics are those of the saved model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import CellSet
from malaria_screen.data.patients import listed_in_groups
from malaria_screen.evaluation.metrics import count_matched_threshold
from malaria_screen.evaluation.report import write_evaluation
from malaria_screen.inference.predictor import Predictor

__all__ = ["CountThreshold", "calibrate_count_threshold", "evaluate_split"]


@dataclass(frozen=True)
class CountThreshold:
    """A count-matched threshold and the validation cells it was set on.

    Attributes
    ----------
    threshold : float
        P(Parasitized) at or above which a cell is called Parasitized.
    n_cells, n_called, n_parasitized : int
        Validation cells used, those called Parasitized at ``threshold``, those that are.
    """

    threshold: float
    n_cells: int
    n_called: int
    n_parasitized: int


def calibrate_count_threshold(run_dir: str | Path, cells: CellSet, idx: np.ndarray, *,
                              groups_csv: str | Path | None = None) -> CountThreshold:
    """Set the run's threshold so that as many of the cells ``idx`` are called Parasitized as are.

    :func:`~malaria_screen.evaluation.metrics.count_matched_threshold` on the run's probabilities;
    the run's ``config.json`` is rewritten with the new threshold.

    Parameters
    ----------
    run_dir : str or Path
        A trained run folder.
    cells : CellSet
        The run's cells.
    idx : (n,) int ndarray
        The validation cells to calibrate on.
    groups_csv : str or Path, optional
        Only the cells of ``idx`` this CSV lists count (:func:`~malaria_screen.data.patients.listed_in_groups`):
        the annotated target-site crops, while NIH cells added for training keep their 50 %
        prevalence out of it.

    Returns
    -------
    CountThreshold

    Raises
    ------
    ValueError
        If ``idx`` is empty.
    """
    idx = np.asarray(idx, int)
    if groups_csv is not None:
        idx = idx[listed_in_groups(cells.relpaths, groups_csv)[idx]]
    if len(idx) == 0:
        raise ValueError("--threshold-rule val-count needs validation cells (--val-fraction > 0; listed in --groups "
                         "when given)")
    pred = Predictor.from_dir(run_dir)
    probs = pred.predict_proba_prepared(cells.subset(idx).images)[:, pred.positive_index]
    y = np.asarray(cells.labels)[idx] == cells.class_names.index(pred.class_names[pred.positive_index])
    t = count_matched_threshold(y, probs)
    path = Path(run_dir) / "config.json"
    TrainConfig.from_json(path).replace(threshold=t).to_json(path)
    return CountThreshold(float(t), len(y), int((probs >= t).sum()), int(y.sum()))


def evaluate_split(run_dir: str | Path, cells: CellSet, idx: np.ndarray, *, split_name: str) -> dict:
    """Score the run on the cells ``idx`` and write its evaluation files into ``run_dir``.

    :func:`~malaria_screen.evaluation.report.write_evaluation` (metrics with patient-bootstrap
    95 % intervals, per-patient table, ROC and confusion-matrix plots).

    ``run_dir`` and ``cells`` are as in :func:`calibrate_count_threshold`; ``idx`` are the cells to
    score (e.g. the test patients'), ``split_name`` is recorded in ``metrics.json``.

    Returns
    -------
    dict
        The metrics (``metrics.json``).

    Raises
    ------
    ValueError
        If the model has no Parasitized class.
    """
    pred = Predictor.from_dir(run_dir)
    if pred.positive_index is None:
        raise ValueError("evaluation needs a model with a Parasitized class")
    sub = cells.subset(idx)
    probs = pred.predict_proba_prepared(sub.images)
    pos_name = pred.class_names[pred.positive_index]
    y = (np.asarray([cells.class_names[k] for k in sub.labels]) == pos_name).astype(int)
    return write_evaluation(run_dir, y_true=y, p_pos=probs[:, pred.positive_index], patients=sub.patients,
                            relpaths=sub.relpaths, threshold=pred.threshold, split_name=split_name,
                            extra={"model": pred.config.model, "data": str(cells.root)})
