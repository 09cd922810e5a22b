"""Several fields of one slide, in memory: per-field results, the slide total over in-domain fields, flags, gallery.

What the web app's whole-field tab shows (the CLI's ``smear`` writes the same to disk with
:func:`~malaria_screen.smear.report.run_smear`). A field that is not a blood smear, or cannot
be screened, gets a per-field error and the others go on. A field outside the model's domain
(:mod:`malaria_screen.smear.domain`) is left out of the slide total unless
``include_out_of_domain``, and named in a warning that says what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from malaria_screen.evaluation.proportion import clustered_proportion_ci
from malaria_screen.smear.domain import OUT_OF_DOMAIN_ADVICE
from malaria_screen.smear.gallery import GalleryCell, gallery_cells, select_gallery
from malaria_screen.smear.parasitemia import decision_threshold, field_quantifier
from malaria_screen.smear.screen import FieldResult, screen_field

logger = logging.getLogger(__name__)

__all__ = ["SlideResult", "counted_fields", "out_of_domain_warning", "screen_slide"]


def counted_fields(in_domain: Iterable[bool | None], *, include_out_of_domain: bool = False) -> list[bool]:
    """Which fields count in the slide total: all but those with ``in_domain is False`` (unless
    ``include_out_of_domain``); an unchecked field (None) counts."""
    return [include_out_of_domain or d is not False for d in in_domain]


def out_of_domain_warning(names: Sequence[str], *, included: bool = False) -> str | None:
    """The warning naming the fields outside the model's domain and what to do; None if none."""
    if not names:
        return None
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    where = ("they are INCLUDED in the slide total (include_out_of_domain)" if included
             else "they are left out of the slide total")
    return (f"{len(names)} field(s) outside the model's domain ({shown}): {where}. "
            + OUT_OF_DOMAIN_ADVICE.replace(" and is left out of the slide total", ""))


@dataclass
class SlideResult:
    """Result of :func:`screen_slide`.

    Attributes
    ----------
    fields : list of FieldResult
        Screened fields, in input order.
    errors : list of (str, str)
        ``(name, reason)`` of fields that could not be screened (not a smear, unreadable...).
    n_rbc, n_infected : int
        Totals over the counted fields.
    parasitemia : float or None
        ``n_infected / n_rbc`` over the counted fields (None without a model or cell).
    parasitemia_ci95 : list of float
        95 % interval (fractions): the binomial one at the counted fields' effective sample size
        (:func:`~malaria_screen.evaluation.proportion.clustered_proportion_ci`), never narrower than
        the pooled cells' binomial interval.
    out_of_domain : list of str
        Names of the fields with ``in_domain`` False.
    included_out_of_domain : bool
        Whether they count in the totals.
    warnings : list of str
    gallery : tuple
        ``(parasitized, uncertain, n_parasitized)`` of :func:`~malaria_screen.smear.gallery.select_gallery`.
    """

    fields: list[FieldResult]
    errors: list[tuple[str, str]]
    n_rbc: int
    n_infected: int
    parasitemia: float | None
    parasitemia_ci95: list[float]
    out_of_domain: list[str]
    included_out_of_domain: bool
    warnings: list[str] = field(default_factory=list)
    gallery: tuple[list[GalleryCell], list[GalleryCell], int] = ([], [], 0)


def screen_slide(fields: Sequence[tuple[str, np.ndarray]], model: Any, *, domain_reference: Any | None = None,
                 include_out_of_domain: bool = False, rescorer: Any | None = None, ci_method: str = "wilson",
                 max_parasitized: int = 60, n_uncertain: int = 12, **screen_kwargs) -> SlideResult:
    """Screen the fields of one slide held in memory.

    Parameters
    ----------
    fields : sequence of (str, np.ndarray)
        ``(name, (H, W, 3) uint8 RGB)`` per field.
    model : CellModel or None
        As :func:`~malaria_screen.smear.screen.screen_field`.
    domain_reference : DomainReference, optional
        The model's self-check reference.
    include_out_of_domain : bool
        Count fields outside the domain in the slide total.
    rescorer, ci_method, **screen_kwargs
        Passed to :func:`~malaria_screen.smear.screen.screen_field`.
    max_parasitized, n_uncertain : int
        Gallery size (:func:`~malaria_screen.smear.gallery.select_gallery`).

    Returns
    -------
    SlideResult
    """
    thr = 0.5
    if model is not None:  # the gallery's threshold: where the fields' estimator calls a cell Parasitized (as smear's report)
        if screen_kwargs.get("quantifier") is None:  # one estimator for every field, built once
            screen_kwargs["quantifier"] = field_quantifier(model, rescorer=rescorer)
        thr = decision_threshold(screen_kwargs["quantifier"], rescorer if rescorer is not None else model)
    results, errors, candidates = [], [], []
    for name, rgb in fields:
        try:
            res = screen_field(rgb, model, image_name=name, rescorer=rescorer, ci_method=ci_method,
                               domain_reference=domain_reference, **screen_kwargs)
        except ValueError as exc:  # not a smear, too small, wrong shape: this field's error
            errors.append((name, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad field never costs the others
            logger.exception("field %s failed", name)
            errors.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        results.append(res)
        if model is not None and (include_out_of_domain or res.in_domain is not False):  # the counted fields' cells
            candidates += gallery_cells(rgb, res, threshold=thr, max_parasitized=max_parasitized, n_uncertain=n_uncertain)
    counted = counted_fields([r.in_domain for r in results], include_out_of_domain=include_out_of_domain)
    infected = [r.n_infected for r, c in zip(results, counted) if c]
    rbc = [r.n_rbc for r, c in zip(results, counted) if c]
    n, k = sum(rbc), sum(infected)
    ood = [r.image for r in results if r.in_domain is False]
    warnings = [w for w in (out_of_domain_warning(ood, included=include_out_of_domain),) if w]
    # fields are clusters of cells: the binomial interval at the fields' effective sample size (evaluation.proportion)
    lo, hi = clustered_proportion_ci(infected, rbc, method=ci_method).ci95 if model is not None and n else (0.0, 1.0)
    return SlideResult(
        fields=results, errors=errors, n_rbc=n, n_infected=k,
        parasitemia=(k / n) if (n and model is not None) else None, parasitemia_ci95=[lo, hi],
        out_of_domain=ood, included_out_of_domain=include_out_of_domain, warnings=warnings,
        gallery=select_gallery(candidates, threshold=thr, max_parasitized=max_parasitized, n_uncertain=n_uncertain),
    )
