"""Prevalence of Parasitized cells in a bag of cells: quantification under label shift.

A field, a slide or a folder of cell crops is a *bag*; its parasitemia is the prevalence of the
Parasitized class in it. Counting the cells a classifier calls Parasitized (classify and count)
is biased whenever the bag's prevalence differs from the one the classifier was tuned on: with
false-positive rate ``fpr`` and true-positive rate ``tpr`` it estimates
``tpr * pi + fpr * (1 - pi)`` instead of ``pi``. The cell model was trained on a balanced set
(46 % Parasitized) and a smear holds 0.1-5 % infected cells, so the bias is large exactly where
it matters. The estimators here correct it from the model's posteriors ``p = P(Parasitized | cell)``:

- :class:`ClassifyAndCount` (CC): the share of cells with ``p >= threshold`` (Forman 2008).
- :class:`ProbabilisticClassifyAndCount` (PCC): the mean posterior (Bella et al. 2010).
- :class:`AdjustedClassifyAndCount` (ACC): CC corrected with ``tpr`` / ``fpr`` measured on
  labelled cells, ``(cc - fpr) / (tpr - fpr)`` clipped to [0, 1] (Forman 2008).
- :class:`ProbabilisticAdjustedClassifyAndCount` (PACC): the same with mean posteriors per class
  (Bella et al. 2010).
- :class:`PriorCorrected`: the posteriors re-weighted from the training prior to a fixed prior
  (Saerens, Latinne & Decaestecker 2002, eq. 2.4), then counted at 0.5.
- :class:`EMQ`: the maximum-likelihood prevalence of the bag by expectation-maximisation over
  the re-weighted posteriors, started from the training prior (Saerens, Latinne & Decaestecker
  2002, "Adjusting the outputs of a classifier to new a priori probabilities", Neural
  Computation 14(1)); the same algorithm as QuaPy's ``EMQ`` (SLD).

QuaPy (Moreo, Esuli & Sebastiani 2021) is the reference implementation; ``tests/evaluation/
test_quantify.py`` checks that these numpy versions give its results on the same posteriors.
This module needs numpy only, so ``predict`` on the ONNX edge install can use it.

Every estimator is scikit-learn-like: hyper-parameters in the constructor, ``fit(p, y)`` on
labelled posteriors (labelled cells the model was not trained on), ``predict(p)`` on a bag gives
a prevalence in [0, 1], and :meth:`Quantifier.estimate` adds a 95 % percentile-bootstrap
interval, over cells or, given ``groups`` (the fields of a slide), over groups (the cluster
bootstrap of :func:`malaria_screen.evaluation.metrics.cluster_bootstrap_weights`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from malaria_screen.evaluation.bootstrap import cluster_bootstrap_weights
from malaria_screen.fileio import atomic_write_json

__all__ = [
    "AdjustedClassifyAndCount",
    "ClassifyAndCount",
    "DEFAULT_METHOD",
    "DEFAULT_TARGET_PRIOR",
    "EMQ",
    "FIELD_DEFAULT_METHOD",
    "METHODS",
    "PrevalenceEstimate",
    "PriorCorrected",
    "ProbabilisticAdjustedClassifyAndCount",
    "ProbabilisticClassifyAndCount",
    "Quantifier",
    "QuantifierParams",
    "adjust_to_prior",
    "bag_summary",
    "make_quantifier",
    "params_from_model",
]

#: Prior of :class:`PriorCorrected` by default: 2 % Parasitized, within the 0.1-5 % of real smears.
DEFAULT_TARGET_PRIOR = 0.02

#: Cell-replicate products evaluated at once by the bootstrap (memory: 8 bytes each, a few times).
_CHUNK = 4_000_000
#: Elements (replicates x cells) EM iterates at once: 1 MiB per float64 temporary, cache-sized.
_EM_BLOCK = 1 << 17


@dataclass(frozen=True)
class PrevalenceEstimate:
    """A bag's estimated prevalence of Parasitized.

    Attributes
    ----------
    prevalence : float or None
        Fraction in [0, 1]; None for an empty bag.
    ci95 : tuple of float
        95 % percentile-bootstrap interval ``(lo, hi)`` (fractions); ``(0.0, 1.0)`` for an empty bag.
    method : str
        Key of the estimator in :data:`METHODS`.
    n : int
        Cells in the bag.
    n_called : int
        Cells called Parasitized by :meth:`Quantifier.labels`.
    ci_method : str
        How the interval was computed (resampling unit, replicates, seed).
    """

    prevalence: float | None
    ci95: tuple[float, float]
    method: str
    n: int
    n_called: int
    ci_method: str

    def to_json(self) -> dict[str, Any]:
        """``{"prevalence", "prevalence_ci95", "method", "n", "n_called", "ci_method"}``."""
        return {"prevalence": self.prevalence, "prevalence_ci95": list(self.ci95), "method": self.method,
                "n": self.n, "n_called": self.n_called, "ci_method": self.ci_method}


def _as_posteriors(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:  # (n, 2) [Uninfected, Parasitized] like QuaPy; take the positive column
        arr = arr[:, 1]
    arr = arr.reshape(-1) if arr.ndim <= 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"posteriors must be (n,) p_parasitized, got shape {np.shape(p)}")
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ValueError("posteriors must be finite probabilities in [0, 1]")
    return arr


def _as_labels(y: Any, n: int) -> np.ndarray:
    arr = np.asarray(y).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"y has {len(arr)} labels for {n} posteriors")
    if arr.dtype.kind in "US":
        bad = set(arr.tolist()) - {"Parasitized", "Uninfected"}
        if bad:
            raise ValueError(f"labels must be 'Parasitized' / 'Uninfected' or 1 / 0, got {sorted(bad)[:3]}")
        return arr == "Parasitized"
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must be 1 (Parasitized) or 0 (Uninfected)")
    return arr.astype(bool)


def _check_prior(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def adjust_to_prior(p: Any, train_prior: float, new_prior: float) -> np.ndarray:
    """Re-weight posteriors from the training prior to a new prior (Saerens et al. 2002, eq. 2.4).

    ``p' = (r1 p) / (r1 p + r0 (1 - p))`` with ``r1 = new / train`` and
    ``r0 = (1 - new) / (1 - train)``: Bayes' rule with the class-conditional densities unchanged.

    Parameters
    ----------
    p : array-like of shape (n,)
        P(Parasitized | cell) under the training prior.
    train_prior, new_prior : float in (0, 1)
        Prevalence of Parasitized the model was trained on, and the one to adjust to.

    Returns
    -------
    ndarray of shape (n,), float64

    Raises
    ------
    ValueError
        If a prior is outside (0, 1) or ``p`` is not made of probabilities.
    """
    p = _as_posteriors(p)
    r1 = _check_prior("new_prior", new_prior) / _check_prior("train_prior", train_prior)
    r0 = (1.0 - new_prior) / (1.0 - train_prior)
    num = r1 * p
    return num / (num + r0 * (1.0 - p))


class Quantifier:
    """Base class: a prevalence estimator on the model's posteriors (subclasses below).

    Subclasses implement ``_predict_weighted(p, w)``: one estimate per row of the ``(B, n)``
    cell weights ``w`` (bootstrap replicates; ``w = 1`` is the bag itself).
    """

    #: Key in :data:`METHODS`.
    name: str = ""

    def fit(self, p: Any, y: Any) -> "Quantifier":
        """Learn from labelled posteriors (cells the model did not train on); returns ``self``.

        Parameters
        ----------
        p : array-like of shape (n,)
            P(Parasitized | cell).
        y : array-like of shape (n,)
            1 / ``"Parasitized"`` or 0 / ``"Uninfected"``.

        Raises
        ------
        ValueError
            If shapes disagree, or a class the method needs is missing.
        """
        _as_labels(y, len(_as_posteriors(p)))
        return self

    def predict(self, p: Any) -> float:
        """Estimated prevalence of Parasitized in the bag ``p`` (n,): a fraction in [0, 1].

        Raises
        ------
        ValueError
            If the bag is empty or ``p`` is not made of probabilities.
        """
        p = _as_posteriors(p)
        if p.size == 0:
            raise ValueError("cannot estimate the prevalence of an empty bag")
        return float(self._predict_weighted(p, np.ones((1, p.size)))[0])

    def labels(self, p: Any) -> np.ndarray:
        """Cells called Parasitized, consistent with the estimate: the ``round(prevalence * n)``
        cells of highest posterior (ties broken by order). ``(n,)`` bool."""
        p = _as_posteriors(p)
        out = np.zeros(p.size, bool)
        if p.size:
            k = int(round(self.predict(p) * p.size))
            out[np.argsort(-p, kind="stable")[:k]] = True
        return out

    def estimate(self, p: Any, *, groups: Sequence[Any] | None = None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> PrevalenceEstimate:
        """Prevalence with a percentile-bootstrap ``1 - alpha`` interval.

        Parameters
        ----------
        p : array-like of shape (n,)
            The bag's posteriors.
        groups : sequence of length n, optional
            Cluster of each cell (its field, for a slide): each replicate draws whole groups with
            replacement (cells of one field are not independent). Default: cells are resampled.
        n_boot : int, default=1000
            Replicates; 0 gives no interval (``(nan, nan)``).
        seed : int, default=0
        alpha : float, default=0.05

        Returns
        -------
        PrevalenceEstimate
        """
        p = _as_posteriors(p)
        n = int(p.size)
        if n == 0:
            return PrevalenceEstimate(None, (0.0, 1.0), self.name, 0, 0, "empty bag")
        est = self.predict(p)
        n_called = int(self.labels(p).sum())
        if n_boot <= 0:
            return PrevalenceEstimate(est, (float("nan"), float("nan")), self.name, n, n_called, "no interval")
        g = np.arange(n) if groups is None else np.asarray(groups)
        if len(g) != n:
            raise ValueError(f"groups has {len(g)} entries for {n} cells")
        step = max(1, _CHUNK // n)
        vals = []
        for k, s in enumerate(range(0, n_boot, step)):  # replicates in chunks: bounded memory for big bags
            gw, gid = cluster_bootstrap_weights(g, n_boot=min(step, n_boot - s), seed=seed + 104_729 * k)
            w = gw if groups is None else gw[:, gid]  # each cell its own group: gid is 0..n-1 already
            # every replicate runs the estimator as the point estimate runs it (EM: from the training
            # prior, the same stopping rule); started at the point estimate, slowly converging
            # replicates drifted past it and the interval could miss its own estimate
            vals.append(self._predict_weighted(p, w.astype(np.float64)))
        v = np.concatenate(vals)
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if v.size else (float("nan"),) * 2
        unit = "cells" if groups is None else f"groups ({int(gid.max()) + 1})"
        return PrevalenceEstimate(est, (float(lo), float(hi)), self.name, n, n_called,
                                  f"percentile bootstrap over {unit}, {n_boot} replicates, seed {seed}")

    def describe(self) -> dict[str, Any]:
        """``{"method": key, <hyper-parameters and fitted values>}``, JSON-ready (for a summary)."""
        out: dict[str, Any] = {"method": self.name}
        out.update({k: v for k, v in vars(self).items()})
        if isinstance(self, PriorCorrected) and self.train_prior_ is not None:
            out["threshold_"] = self.threshold_
        return out

    def _predict_weighted(self, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({args})"


def _wmean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (w @ x) / w.sum(axis=1)


class ClassifyAndCount(Quantifier):
    """Classify and count (CC): the share of cells with ``p >= threshold``.

    Forman, G. (2008). Quantifying counts and costs via classification. Data Mining and Knowledge
    Discovery 17, 164-206. Biased under label shift: it estimates ``tpr*pi + fpr*(1-pi)``.

    Parameters
    ----------
    threshold : float, default=0.5
        The model's decision threshold on P(Parasitized).
    """

    name = "cc"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)

    def _predict_weighted(self, p, w):
        return _wmean((p >= self.threshold).astype(np.float64), w)

    def labels(self, p: Any) -> np.ndarray:
        """Cells with ``p >= threshold``, ``(n,)`` bool."""
        return _as_posteriors(p) >= self.threshold


class ProbabilisticClassifyAndCount(Quantifier):
    """Probabilistic classify and count (PCC): the mean posterior.

    Bella, A., Ferri, C., Hernández-Orallo, J. & Ramírez-Quintana, M. J. (2010). Quantification
    via probability estimators. IEEE ICDM 2010. Unbiased only when the posteriors are calibrated
    for the bag's own prior.
    """

    name = "pcc"

    def _predict_weighted(self, p, w):
        return _wmean(p, w)


class AdjustedClassifyAndCount(Quantifier):
    """Adjusted classify and count (ACC): ``(cc - fpr) / (tpr - fpr)``, clipped to [0, 1].

    Forman, G. (2008), as above; QuaPy's ``ACC`` (binary, ``norm="clip"``). ``tpr`` and ``fpr``
    are measured by :meth:`fit` on labelled cells the model did not train on (its validation
    patients), or passed directly.

    Parameters
    ----------
    threshold : float, default=0.5
    tpr, fpr : float, optional
        Sensitivity and 1 - specificity at ``threshold``; set by :meth:`fit`.
    """

    name = "acc"

    def __init__(self, threshold: float = 0.5, tpr: float | None = None, fpr: float | None = None) -> None:
        self.threshold = float(threshold)
        self.tpr_ = tpr
        self.fpr_ = fpr

    def fit(self, p, y):
        """Measure ``tpr_`` and ``fpr_`` at ``threshold``; both classes must be present."""
        p = _as_posteriors(p)
        y = _as_labels(y, p.size)
        if y.all() or not y.any():
            raise ValueError("fit needs cells of both classes")
        called = p >= self.threshold
        self.tpr_, self.fpr_ = float(called[y].mean()), float(called[~y].mean())
        return self

    def _rates(self) -> tuple[float, float]:
        if self.tpr_ is None or self.fpr_ is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit(p, y) or pass tpr and fpr")
        return float(self.tpr_), float(self.fpr_)

    def _raw(self, p, w):
        return _wmean((p >= self.threshold).astype(np.float64), w)

    def _predict_weighted(self, p, w):
        tpr, fpr = self._rates()
        raw = self._raw(p, w)
        if tpr - fpr <= 1e-12:  # no better than chance: no adjustment possible (QuaPy's exact-cc fallback)
            return raw
        return np.clip((raw - fpr) / (tpr - fpr), 0.0, 1.0)


class ProbabilisticAdjustedClassifyAndCount(AdjustedClassifyAndCount):
    """Probabilistic adjusted classify and count (PACC): ACC with mean posteriors.

    ``(pcc - m0) / (m1 - m0)`` clipped to [0, 1], with ``m1`` / ``m0`` the mean posterior of
    labelled Parasitized / Uninfected cells (Bella et al. 2010; QuaPy's ``PACC``, binary,
    ``norm="clip"``). ``tpr_`` / ``fpr_`` hold ``m1`` / ``m0``.
    """

    name = "pacc"

    def __init__(self, tpr: float | None = None, fpr: float | None = None) -> None:
        super().__init__(0.5, tpr, fpr)

    def fit(self, p, y):
        """Measure the mean posterior of each class; both classes must be present."""
        p = _as_posteriors(p)
        y = _as_labels(y, p.size)
        if y.all() or not y.any():
            raise ValueError("fit needs cells of both classes")
        self.tpr_, self.fpr_ = float(p[y].mean()), float(p[~y].mean())
        return self

    def _raw(self, p, w):
        return _wmean(p, w)


class _PriorAware(Quantifier):
    """Shared ``train_prior_`` handling of :class:`PriorCorrected` and :class:`EMQ`."""

    def __init__(self, train_prior: float | None = None) -> None:
        self.train_prior_ = None if train_prior is None else _check_prior("train_prior", train_prior)

    def fit(self, p, y):
        """Set ``train_prior_`` to the share of Parasitized among ``y`` (pass the *training*
        cells' labels; their posteriors are not used, so ``p`` may be None)."""
        y = np.asarray(y).reshape(-1)
        lab = _as_labels(y, len(y))
        self.train_prior_ = _check_prior("training prevalence", lab.mean() if lab.size else 0.0)
        return self

    def _prior(self) -> float:
        if self.train_prior_ is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit(None, y_train) or pass train_prior")
        return float(self.train_prior_)


class PriorCorrected(_PriorAware):
    """Posteriors re-weighted to a fixed prior, then counted at the model's threshold (:func:`adjust_to_prior`).

    Saerens, M., Latinne, P. & Decaestecker, C. (2002). Adjusting the outputs of a classifier to
    new a priori probabilities: a simple procedure. Neural Computation 14(1), 21-41, eq. 2.4.
    Needs no labels of the bag's site: it assumes the bag's prevalence is near ``target_prior``,
    so it shrinks every estimate towards it (with ``threshold=0.5``, a cell is called Parasitized
    only if it is more likely infected than not among cells of that prevalence).

    Parameters
    ----------
    target_prior : float, default=:data:`DEFAULT_TARGET_PRIOR`
    train_prior : float, optional
        Prevalence of Parasitized in the model's training cells; set by :meth:`fit`.
    threshold : float, default=0.5
        The model's decision threshold, applied to the re-weighted posteriors (the same decision
        rule, at the new prior).
    """

    name = "prior"

    def __init__(self, target_prior: float = DEFAULT_TARGET_PRIOR, train_prior: float | None = None,
                 threshold: float = 0.5) -> None:
        super().__init__(train_prior)
        self.target_prior = _check_prior("target_prior", target_prior)
        self.threshold = _check_prior("threshold", threshold)

    @property
    def threshold_(self) -> float:
        """The threshold on the raw posterior equivalent to ``threshold`` after the re-weighting."""
        r1 = self.target_prior / self._prior()
        r0 = (1.0 - self.target_prior) / (1.0 - self._prior())
        t = self.threshold
        return t * r0 / (t * r0 + (1.0 - t) * r1)

    def _predict_weighted(self, p, w):
        return _wmean(self.labels(p).astype(np.float64), w)

    def labels(self, p: Any) -> np.ndarray:
        """Cells whose re-weighted posterior is ``>= threshold``, ``(n,)`` bool."""
        return adjust_to_prior(p, self._prior(), self.target_prior) >= self.threshold


class EMQ(_PriorAware):
    """Maximum-likelihood prevalence by expectation-maximisation (SLD / EMQ).

    Saerens, M., Latinne, P. & Decaestecker, C. (2002). Adjusting the outputs of a classifier to
    new a priori probabilities: a simple procedure. Neural Computation 14(1), 21-41. Starting at
    ``q = train_prior``, alternately re-weight the posteriors to ``q`` (E-step) and set ``q`` to
    their mean (M-step); stop when ``q`` moves less than ``tol`` after at least 10 iterations (the
    stopping rule of QuaPy's ``EMQ.EM``). Exact when the posteriors are calibrated and only the
    prior differs (label shift); biased when the cells' appearance shifts too.

    Parameters
    ----------
    train_prior : float, optional
        Prevalence of Parasitized in the model's training cells; set by :meth:`fit`.
    tol : float, default=1e-4
    max_iter : int, default=1000
    """

    name = "em"

    def __init__(self, train_prior: float | None = None, tol: float = 1e-4, max_iter: int = 1000) -> None:
        super().__init__(train_prior)
        self.tol = float(tol)
        self.max_iter = int(max_iter)

    def _predict_weighted(self, p, w):
        # Rows are independent: iterating a block of replicates that fits in the CPU's cache to
        # convergence, block after block, gives the same bits ~2.7x faster than all rows at once
        # (4,096 cells x 1,000 replicates: 0.34 s against 0.92 s, this stop's machine).
        rows = max(1, _EM_BLOCK // max(1, p.size))
        if w.shape[0] <= rows:
            return self._em_rows(p, w)
        return np.concatenate([self._em_rows(p, w[i : i + rows]) for i in range(0, w.shape[0], rows)])

    def _em_rows(self, p, w):
        pi = self._prior()
        q = np.full(w.shape[0], pi)
        wsum = w.sum(axis=1)
        active = np.ones(w.shape[0], bool)
        for it in range(self.max_iter):
            r1 = (q[active] / pi)[:, None]
            r0 = ((1.0 - q[active]) / (1.0 - pi))[:, None]
            num = r1 * p[None, :]
            den = num + r0 * (1.0 - p[None, :])
            # 0/0 only where a replicate's prevalence reached 0 or 1 and a cell it did not draw
            # (weight 0) has a posterior of exactly 1 or 0: any finite value leaves the sum unchanged
            post = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
            new = (w[active] * post).sum(axis=1) / wsum[active]
            moved = np.abs(new - q[active])
            q[active] = new
            if it > 10:  # QuaPy: converged when mae(q, q_prev) < epsilon and s > 10
                idx = np.flatnonzero(active)
                active[idx[moved < self.tol]] = False
                if not active.any():
                    break
        return q

    def posteriors(self, p: Any) -> np.ndarray:
        """The bag's posteriors re-weighted to its EM prevalence, ``(n,)`` float64."""
        return adjust_to_prior(p, self._prior(), min(max(self.predict(p), 1e-6), 1 - 1e-6))


#: Estimators by key (the ``method`` of ``summary.json``).
METHODS: dict[str, type[Quantifier]] = {
    "cc": ClassifyAndCount,
    "pcc": ProbabilisticClassifyAndCount,
    "acc": AdjustedClassifyAndCount,
    "pacc": ProbabilisticAdjustedClassifyAndCount,
    "prior": PriorCorrected,
    "em": EMQ,
}

#: The method of ``predict``'s summary (bags of cell crops): EM, the lowest MAE on bags of 1,000
#: NIH test-patient cells at 0-20 % (``benchmarks/bench_quantify.py``, ``docs/quantification.md``).
DEFAULT_METHOD = "em"

#: The method of whole-field screening (``smear``, REST ``/v1/field``, the web app): the
#: posteriors corrected to a 2 % prior, chosen in blocked folds of the IML dev fields (another
#: microscope and stain, where EM and ACC over-call by ~15 points because the posteriors are
#: miscalibrated there).
FIELD_DEFAULT_METHOD = "prior"


@dataclass(frozen=True)
class QuantifierParams:
    """What the estimators need to know about a cell model, stored beside it as ``quantify.json``
    or read from its ``metrics.json`` / ``split.json``.

    Attributes
    ----------
    threshold : float
        The model's decision threshold.
    train_prior : float or None
        Prevalence of Parasitized among its training cells.
    tpr, fpr : float or None
        Sensitivity and 1 - specificity at ``threshold`` on labelled cells it did not train on.
    ptpr, pfpr : float or None
        Mean posterior of those Parasitized / Uninfected cells (for PACC).
    source : str
        Where the rates come from (split, patients, cells).
    """

    threshold: float = 0.5
    train_prior: float | None = None
    tpr: float | None = None
    fpr: float | None = None
    ptpr: float | None = None
    pfpr: float | None = None
    source: str = ""

    def to_json(self, path: str | Path) -> None:
        """Write as JSON (atomically)."""
        atomic_write_json(Path(path), asdict(self))

    @classmethod
    def from_json(cls, path: str | Path) -> "QuantifierParams":
        """Read a file written by :meth:`to_json`; unknown keys raise ``ValueError``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), where=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "quantifier parameters") -> "QuantifierParams":
        """From a dict of :meth:`to_json`'s keys (an ONNX file's ``malaria_screen.quantify`` metadata);
        unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(**d)


def params_from_model(model: Any) -> QuantifierParams:
    """:class:`QuantifierParams` of a loaded cell model (duck-typed: ``threshold``, ``metrics``,
    ``source``).

    In order: ``quantify.json`` in the model's folder; the parameters an ONNX file carries
    (``quantify_params``: written by ``malaria-screen export`` from its run folder, so an exported
    model estimates parasitemia as the PyTorch model it came from); else ``tpr`` / ``fpr`` from its
    ``metrics.json`` (sensitivity and 1 - specificity of its *test* patients, when measured at
    the model's threshold) and ``train_prior`` from ``split.json``'s training cells (without the
    extra negatives of another site, ``train --extra-negatives``: they do not carry the prior of
    the cells being screened), or, for an
    ``.onnx`` file without it, the test cells' prevalence (same split, a close proxy).
    """
    threshold = float(getattr(model, "threshold", 0.5))
    src = getattr(model, "source", None)
    folder = Path(src) if src else None
    if folder is not None and folder.is_file():
        folder = folder.parent if (folder.parent / "quantify.json").is_file() else None
    if folder is not None and (folder / "quantify.json").is_file():
        return QuantifierParams.from_json(folder / "quantify.json")
    carried = getattr(model, "quantify_params", None)
    if carried:
        return QuantifierParams.from_dict(carried, where=f"{src}: quantifier parameters")
    m = getattr(model, "metrics", None) or {}
    tpr = fpr = None
    if m.get("sensitivity") is not None and m.get("specificity") is not None and \
            abs(float(m.get("threshold", threshold)) - threshold) < 1e-9:
        tpr, fpr = float(m["sensitivity"]), 1.0 - float(m["specificity"])
    prior, where = None, ""
    split = folder / "split.json" if folder is not None and folder.is_dir() else None
    if split is not None and split.is_file():
        try:
            manifest = json.loads(split.read_text(encoding="utf-8"))
            n = manifest["splits"]["train"]["n_per_class"]
            # Extra negatives from another microscope (Chula-RBC-12, `train --extra-negatives`) are a
            # separate cluster of the model's feature space: they do not shape its posteriors on the
            # cells it screens, so the prior those posteriors carry is that of the NIH training cells.
            # So are the synthetic Parasitized copies of those cells (`train --synthetic-positives`).
            extra = int((manifest.get("extra_negatives") or {}).get("n_cells", 0))
            syn = int((manifest.get("synthetic_positives") or {}).get("n_cells", 0))
            pos = float(n.get("Parasitized", 0)) - syn
            prior = pos / (pos + float(n.get("Uninfected", 0)) - extra)
            where = "training cells (split.json)" + (f", without {extra} extra negatives" if extra else "") + \
                (f" and {syn} synthetic positives" if syn else "")
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            prior = None
    if prior is None and m.get("n_cells"):
        prior, where = float(m["n_parasitized"]) / float(m["n_cells"]), "test cells (metrics.json)"
    if prior is not None and not 0.0 < prior < 1.0:
        prior = None
    n_pat = m.get("n_patients")
    return QuantifierParams(threshold=threshold, train_prior=prior, tpr=tpr, fpr=fpr,
                            source=f"tpr/fpr: metrics.json ({n_pat} test patients); prior: {where or 'unknown'}")


def make_quantifier(method: str, params: QuantifierParams, **kwargs: Any) -> Quantifier:
    """A fitted estimator for ``method`` (a key of :data:`METHODS`) from stored parameters.

    Parameters
    ----------
    method : str
    params : QuantifierParams
    **kwargs
        Hyper-parameters (``target_prior`` of ``"prior"``).

    Raises
    ------
    ValueError
        If ``method`` is unknown, or ``params`` lack what it needs (e.g. ``"acc"`` without
        ``tpr``/``fpr``, ``"em"`` without ``train_prior``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantification method {method!r}; choose from {sorted(METHODS)}")
    if method == "cc":
        return ClassifyAndCount(params.threshold)
    if method == "pcc":
        return ProbabilisticClassifyAndCount()
    if method in ("acc", "pacc"):
        tpr, fpr = (params.tpr, params.fpr) if method == "acc" else (params.ptpr, params.pfpr)
        if tpr is None or fpr is None:
            raise ValueError(f"method {method!r} needs the model's rates on labelled cells, which {params.source!r} lacks")
        return AdjustedClassifyAndCount(params.threshold, tpr, fpr) if method == "acc" else \
            ProbabilisticAdjustedClassifyAndCount(tpr, fpr)
    if params.train_prior is None:
        raise ValueError(f"method {method!r} needs the model's training prior, which {params.source!r} lacks")
    if method == "prior":
        return PriorCorrected(kwargs.get("target_prior", DEFAULT_TARGET_PRIOR), params.train_prior, params.threshold)
    return EMQ(params.train_prior)


def bag_summary(labels: Sequence[str | None], p_parasitized: Sequence[float | None], model: Any, *,
                method: str = DEFAULT_METHOD, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The summary of a bag of classified cells (``predict``'s ``r.summary.json``).

    Parameters
    ----------
    labels : sequence of str or None, length n_files
        Each file's predicted class; None for a file that failed.
    p_parasitized : sequence of float or None, length n_files
        Each file's P(Parasitized); None for a failed file or a model without that class.
    model : loaded cell model
        Its ``class_names``, ``threshold``, ``metrics`` and ``source`` give the estimator's
        parameters (:func:`params_from_model`).
    method : str, default=:data:`DEFAULT_METHOD`
    n_boot, seed : int
        Bootstrap over cells for ``prevalence_ci95``.

    Returns
    -------
    dict
        ``n`` (cells classified), ``n_failed``, ``counts`` (per class name), ``prevalence``
        (estimated fraction of Parasitized, None without cells or without that class),
        ``prevalence_ci95`` ``[lo, hi]``, ``method``, ``ci_method``, ``n_called_parasitized``
        (cells the method calls Parasitized), ``parameters`` (what the estimator was given and
        where it comes from).

    Raises
    ------
    ValueError
        If the lengths differ or ``method`` is unknown or lacks its parameters.
    """
    if len(labels) != len(p_parasitized):
        raise ValueError(f"{len(labels)} labels but {len(p_parasitized)} probabilities")
    names = list(getattr(model, "class_names", ("Parasitized", "Uninfected")))
    ok = [i for i, lab in enumerate(labels) if lab is not None]
    counts = {c: sum(1 for i in ok if labels[i] == c) for c in names}
    out: dict[str, Any] = {"n": len(ok), "n_failed": len(labels) - len(ok), "counts": counts,
                           "prevalence": None, "prevalence_ci95": None, "method": method, "ci_method": None,
                           "n_called_parasitized": None, "parameters": None}
    p = [p_parasitized[i] for i in ok]
    if not ok or any(v is None for v in p):
        return out
    if not np.isfinite(np.asarray(p, np.float64)).all():  # e.g. an overflow in half precision: no estimate, said
        out["warning"] = "some probabilities are not finite numbers: no prevalence estimated"
        return out
    params = params_from_model(model)
    try:
        quantifier = make_quantifier(method, params)
    except ValueError as exc:  # a model without its training prior / rates: count, and say so
        quantifier = ClassifyAndCount(params.threshold)
        out.update(method="cc", warning=f"{exc}; classify-and-count used instead (biased under label shift)")
    est = quantifier.estimate(np.asarray(p, np.float64), n_boot=n_boot, seed=seed)
    out.update(prevalence=est.prevalence, prevalence_ci95=list(est.ci95), ci_method=est.ci_method,
               n_called_parasitized=est.n_called, parameters=asdict(params))
    return out
