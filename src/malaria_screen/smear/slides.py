"""A table of slides: each slide's parasitemia with an interval that accounts for clustering by field.

Cells of one field share its staining, focus and local parasite density, so they are not
independent draws from the slide: a binomial interval over the pooled cells is too narrow when
fields differ. A slide's parasitemia here is the ratio estimator over its fields,
``sum(infected_f) / sum(rbc_f)``, and its 95 % interval is the percentile interval of that ratio
under the cluster bootstrap over fields (Field & Welsh 2007;
:func:`~malaria_screen.evaluation.bootstrap.cluster_bootstrap_weights`): whole fields are
resampled, never single cells.

The table is generic over the per-field estimate: ``infected_f`` is whatever each field's entry
reports, its parasitemia times its red-cell count (so a field estimated by another method, e.g.
posteriors corrected to a prior, enters with that estimate), or its count of infected cells when
it has no parasitemia.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from malaria_screen.evaluation.bootstrap import cluster_bootstrap_weights

__all__ = ["slide_row", "slide_table"]


def _field_counts(field: Mapping[str, Any]) -> tuple[float, float]:
    n = float(field["n_rbc"])
    p = field.get("parasitemia")
    return n, (float(p) * n if p is not None else float(field["n_infected"]))


def slide_row(slide: str, fields: Sequence[Mapping[str, Any]], *, n_failed: int = 0, n_boot: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """One slide's row: fields, red cells, estimated infected cells, parasitemia and its 95 % CI.

    Parameters
    ----------
    slide : str
        The slide's name.
    fields : sequence of mapping
        Per-field entries of ``summary.json`` (``n_rbc``, ``n_infected``, ``parasitemia``).
    n_failed : int, default=0
        Fields that could not be screened (reported, not used).
    n_boot, seed : int
        Cluster-bootstrap replicates over fields, and their seed.

    Returns
    -------
    dict
        ``slide``, ``n_fields``, ``n_failed``, ``n_rbc``, ``infected_estimate``, ``parasitemia``
        (None without red cells), ``ci95_low``, ``ci95_high`` (the cluster-bootstrap percentile
        interval; (0, 1) without red cells; with a single field, the interval of its bootstrap is
        degenerate and reported as that field's own estimate), ``ci_method``.
    """
    counts = np.array([_field_counts(f) for f in fields], np.float64).reshape(-1, 2)
    n_rbc, infected = counts[:, 0], counts[:, 1]
    total = float(n_rbc.sum())
    row: dict[str, Any] = {"slide": slide, "n_fields": len(fields), "n_failed": int(n_failed), "n_rbc": int(total),
                           "infected_estimate": round(float(infected.sum()), 3),
                           "ci_method": f"cluster bootstrap over fields ({n_boot} replicates, percentile)"}
    if total <= 0:
        return {**row, "parasitemia": None, "ci95_low": 0.0, "ci95_high": 1.0}
    weights, _ = cluster_bootstrap_weights(np.arange(len(fields)), n_boot=n_boot, seed=seed)
    den = weights @ n_rbc
    ratios = np.divide(weights @ infected, den, out=np.zeros(len(den)), where=den > 0)
    lo, hi = np.percentile(ratios[den > 0], [2.5, 97.5]) if (den > 0).any() else (0.0, 1.0)
    return {**row, "parasitemia": float(infected.sum() / total), "ci95_low": float(lo), "ci95_high": float(hi)}


def slide_table(summaries: Mapping[str, Mapping[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of :func:`slide_row`, one per slide, from each slide's ``summary.json`` document.

    Parameters
    ----------
    summaries : mapping of str to mapping
        Slide name to the summary :func:`~malaria_screen.smear.report.run_smear` returned.
    n_boot, seed : int

    Returns
    -------
    list of dict
        In the order of ``summaries``.
    """
    return [slide_row(name, s["fields"], n_failed=s.get("n_failed", 0), n_boot=n_boot, seed=seed)
            for name, s in summaries.items()]
