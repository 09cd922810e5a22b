"""Field and slide parasitemia from the screened cells' posteriors (quantification under label shift).

A field's or a slide's parasitemia is the prevalence of Parasitized among its counted red cells.
Counting the cells the model calls Parasitized at its own threshold over-calls badly on real
smears (the model was trained on 46 % Parasitized cells; a smear holds a few per cent at most),
so the estimate comes from one of the estimators of :mod:`malaria_screen.evaluation.quantify`,
by default :data:`~malaria_screen.evaluation.quantify.FIELD_DEFAULT_METHOD` (``"prior"``: the
posteriors re-weighted to a 2 % prior, Saerens, Latinne & Decaestecker 2002), chosen by
``benchmarks/bench_quantify.py`` in blocked folds of the IML dev fields; see
``docs/quantification.md``.

- A count-based method (``cc``, ``prior``) labels each cell by a threshold; the field's interval
  is the binomial one of its count (it stays informative at 0 infected cells).
- The other methods (``em``, ``acc``, ``pcc``, ``pacc``) label the ``round(prevalence * n)`` cells
  of highest posterior and take a bootstrap interval over the field's cells.
- A slide pools its fields' counted cells. Its interval accounts for clustering by field: the
  binomial interval at the effective sample size of the fields' counts (design effect: Kish 1965;
  Korn & Graubard 1998; :mod:`malaria_screen.evaluation.proportion`), never
  narrower than the pooled cells' binomial interval; a bootstrap method takes the wider of that and
  its cluster bootstrap over fields, which alone is far too narrow with a few fields.
- With a site rescorer, its own threshold is used as is (``cc``): it was fitted on that site's labels.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from malaria_screen.evaluation.quantify import (
    DEFAULT_TARGET_PRIOR,
    FIELD_DEFAULT_METHOD,
    METHODS,
    ClassifyAndCount,
    PrevalenceEstimate,
    PriorCorrected,
    Quantifier,
    make_quantifier,
    params_from_model,
)
from malaria_screen.evaluation.proportion import clustered_proportion_ci, proportion_ci

logger = logging.getLogger(__name__)

__all__ = ["FIELD_METHODS", "binomial_ci", "decision_threshold", "field_quantifier", "estimate_parasitemia"]

#: Accepted values of ``method`` (``smear --parasitemia-method``).
FIELD_METHODS: tuple[str, ...] = tuple(METHODS)


def binomial_ci(k: int, n: int, *, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Confidence interval of a binomial proportion ``k / n``.

    Parameters
    ----------
    k, n : int
        Successes (infected cells) and trials (red cells), ``0 <= k <= n``.
    confidence : float
        Confidence level (default 0.95).
    method : {"wilson", "exact"}
        Wilson score interval or Clopper-Pearson ("exact").

    Returns
    -------
    (float, float)
        ``(lo, hi)`` fractions in [0, 1]; ``(0.0, 1.0)`` when ``n == 0``.

    Raises
    ------
    ValueError
        If ``k`` is not within ``[0, n]``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return proportion_ci(int(k), int(n), confidence=confidence, method=method)


def field_quantifier(model: Any, *, rescorer: Any | None = None, method: str | None = None,
                     target_prior: float = DEFAULT_TARGET_PRIOR) -> Quantifier | None:
    """The prevalence estimator for fields screened by ``model``.

    Parameters
    ----------
    model : CellModel or None
        A loaded cell model (its ``threshold``, ``metrics`` and ``source`` give the estimator's
        parameters, :func:`~malaria_screen.evaluation.quantify.params_from_model`); None = no
        classification (returns None).
    rescorer : CellRescorer, optional
        A site's second stage: classify and count at its own ``threshold``.
    method : str, optional
        A key of :data:`FIELD_METHODS`; default: the model's ``default_parasitemia_method`` (a
        site model from ``malaria-screen adapt``: ``"cc"`` at its count-matched threshold), else
        :data:`~malaria_screen.evaluation.quantify.FIELD_DEFAULT_METHOD`.
    target_prior : float, default=0.02
        The prior of ``"prior"``.

    Returns
    -------
    Quantifier or None
        A model without the parameters a method needs (no training prior: e.g. a bare
        ``predict``-able object) gets classify and count at its threshold, with a logged warning.

    Raises
    ------
    ValueError
        If ``method`` is unknown.
    """
    if model is None:
        return None
    if rescorer is not None:
        return ClassifyAndCount(float(getattr(rescorer, "threshold", 0.5)))
    method = method or getattr(model, "default_parasitemia_method", None) or FIELD_DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown parasitemia method {method!r}; choose from {list(FIELD_METHODS)}")
    try:
        return make_quantifier(method, params_from_model(model), target_prior=target_prior)
    except ValueError as exc:
        logger.warning("%s; parasitemia by classify and count at the model's threshold", exc)
        return ClassifyAndCount(float(getattr(model, "threshold", 0.5)))


def decision_threshold(quantifier: Quantifier | None, model: Any = None) -> float:
    """The cell probability (raw ``p_parasitized``) at or above which ``quantifier`` calls a cell
    Parasitized: the prior correction's ``threshold_`` (far above 0.5 at a smear's low prior), a
    count's ``threshold``; else ``model.threshold``, else 0.5. The gallery's "least
    certain" cells are those nearest to it, as in ``report.html`` and the web app."""
    for value in (getattr(quantifier, "threshold_", None), getattr(quantifier, "threshold", None),
                  getattr(model, "threshold", None)):
        if value is not None:
            return float(value)
    return 0.5


def estimate_parasitemia(quantifier: Quantifier, p: np.ndarray, *, groups: Sequence[Any] | None = None,
                         ci_method: str = "wilson", n_boot: int = 1000, seed: int = 0) -> PrevalenceEstimate:
    """A bag's parasitemia (a field's counted cells, or a slide's) with its 95 % interval.

    Parameters
    ----------
    quantifier : Quantifier
        From :func:`field_quantifier`.
    p : (n,) ndarray of float
        P(Parasitized) of the counted cells.
    groups : sequence of length n, optional
        The field of each cell, for a slide. With at least two fields, a count-based method's
        interval is the binomial one at the effective sample size of the fields' counts
        (:func:`~malaria_screen.evaluation.proportion.clustered_proportion_ci`: Kish 1965, Korn &
        Graubard 1998); another method's is the wider of its cluster bootstrap over fields and that
        interval of the cells it calls. With one field, another method's interval is the wider of
        its bootstrap over cells and the binomial interval of the cells it calls.
    ci_method : {"wilson", "exact"}
        Binomial interval of a count-based method (one field, or a slide's effective sample size).
    n_boot, seed : int
        Bootstrap replicates and seed.

    Returns
    -------
    PrevalenceEstimate
    """
    p = np.asarray(p, np.float64).reshape(-1)
    g = None if groups is None else np.asarray(groups)
    n_groups = 0 if g is None else len(np.unique(g))
    if isinstance(quantifier, (ClassifyAndCount, PriorCorrected)):
        if not p.size:
            return PrevalenceEstimate(None, (0.0, 1.0), quantifier.name, 0, 0, "empty bag")
        called = quantifier.labels(p)
        k = int(called.sum())
        if n_groups < 2:
            lo, hi = binomial_ci(k, int(p.size), method=ci_method)
            return PrevalenceEstimate(k / p.size, (lo, hi), quantifier.name, int(p.size), k, f"{ci_method} binomial interval")
        cp = _clustered(called, g, ci_method)
        return PrevalenceEstimate(k / p.size, cp.ci95, quantifier.name, int(p.size), k, cp.method)
    est = quantifier.estimate(p, groups=None if n_groups < 2 else g, n_boot=n_boot, seed=seed)
    if est.prevalence is None:
        return est
    if n_groups < 2:
        # one field: a bootstrap over cells that all sit far from the threshold has almost no width
        # (0 of 103 cells called: an upper bound of ~1e-34); never narrower than the binomial
        # interval of the cells the estimate calls
        blo, bhi = binomial_ci(est.n_called, est.n, method=ci_method)
        return PrevalenceEstimate(est.prevalence, (min(est.ci95[0], blo), max(est.ci95[1], bhi)), est.method, est.n,
                                  est.n_called, f"the wider of: {est.ci_method}; {ci_method} binomial interval of the cells called")
    # the cluster bootstrap over a few fields is far too narrow (evaluation.proportion): never narrower than the
    # effective-sample-size interval of the cells the estimate calls
    cp = _clustered(quantifier.labels(p), g, ci_method)
    lo, hi = min(est.ci95[0], cp.ci95[0]), max(est.ci95[1], cp.ci95[1])
    return PrevalenceEstimate(est.prevalence, (lo, hi), est.method, est.n, est.n_called,
                              f"the wider of: {est.ci_method}; {cp.method}")


def _clustered(called: np.ndarray, groups: np.ndarray, ci_method: str):
    """:func:`clustered_proportion_ci` of the cells ``called`` Parasitized, per group (field)."""
    _, gid = np.unique(groups, return_inverse=True)
    return clustered_proportion_ci(np.bincount(gid, weights=called.astype(np.float64)), np.bincount(gid).astype(np.float64),
                                   method=ci_method)
