"""A second stage for field screening, fitted in seconds on a lab's own annotated fields.

The cell CNN sees one masked crop; a field's stain regime, the cell's size against its
neighbours and the colour of its darkest pixels against its own median are what a
microscopist also weighs. :class:`CellRescorer` is a gradient-boosted tree model
(scikit-learn's ``HistGradientBoostingClassifier``, Friedman 2001 / Ke et al. 2017) over
:func:`~malaria_screen.smear.features.cell_features` plus the cell model's logit, fitted on the
segmented cells of annotated fields (labels from the boxes they match,
:func:`~malaria_screen.smear.labels.label_detections`, negatives mined from unmatched
detections). Its decision threshold is count-matched
(:func:`~malaria_screen.evaluation.metrics.count_matched_threshold`) on out-of-fold
probabilities of a field-grouped 5-fold split of the training fields, so that it calls as many
cells as are infected: what parasitemia needs. Inputs are *field-relative* by default
(:func:`field_relative`): each column minus the field's median cell, over its inter-quartile
range, so that a cell is judged against its own field's stain and size, as a microscopist does
(plus the model's raw logit). No GPU and no fine-tuning: on 96 IML_Malaria
fields a fit takes seconds on 2 CPU cores (``benchmarks/bench_rescore.py`` measures it leak-free,
by field block).

Saved as ``rescorer.json`` (:class:`RescorerConfig`, with the :class:`SegmentConfig` of the
training fields) + ``rescorer.skops`` (the fitted scikit-learn estimator in the skops format:
no pickle, only the estimator's own types are loaded). Scoring goes through the estimator's
public ``decision_function``, so a fitted and a loaded rescorer give the same numbers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from malaria_screen.errors import error_text
from malaria_screen.evaluation.metrics import count_matched_threshold
from malaria_screen.fileio import atomic_write_bytes, atomic_write_json
from malaria_screen.smear.crops import cell_crops
from malaria_screen.smear.features import FEATURE_NAMES, cell_features
from malaria_screen.smear.fields import decoded_fields, record_error
from malaria_screen.smear.labels import label_detections
from malaria_screen.smear.screen import CellModel, predict_batched
from malaria_screen.smear.segment import CellProps, Segmentation, SegmentConfig, segment_field

logger = logging.getLogger(__name__)

__all__ = ["CellRescorer", "RescorerConfig", "RescorerData", "collect_rescorer_data", "field_relative", "input_names",
           "is_rescorer_dir", "rescorer_inputs"]

CONFIG_NAME = "rescorer.json"
#: The fitted estimator, in the skops format.
WEIGHTS_NAME = "rescorer.skops"
#: Where rescorers written before the skops format kept their trees (flat arrays).
OLD_WEIGHTS_NAME = "rescorer.safetensors"
#: The only types a rescorer file may hold besides the skops defaults (numpy, builtins, sklearn estimators).
TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


@dataclass
class RescorerConfig:
    """Everything saved beside the trees in ``rescorer.json``.

    Attributes
    ----------
    feature_names : list of str
        Input columns, in order (:func:`input_names`).
    use_model_logit : bool
        Whether the cell model's logit is an input (then screen with the model it was fitted with).
    field_relative : bool
        Inputs made relative to the field (:func:`field_relative`); False in files written before
        this option existed (absolute inputs), which still load and screen as they were fitted.
    threshold : float
        Decision threshold on the rescored probability (count-matched, see module doc).
    model : str
        The cell model it was fitted with, as given (``"default"`` = the bundled model).
    max_iter, learning_rate, max_depth, min_samples_leaf, l2_regularization
        Hyper-parameters of the gradient-boosted trees.
    n_fields, n_cells, n_parasitized : int
        Training data.
    segment : SegmentConfig
        Segmentation settings of the training fields (use the same for screening); saved as a
        JSON object (older files hold a plain ``segment_kwargs`` dict, read the same way).
    fit_seconds : float
    kind : {"trees", "linear"}
        The estimator: gradient-boosted trees (thousands of labelled cells), or an L2-regularised
        logistic regression on standardised inputs (``C`` = :attr:`linear_c`; a few hundred
        labelled cells, ``malaria-screen adapt``). Files written before this option: trees.
    linear_c : float
        Inverse regularisation strength of the logistic regression.
    """

    feature_names: list[str] = field(default_factory=list)
    use_model_logit: bool = True
    field_relative: bool = False
    threshold: float = 0.5
    model: str = "default"
    max_iter: int = 200
    learning_rate: float = 0.05
    max_depth: int = 3
    min_samples_leaf: int = 40
    l2_regularization: float = 1.0
    n_fields: int = 0
    n_cells: int = 0
    n_parasitized: int = 0
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    fit_seconds: float = 0.0
    kind: str = "trees"
    linear_c: float = 0.1

    @classmethod
    def from_dict(cls, values: dict) -> "RescorerConfig":
        """Read a ``rescorer.json`` document (unknown keys are ignored; an old plain
        ``segment_kwargs`` dict becomes :attr:`segment`).

        Raises
        ------
        ValueError
            If the segmentation settings name an unknown option or ``values`` is not a dict.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(values).__name__}")
        known = cls.__dataclass_fields__
        kw = {k: v for k, v in values.items() if k in known and k != "segment"}
        kw["segment"] = SegmentConfig.from_dict(values.get("segment", values.get("segment_kwargs")))
        return cls(**kw)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def field_relative(x: np.ndarray) -> np.ndarray:
    """Each column of one field's cells relative to the field: ``(x - median) / IQR``.

    Stain strength and hue, focus and cell size differ between slides and microscopes; within a
    field, an infected cell stands out from its neighbours (darker red-absorbing interior, larger
    or misshapen), so the cell is scored against its own field's median cell. This is robust as
    long as under half of the field's cells are infected (the median stays an uninfected cell).
    A column constant over the middle half of the field's cells (IQR ≤ 1e-6: counts of interior
    blobs, flags) is only centred.
    On the IML_Malaria fields (``benchmarks/bench_rescore.py``, 5 field blocks) it raised the
    held-out ROC-AUC of the magenta-stained block from 0.93 to 0.96.

    Parameters
    ----------
    x : np.ndarray
        ``(N, F)`` inputs of all detected cells of ONE field.

    Returns
    -------
    np.ndarray
        ``(N, F)`` float64; all zeros for a single cell.
    """
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return x.copy()
    q25, med, q75 = np.percentile(x, [25, 50, 75], axis=0)
    iqr = q75 - q25
    return (x - med) / np.where(iqr > 1e-6, iqr, 1.0)


def input_names(*, use_model_logit: bool = True, relative: bool = True) -> list[str]:
    """Names of the rescorer's input columns, in order (see :func:`rescorer_inputs`)."""
    names = list(FEATURE_NAMES) + (["model_logit"] if use_model_logit else [])
    if not relative:
        return names
    return [f"rel:{n}" for n in names] + (["model_logit"] if use_model_logit else [])


def rescorer_inputs(rgb: np.ndarray, seg: Segmentation, cells: list[CellProps], p_model: np.ndarray | None, *,
                    relative: bool = True) -> np.ndarray:
    """Rescorer input matrix of one field: cell features (+ the cell model's logit).

    With ``relative`` (default), every column is made relative to the field
    (:func:`field_relative`) and the model's raw logit is appended again, so ``cells`` must be
    ALL the detected cells of the field (the same set at fitting and at screening).

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 field (the original colours, before any stain normalisation).
    seg : Segmentation
        Its segmentation.
    cells : list of CellProps
        ``seg.cells()``.
    p_model : np.ndarray or None
        ``(N,)`` p_parasitized of the cell model for ``cells``; None = features only.
    relative : bool
        Field-relative inputs (default) or the absolute features (rescorers fitted before
        field-relative inputs existed).

    Returns
    -------
    np.ndarray
        ``(N, F)`` float64, columns :func:`input_names` (``F = len(FEATURE_NAMES)``, +1 for the
        logit, +1 more for the raw logit when ``relative``).

    Raises
    ------
    ValueError
        If ``p_model`` does not have one value per cell.
    """
    x = cell_features(rgb, seg.labels, cells).astype(np.float64)
    if p_model is None:
        return field_relative(x) if relative else x
    p = np.asarray(p_model, np.float64).reshape(-1)
    if len(p) != len(cells):
        raise ValueError(f"p_model has {len(p)} values for {len(cells)} cells")
    x = np.concatenate([x, _logit(p)[:, None]], axis=1)
    return np.concatenate([field_relative(x), x[:, -1:]], axis=1) if relative else x


@dataclass
class RescorerData:
    """Labelled rescorer inputs of annotated fields.

    ``X`` ``(N, F)`` float64, ``y`` ``(N,)`` int (1 = Parasitized), ``groups`` ``(N,)`` field
    stem of each cell, ``fields`` the fields used, ``errors`` field -> message for fields that
    could not be read, ``relative`` whether ``X`` is field-relative (fit a
    ``CellRescorer(relative=...)`` with the same value), ``columns`` the names of ``X``'s columns.
    """

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    fields: list[str]
    errors: dict[str, str]
    relative: bool = True
    columns: list[str] = field(default_factory=list)

    def subset(self, fields: set[str]) -> "RescorerData":
        """The cells of the given field stems (same arrays, filtered)."""
        keep = np.isin(self.groups, list(fields))
        return RescorerData(self.X[keep], self.y[keep], self.groups[keep], [f for f in self.fields if f in fields], {},
                            self.relative, list(self.columns))


def collect_rescorer_data(
    field_dir: str | Path,
    annotations: dict,
    model: CellModel | None,
    *,
    names: list[str] | None = None,
    iou_threshold: float = 0.5,
    unmatched: str = "uninfected",
    relative: bool = True,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    segment_config: SegmentConfig | None = None,
) -> RescorerData:
    """Segment annotated fields, label their cells from the boxes, compute the rescorer inputs.

    Cells are labelled by :func:`~malaria_screen.smear.labels.label_detections` (IoU ≥
    ``iou_threshold``; ``unmatched="uninfected"`` mines negatives from detections no box
    matches: use it on exhaustively annotated fields). Crops are cut and classified as in
    :func:`~malaria_screen.smear.screen.screen_field` (no stain normalisation).

    Parameters
    ----------
    field_dir : str or Path
        Folder of field images.
    annotations : dict
        Image name -> list of GroundTruthBox (:func:`~malaria_screen.smear.labels.load_iml_annotations`).
    model : CellModel or None
        Cell model whose logit becomes an input; None = features only.
    names : list of str, optional
        Fields to use (default: all annotated ones, sorted).
    relative : bool
        Field-relative inputs (:func:`rescorer_inputs`), computed over all detected cells of a
        field before the labelled ones are kept.
    progress : callable, optional
        Called with each field name.
    segment_config : SegmentConfig, optional
        Segmentation settings; default ``SegmentConfig()``.

    Returns
    -------
    RescorerData
        Fields that cannot be decoded, segmented or classified (too small, out of memory, ...:
        any ``Exception``) are listed in ``errors``; the rest go on.

    Raises
    ------
    ValueError
        If ``unmatched`` is not "skip" or "uninfected".
    """
    if unmatched not in ("skip", "uninfected"):  # checked here: a ValueError in the loop is a field's error
        raise ValueError(f"unmatched must be 'skip' or 'uninfected', got {unmatched!r}")
    names = sorted(annotations) if names is None else list(names)
    errors: dict[str, str] = {}
    xs, ys, gs, used = [], [], [], []
    for name, rgb in decoded_fields(Path(field_dir), names, errors):
        if progress:
            progress(name)
        try:
            seg = segment_field(rgb, segment_config)
            cells = seg.cells()
            if not cells:
                continue
            boxes = np.asarray([c.bbox for c in cells], np.float64).reshape(-1, 4)
            lab = label_detections(boxes, annotations[name], iou_threshold=iou_threshold, unmatched=unmatched)
            if not lab:
                continue
            p = predict_batched(model, cell_crops(rgb, seg.labels, cells), batch_size) if model is not None else None
            x = rescorer_inputs(rgb, seg, cells, p, relative=relative)
        except Exception as exc:  # noqa: BLE001 - one bad field (too small, MemoryError, ...) never costs the others
            record_error(errors, name, exc)
            continue
        idx = np.asarray([i for i, _, _ in lab])
        xs.append(x[idx])
        ys.append(np.asarray([c == "Parasitized" for _, c, _ in lab], np.int64))
        gs += [Path(name).stem] * len(idx)
        used.append(Path(name).stem)
    columns = input_names(use_model_logit=model is not None, relative=relative)
    X = np.concatenate(xs) if xs else np.zeros((0, len(columns)))
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    return RescorerData(X, y, np.asarray(gs, dtype=object), used, errors, relative, columns)


class CellRescorer:
    """Gradient-boosted second-stage classifier of segmented cells (see module doc).

    Parameters
    ----------
    use_model_logit : bool, default=True
        Inputs include the cell model's logit (last column).
    relative : bool, default=True
        Inputs are field-relative (:func:`rescorer_inputs`; ``RescorerData.relative``).
    max_iter, learning_rate, max_depth, min_samples_leaf, l2_regularization
        ``HistGradientBoostingClassifier`` hyper-parameters (no early stopping: the fit is
        deterministic).
    kind : {"trees", "linear"}, default="trees"
        Gradient-boosted trees, or a logistic regression (:attr:`RescorerConfig.kind`).
    linear_c : float, default=0.1
        ``C`` of the logistic regression.

    Examples
    --------
    >>> data = collect_rescorer_data("fields/", ann, model)        # doctest: +SKIP
    >>> r = CellRescorer().fit(data.X, data.y, data.groups)          # doctest: +SKIP
    >>> r.save("rescorer/"); CellRescorer.load("rescorer/")          # doctest: +SKIP
    """

    def __init__(self, *, use_model_logit: bool = True, relative: bool = True, max_iter: int = 200,
                 learning_rate: float = 0.05, max_depth: int = 3, min_samples_leaf: int = 40,
                 l2_regularization: float = 1.0, kind: str = "trees", linear_c: float = 0.1) -> None:
        if kind not in ("trees", "linear"):
            raise ValueError(f"kind must be 'trees' or 'linear', got {kind!r}")
        self.config = RescorerConfig(
            feature_names=input_names(use_model_logit=use_model_logit, relative=relative),
            use_model_logit=use_model_logit, field_relative=relative, max_iter=max_iter, learning_rate=learning_rate, max_depth=max_depth,
            min_samples_leaf=min_samples_leaf, l2_regularization=l2_regularization, kind=kind, linear_c=linear_c,
        )
        self.estimator: Any | None = None  # the fitted HistGradientBoostingClassifier
        self.source: str | None = None  # the folder it was loaded from

    @property
    def threshold(self) -> float:
        """Decision threshold on :meth:`predict_proba` (count-matched at fit time)."""
        return self.config.threshold

    def new_estimator(self):
        """An unfitted estimator with this rescorer's hyper-parameters: a
        ``HistGradientBoostingClassifier``, or (``kind="linear"``) a ``StandardScaler`` +
        ``LogisticRegression`` pipeline."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        c = self.config
        if c.kind == "linear":
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            return make_pipeline(StandardScaler(), LogisticRegression(C=c.linear_c, max_iter=2000))
        return HistGradientBoostingClassifier(
            max_iter=c.max_iter, learning_rate=c.learning_rate, max_depth=c.max_depth,
            min_samples_leaf=c.min_samples_leaf, l2_regularization=c.l2_regularization, early_stopping=False,
        )

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        nf = len(self.config.feature_names)
        if X.ndim != 2 or X.shape[1] != nf:
            raise ValueError(f"expected (N, {nf}) rescorer inputs, got shape {X.shape}")
        return X

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_splits: int = 5, model: str = "default",
            segment_config: SegmentConfig | None = None) -> "CellRescorer":
        """Fit the trees on all cells and set the count-matched threshold.

        The threshold is set on out-of-fold probabilities of a ``GroupKFold`` over ``groups``
        (fields): each cell is scored by trees fitted without its field.

        Parameters
        ----------
        X : np.ndarray
            ``(N, F)`` inputs (:func:`rescorer_inputs`).
        y : np.ndarray
            ``(N,)`` int/bool, 1 = Parasitized.
        groups : np.ndarray
            ``(N,)`` field id of each cell.
        n_splits : int
            Folds for the threshold (fewer when there are fewer fields).
        model, segment_config
            Recorded in the config (``segment_config`` default ``SegmentConfig()``).

        Returns
        -------
        CellRescorer
            ``self``.

        Raises
        ------
        ValueError
            On shape mismatches, fewer than 2 fields, or a class missing.
        """
        from sklearn.model_selection import GroupKFold

        t0 = time.perf_counter()
        X = self._check_X(X)
        y = np.asarray(y).astype(np.int64).reshape(-1)
        groups = np.asarray(groups).reshape(-1)
        if len(y) != len(X) or len(groups) != len(X):
            raise ValueError(f"X, y and groups differ in length: {len(X)}, {len(y)}, {len(groups)}")
        if len(set(y.tolist())) < 2:
            raise ValueError("need both Parasitized and Uninfected cells to fit a rescorer")
        n_groups = len(set(groups.tolist()))
        if n_groups < 2:
            raise ValueError("need cells of at least 2 fields (the threshold is set on held-out fields)")
        oof = np.zeros(len(y))
        for tr, te in GroupKFold(n_splits=min(n_splits, n_groups)).split(X, y, groups):
            if len(set(y[tr].tolist())) < 2:
                oof[te] = y[tr].mean()
                continue
            oof[te] = self.new_estimator().fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
        self.estimator = self.new_estimator().fit(X, y)
        c = self.config
        c.threshold = float(count_matched_threshold(y.astype(bool), oof))
        c.model, c.segment = model, segment_config or SegmentConfig()
        c.n_fields, c.n_cells, c.n_parasitized = n_groups, len(y), int(y.sum())
        c.fit_seconds = time.perf_counter() - t0
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Raw score (log-odds of Parasitized), ``(N,)`` float64: the estimator's ``decision_function``.

        Raises
        ------
        ValueError
            If ``X`` does not have the fitted number of columns.
        RuntimeError
            If the rescorer is not fitted.
        """
        if self.estimator is None:
            raise RuntimeError("the rescorer is not fitted")
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros(0)
        return np.asarray(self.estimator.decision_function(X), np.float64).reshape(-1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(N,)`` float64 probability of Parasitized for ``(N, F)`` inputs: the logistic of
        :meth:`decision_function` (which says what it raises)."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(X)))

    def rescore_field(self, rgb: np.ndarray, seg: Segmentation, cells: list[CellProps], p_model: np.ndarray | None) -> np.ndarray:
        """Rescored p_parasitized ``(N,)`` of one field's cells (see :func:`rescorer_inputs`).

        Raises
        ------
        ValueError
            If the rescorer needs the model's logit and ``p_model`` is None.
        """
        if self.config.use_model_logit and p_model is None:
            raise ValueError("this rescorer takes the cell model's logit as an input: screen with a model")
        if not cells:
            return np.zeros(0)
        c = self.config
        return self.predict_proba(rescorer_inputs(rgb, seg, cells, p_model if c.use_model_logit else None,
                                                  relative=c.field_relative))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``rescorer.json`` and ``rescorer.skops`` into ``out_dir`` (atomically).

        Returns
        -------
        Path
            ``out_dir``.

        Raises
        ------
        RuntimeError
            If the rescorer is not fitted.
        """
        import skops.io

        if self.estimator is None:
            raise RuntimeError("the rescorer is not fitted")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / WEIGHTS_NAME, skops.io.dumps(self.estimator))
        atomic_write_json(out / CONFIG_NAME, asdict(self.config))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "CellRescorer":
        """Load a rescorer folder written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``rescorer.json`` or ``rescorer.skops`` is missing.
        ValueError
            If the files do not describe a valid rescorer (including a folder written before the
            skops format, whose trees sit in ``rescorer.safetensors``: refit it), or the skops
            file holds types other than the estimator's own.
        """
        import skops.io

        p = Path(path)
        if not (p / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{p} is not a rescorer folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        if not (p / WEIGHTS_NAME).is_file():
            if (p / OLD_WEIGHTS_NAME).is_file():
                raise ValueError(f"{p} holds a rescorer written by an older malaria-screen ({OLD_WEIGHTS_NAME}, "
                                 f"trees as flat arrays), which this version no longer reads: fit it again with "
                                 f"`malaria-screen rescorer` on the same fields")
            raise FileNotFoundError(f"{p} is not a rescorer folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        r = cls.__new__(cls)
        r.config = RescorerConfig.from_dict(json.loads((p / CONFIG_NAME).read_text(encoding="utf-8")))
        data = (p / WEIGHTS_NAME).read_bytes()
        try:
            untrusted = set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
            if untrusted:
                raise ValueError(f"{p / WEIGHTS_NAME} holds types a rescorer never has: {sorted(untrusted)}")
            r.estimator = skops.io.loads(data, trusted=list(TRUSTED_TYPES))
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt zip, a file of another scikit-learn version, ...
            raise ValueError(f"{p / WEIGHTS_NAME} is not a readable rescorer ({error_text(exc)}); "
                             "fit it again with `malaria-screen rescorer`") from exc
        n_in = getattr(r.estimator, "n_features_in_", None)
        if n_in != len(r.config.feature_names):
            raise ValueError(f"{p / WEIGHTS_NAME} takes {n_in} inputs but {CONFIG_NAME} names "
                             f"{len(r.config.feature_names)}")
        r.source = str(p)
        return r


def is_rescorer_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder with a ``rescorer.json``."""
    return (Path(path) / CONFIG_NAME).is_file()
