"""Confidence intervals of a proportion (a field's or a slide's parasitemia), SciPy's special functions only.

- :func:`proportion_ci`: the Wilson score interval (Wilson 1927) or the Clopper-Pearson "exact"
  interval (Clopper & Pearson 1934) of ``k`` successes in ``n`` trials: the same numbers as
  ``scipy.stats.binomtest(k, n).proportion_ci(...)`` (tested), without importing ``scipy.stats``
  (about 1.5 s of a ``smear`` command's start-up on a 2-core machine), and for non-integer ``k``
  and ``n`` too (effective counts, below).
- :func:`clustered_proportion_ci`: a slide's parasitemia pooled over its fields, whose cells are
  not independent draws from the slide (a field shares its stain, focus and local parasite
  density). The ratio estimator ``sum(k_f) / sum(n_f)`` gets the design-based (linearisation)
  variance over fields; its design effect ``deff`` (that variance over the binomial one) shrinks
  the pooled cell count to an *effective sample size*, ``n / deff`` (Kish 1965; Korn & Graubard
  1998), and the binomial interval is taken at that size. The design effect is never taken below 1:
  fields that agree more than independent cells would is chance with a few fields, not evidence
  that cells are more informative than independent draws, so the interval is never narrower than
  the binomial interval of the pooled cells. Korn & Graubard also shrink the effective size for the
  few degrees of freedom of a handful of fields (``df=True``: by ``(z / t_{G-1})^2``, 1/42 for two
  fields); not the default: it widens a two-field slide's interval about tenfold for a spread
  between fields that the IML dev fields do not show (``benchmarks/bench_slide_ci.py`` measures
  both).

Why not the cluster bootstrap over fields (what ``smear`` used before): with a few fields its
percentile interval is far too narrow (two fields with the same count give a zero-width interval),
and in simulated slides of a few fields its 95 % interval misses the slide's parasitemia far more
often than one time in twenty; ``benchmarks/bench_slide_ci.py`` measures both (docs/quantification.md).

References
----------
- E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 22, 1927.
- C. J. Clopper, E. S. Pearson, "The use of confidence or fiducial limits illustrated in the case of
  the binomial", Biometrika 26(4), 1934.
- L. Kish, *Survey Sampling*, Wiley, 1965 (design effect, effective sample size).
- E. L. Korn, B. I. Graubard, "Confidence intervals for proportions with small expected number of
  positive counts estimated from survey data", Survey Methodology 24(2), 1998.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CI_METHODS", "ClusteredProportion", "clustered_proportion_ci", "proportion_ci"]

#: Accepted ``method`` values: Wilson score, or Clopper-Pearson ("exact").
CI_METHODS = ("wilson", "exact")


def _check(method: str, confidence: float) -> None:
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {CI_METHODS}, got {method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def proportion_ci(k: float, n: float, *, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Interval of a binomial proportion ``k / n`` (Wilson 1927 or Clopper & Pearson 1934).

    Parameters
    ----------
    k, n : float
        Successes (infected cells) and trials (red cells), ``0 <= k <= n``; need not be integers
        (an effective count from :func:`clustered_proportion_ci`).
    confidence : float, default=0.95
    method : {"wilson", "exact"}
        Wilson score interval (no continuity correction), or Clopper-Pearson.

    Returns
    -------
    (float, float)
        ``(lo, hi)``, fractions in [0, 1]; ``(0.0, 1.0)`` when ``n == 0``. For integer counts,
        equal to ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method)``.

    Raises
    ------
    ValueError
        If ``k`` is not within ``[0, n]``, ``method`` is unknown, or ``confidence`` is not in (0, 1).
    """
    from scipy.special import betaincinv, ndtri

    _check(method, confidence)
    k, n = float(k), float(n)
    if not (np.isfinite(k) and np.isfinite(n)) or n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    if method == "exact":
        lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
        hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
        return (max(0.0, lo), min(1.0, hi))
    z = float(ndtri(1 - alpha / 2))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, float(centre - half))  # exact ends, not a rounding residue
    hi = 1.0 if k == n else min(1.0, float(centre + half))
    return (lo, hi)


@dataclass(frozen=True)
class ClusteredProportion:
    """A proportion pooled over clusters (fields), with its interval.

    Attributes
    ----------
    estimate : float or None
        ``sum(k) / sum(n)``; None when ``sum(n) == 0``.
    ci95 : (float, float)
        The interval (at the requested confidence, 95 % by default).
    n : float
        Pooled trials (red cells).
    n_effective : float
        The effective sample size the interval was taken at (``n`` when the fields look like
        independent cells, or when there are fewer than 2 fields).
    design_effect : float or None
        The estimated design effect before the floor at 1 (and any degrees-of-freedom factor);
        None with fewer than 2 fields or at a proportion of 0 or 1.
    n_clusters : int
    method : str
        A sentence for ``summary.json`` / ``slides.csv``.
    """

    estimate: float | None
    ci95: tuple[float, float]
    n: float
    n_effective: float
    design_effect: float | None
    n_clusters: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``ci95`` as a list)."""
        return {"estimate": self.estimate, "ci95": list(self.ci95), "n": self.n, "n_effective": self.n_effective,
                "design_effect": self.design_effect, "n_clusters": self.n_clusters, "method": self.method}


def clustered_proportion_ci(k: Any, n: Any, *, confidence: float = 0.95, method: str = "wilson",
                            df: bool = False) -> ClusteredProportion:
    """A slide's proportion from its fields' counts, with an interval that accounts for clustering by field.

    The ratio estimator ``p = sum(k) / sum(n)``; the linearisation variance over the ``G`` fields,
    ``v = G / (G - 1) * sum((k_f - p n_f)^2) / N^2``; the design effect ``deff = v / (p (1 - p) / N)``;
    the effective sample size ``N_eff = N / max(1, deff * (t_{G-1} / z)^2)`` (Kish 1965;
    Korn & Graubard 1998: ``t_{G-1}`` and ``z`` are the ``1 - alpha/2`` quantiles of Student's t with
    ``G - 1`` degrees of freedom and of the normal); the interval is :func:`proportion_ci` of
    ``(p N_eff, N_eff)``. With fewer than 2 fields, or ``p`` at 0 or 1, it is the binomial interval of
    the pooled counts.

    Parameters
    ----------
    k, n : array-like of shape (G,)
        Per field: infected cells (or a field's estimated infected cells: non-integer is fine)
        and red cells, ``0 <= k_f <= n_f``.
    confidence : float, default=0.95
    method : {"wilson", "exact"}
    df : bool, default=False
        Korn & Graubard's degrees-of-freedom factor (see the module doc).

    Returns
    -------
    ClusteredProportion

    Raises
    ------
    ValueError
        If ``k`` and ``n`` differ in length, hold negative or non-finite values, or ``k_f > n_f``;
        or on a bad ``method`` / ``confidence``.
    """
    from scipy.special import ndtri, stdtrit

    _check(method, confidence)
    k = np.asarray(k, np.float64).reshape(-1)
    n = np.asarray(n, np.float64).reshape(-1)
    if k.shape != n.shape:
        raise ValueError(f"k and n differ in length: {k.size} vs {n.size}")
    if not (np.isfinite(k).all() and np.isfinite(n).all()) or (k < 0).any() or (n < 0).any() or (k > n + 1e-9).any():
        raise ValueError("need finite 0 <= k_f <= n_f for every field")
    g = int(k.size)
    total = float(n.sum())
    name = "wilson" if method == "wilson" else "Clopper-Pearson"
    if total <= 0:
        return ClusteredProportion(None, (0.0, 1.0), 0.0, 0.0, None, g, "no red cells")
    p = min(1.0, float(k.sum()) / total)
    if g < 2 or p <= 0.0 or p >= 1.0:
        why = "one field" if g < 2 else f"{g} fields, none infected" if p <= 0 else f"{g} fields, all infected"
        return ClusteredProportion(p, proportion_ci(p * total, total, confidence=confidence, method=method), total, total,
                                   None, g, f"{name} binomial interval of the pooled cells ({why})")
    v = g / (g - 1) * float(((k - p * n) ** 2).sum()) / total**2
    deff = v / (p * (1 - p) / total)
    q = 1 - (1 - confidence) / 2
    factor = max(1.0, deff * ((float(stdtrit(g - 1, q)) / float(ndtri(q))) ** 2 if df else 1.0))
    n_eff = total / factor
    return ClusteredProportion(p, proportion_ci(p * n_eff, n_eff, confidence=confidence, method=method), total, n_eff,
                               float(deff), g,
                               f"{name} interval at the effective sample size over {g} fields "
                               f"(design effect {deff:.2f}{', degrees of freedom' if df else ''}; Kish 1965)")
