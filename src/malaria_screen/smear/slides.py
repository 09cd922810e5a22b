"""A table of slides: each slide's parasitemia with an interval that accounts for clustering by field.

Cells of one field share its staining, focus and local parasite density, so they are not
independent draws from the slide: a binomial interval over the pooled cells is too narrow when
fields differ. A slide's parasitemia here is the ratio estimator over its fields,
``sum(infected_f) / sum(rbc_f)``, and its 95 % interval the binomial (Wilson) interval at the
effective sample size that the fields' spread leaves (design effect: Kish 1965; Korn & Graubard
1998; :func:`~malaria_screen.evaluation.proportion.clustered_proportion_ci`), never narrower than the
pooled cells' binomial interval. (A cluster bootstrap over fields, used before, gives a zero-width
interval to two fields with the same count; ``benchmarks/bench_slide_ci.py`` compares them.)

Fields the self-check found outside the model's domain are left out of a slide's totals, as
``smear`` leaves them out of ``summary.json``'s (``n_out_of_domain`` counts them). The table is
generic over the per-field estimate: ``infected_f`` is whatever each field's entry
reports, its parasitemia times its red-cell count (so a field estimated by another method, e.g.
posteriors corrected to a prior, enters with that estimate), or its count of infected cells when
it has no parasitemia.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from malaria_screen.evaluation.proportion import clustered_proportion_ci
from malaria_screen.smear.slide import counted_fields

__all__ = ["slide_row", "slide_table"]


def _field_counts(field: Mapping[str, Any]) -> tuple[float, float]:
    n = float(field["n_rbc"])
    p = field.get("parasitemia")
    return n, (float(p) * n if p is not None else float(field["n_infected"]))


def slide_row(slide: str, fields: Sequence[Mapping[str, Any]], *, n_failed: int = 0,
              include_out_of_domain: bool = False, classified: bool = True) -> dict[str, Any]:
    """One slide's row: fields, red cells, estimated infected cells, parasitemia and its 95 % CI.

    Parameters
    ----------
    slide : str
        The slide's name.
    fields : sequence of mapping
        Per-field entries of ``summary.json`` (``n_rbc``, ``n_infected``, ``parasitemia``, and
        ``in_domain`` when the self-check ran).
    n_failed : int, default=0
        Fields that could not be screened (reported, not used).
    include_out_of_domain : bool, default=False
        Count the fields the self-check found outside the model's domain (``in_domain`` False);
        by default they are left out of the row's totals, as out of ``summary.json``'s
        (:func:`~malaria_screen.smear.slide.counted_fields`), and counted in ``n_out_of_domain``.
    classified : bool, default=True
        False when the slide was screened without a cell model (``--no-classify``): its red cells
        are counted, but it has no infected estimate or parasitemia (None, interval (0, 1)), never 0 %.

    Returns
    -------
    dict
        ``slide``, ``n_fields`` (screened), ``n_out_of_domain``, ``n_failed``, ``n_rbc``,
        ``infected_estimate``, ``parasitemia`` (None without red cells or unclassified), ``ci95_low``,
        ``ci95_high`` ((0, 1) without red cells or unclassified; with one field, its binomial interval),
        ``n_effective`` (the cell count the interval was taken at), ``ci_method``.
    """
    n_out = sum(f.get("in_domain") is False for f in fields)
    keep = counted_fields([f.get("in_domain") for f in fields], include_out_of_domain=include_out_of_domain)
    fields = [f for f, k in zip(fields, keep) if k]
    counts = np.array([_field_counts(f) for f in fields], np.float64).reshape(-1, 2)
    n_rbc, infected = counts[:, 0], np.minimum(counts[:, 1], counts[:, 0])
    if not classified:
        return {"slide": slide, "n_fields": len(keep), "n_out_of_domain": int(n_out), "n_failed": int(n_failed),
                "n_rbc": int(n_rbc.sum()), "infected_estimate": None, "parasitemia": None, "ci95_low": 0.0, "ci95_high": 1.0,
                "n_effective": None, "ci_method": "not classified"}
    cp = clustered_proportion_ci(infected, n_rbc)
    return {"slide": slide, "n_fields": len(keep), "n_out_of_domain": int(n_out), "n_failed": int(n_failed), "n_rbc": int(n_rbc.sum()),
            "infected_estimate": round(float(infected.sum()), 3), "parasitemia": cp.estimate,
            "ci95_low": cp.ci95[0], "ci95_high": cp.ci95[1], "n_effective": round(cp.n_effective, 1), "ci_method": cp.method}


def slide_table(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of :func:`slide_row`, one per slide, from each slide's ``summary.json`` document.

    Parameters
    ----------
    summaries : mapping of str to mapping
        Slide name to the summary :func:`~malaria_screen.smear.report.run_smear` returned.

    Returns
    -------
    list of dict
        In the order of ``summaries``.
    """
    return [slide_row(name, s["fields"], n_failed=s.get("n_failed", 0),
                      include_out_of_domain=bool(s.get("include_out_of_domain", False)),
                      classified=bool(s.get("classified", True))) for name, s in summaries.items()]
