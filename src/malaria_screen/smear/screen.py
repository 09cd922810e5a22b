"""Whole-field screening: segment the red cells, classify each cell crop, estimate parasitemia.

Pipeline per field (the design of the NLM Malaria Screener, Poostchi et al. 2018 /
Yang et al. 2020): :func:`~malaria_screen.smear.segment.segment_field` → optional stain
normalisation (Reinhard 2001 / Macenko 2009, :mod:`malaria_screen.smear.stain`) → NIH-style crops
(:mod:`malaria_screen.smear.crops`) → the cell classifier in batches → per-cell probability and
label → field parasitemia = infected / all red cells with a binomial 95 % confidence interval
(Wilson score interval by default, Clopper-Pearson optional: :mod:`malaria_screen.evaluation.proportion`).

The model is duck-typed: any object with ``predict(list_of_uint8_rgb_arrays) -> (N,) float``
(probability of Parasitized) and a ``threshold`` attribute works, e.g.
:class:`malaria_screen.inference.Predictor` or a test fake.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from malaria_screen.smear.crops import cell_crops
from malaria_screen.smear.domain import OUT_OF_DOMAIN_ADVICE, domain_check, model_features, require_smear
from malaria_screen.smear.parasitemia import estimate_parasitemia, field_quantifier
from malaria_screen.smear.segment import CellProps, Segmentation, SegmentConfig, segment_field
from malaria_screen.smear.stain import check_stain_method, normalize_stain, rescale, scale_factor_to_nih

logger = logging.getLogger(__name__)

__all__ = ["CellModel", "CellResult", "FieldResult", "predict_batched", "screen_field"]


class CellModel(Protocol):
    """What :func:`screen_field` needs from a cell classifier."""

    threshold: float

    def predict(self, images: list) -> np.ndarray:  # pragma: no cover - protocol
        ...


@dataclass
class CellResult:
    """One cell of a field: ``bbox`` ``[x, y, w, h]`` px, ``area_px``, ``p_parasitized`` in
    [0, 1] (None if not classified), ``label`` ("Parasitized"/"Uninfected"/None), ``border``.

    ``bbox`` is the whole cell: for a cell that touches or overlaps others it reaches under its
    neighbours (:attr:`~malaria_screen.smear.segment.Segmentation.boxes`); ``area_px`` is the
    area of its own mask, its visible share."""

    id: int
    bbox: list[int]
    area_px: int
    p_parasitized: float | None
    label: str | None
    border: bool

    def to_json(self) -> dict[str, Any]:
        """The cell as a JSON-ready dict: ``dataclasses.asdict``'s keys and values, without its
        recursive deep copy (a few ms per field of 130 cells)."""
        return {"id": self.id, "bbox": list(self.bbox), "area_px": self.area_px, "p_parasitized": self.p_parasitized,
                "label": self.label, "border": self.border}


@dataclass
class FieldResult:
    """Screening result of one field; :meth:`to_json` gives the per-field JSON document.

    Attributes
    ----------
    image : str
        Field name.
    width, height : int
        Field size, px.
    n_rbc, n_infected : int
        Counted red cells and those labelled Parasitized.
    parasitemia : float or None
        Estimated prevalence of Parasitized among the counted cells (fraction 0..1; for the
        count-based methods ``n_infected / n_rbc``); None when no cell was found.
    parasitemia_ci95 : list of float
        95 % interval ``[lo, hi]`` (fractions).
    parasitemia_method : str or None
        The estimator (:data:`~malaria_screen.smear.parasitemia.FIELD_METHODS`); None unclassified.
    cells : list of CellResult
    rbc_diameter_px : float
        Typical RBC diameter used for segmentation, px.
    n_wbc : int
        White blood cells detected and excluded.
    seconds : dict
        Wall time per stage, s.
    labels : np.ndarray or None
        ``(H, W)`` int32 label image (not serialised).
    in_domain : bool or None
        Self-check (:mod:`malaria_screen.smear.domain`): False when the field's cells lie outside
        the model's training cells (its parasitemia is unreliable); None when not checked (no
        reference beside the model, a back-end without features, no cell).
    domain_score, domain_threshold : float or None
        The field's domain score (median cell distance) and the reference's threshold.
    """

    image: str
    width: int
    height: int
    n_rbc: int
    n_infected: int
    parasitemia: float | None
    parasitemia_ci95: list[float]
    cells: list[CellResult]
    rbc_diameter_px: float
    n_wbc: int = 0
    classified: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = field(default=None, repr=False)
    wbc_boxes: list[tuple[int, int, int, int]] = field(default_factory=list, repr=False)
    in_domain: bool | None = None
    domain_score: float | None = None
    domain_threshold: float | None = None
    parasitemia_method: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (no NaN: missing values are None)."""
        d = {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "n_rbc": self.n_rbc,
            "n_infected": self.n_infected,
            "parasitemia": self.parasitemia,
            "parasitemia_ci95": list(self.parasitemia_ci95),
            "parasitemia_method": self.parasitemia_method,
            "rbc_diameter_px": None if not np.isfinite(self.rbc_diameter_px) else round(float(self.rbc_diameter_px), 2),
            "n_wbc": self.n_wbc,
            "classified": self.classified,
            "in_domain": self.in_domain,
            "domain_score": None if self.domain_score is None else round(float(self.domain_score), 3),
            "domain_threshold": None if self.domain_threshold is None else round(float(self.domain_threshold), 3),
            "domain_note": ("outside the model's domain: " + OUT_OF_DOMAIN_ADVICE) if self.in_domain is False else None,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "cells": [c.to_json() for c in self.cells],
        }
        return d


def _checkable(rgb: Any) -> bool:
    """A uint8 (H, W, 3) image of at least 8 px a side: what the smear check reads (anything else is
    refused, or converted, by the segmentation with its own message)."""
    return isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 \
        and min(rgb.shape[:2]) >= 8


def predict_batched(model: CellModel, crops: list[np.ndarray], batch_size: int) -> np.ndarray:
    """``model.predict`` over ``crops`` in batches of ``batch_size``.

    Parameters
    ----------
    model : CellModel
        ``predict(list of (h, w, 3) uint8) -> (N,) p_parasitized``.
    crops : list of (h, w, 3) uint8 ndarray
        Cell crops.
    batch_size : int
        Crops per call.

    Returns
    -------
    (N,) float64 ndarray
        p_parasitized per crop, in order (empty for no crops).

    Raises
    ------
    ValueError
        If the model returns a different number of probabilities than it was given crops.
    """
    out = []
    for s in range(0, len(crops), batch_size):
        p = np.asarray(model.predict(crops[s : s + batch_size]), dtype=np.float64).reshape(-1)
        if len(p) != len(crops[s : s + batch_size]):
            raise ValueError(f"model returned {len(p)} probabilities for {len(crops[s:s + batch_size])} crops")
        out.append(p)
    return np.concatenate(out) if out else np.zeros(0)


def screen_field(
    rgb: np.ndarray,
    model: CellModel | None,
    *,
    image_name: str = "field",
    segment_config: SegmentConfig | None = None,
    stain: str = "none",
    scale_to_nih: bool = False,
    count_border_cells: bool = True,
    batch_size: int = 256,
    ci_method: str = "wilson",
    segmentation: Segmentation | None = None,
    rescorer: Any | None = None,
    domain_reference: Any | None = None,
    smear_check: bool = True,
    quantifier: Any | None = None,
) -> FieldResult:
    """Screen one thin-smear field.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    model : CellModel or None
        Object with ``predict(list of (h, w, 3) uint8) -> (N,) p_parasitized`` and
        ``threshold``. None = segmentation only (no labels, parasitemia None).
    image_name : str
        Name recorded in the result.
    segment_config : SegmentConfig, optional
        Segmentation settings (e.g. ``pixel_size_um``; by default the RBC scale is estimated
        from the image); default ``SegmentConfig()``.
    stain : {"none", "reinhard", "macenko"}
        Stain normalisation of the cell pixels towards the NIH training crops.
    scale_to_nih : bool
        Resize crops so a cell is ~130 px across (the NIH crop scale) before classification.
    count_border_cells : bool
        Count cells cut by the image border in ``n_rbc`` / ``n_infected`` (they are always
        listed, with ``border: true``).
    batch_size : int
        Crops per ``model.predict`` call.
    ci_method : {"wilson", "exact"}
        Binomial interval for the parasitemia.
    segmentation : Segmentation, optional
        Precomputed segmentation (skips segmentation; ``segment_config`` is then unused).
    rescorer : CellRescorer, optional
        Second stage (:class:`~malaria_screen.smear.rescore.CellRescorer`): each cell's
        ``p_parasitized`` becomes the rescorer's probability from the cell's colour/shape
        features and the model's logit, labelled with the rescorer's threshold. Used only when
        ``model`` is given.
    domain_reference : DomainReference, optional
        The model's self-check reference (:func:`~malaria_screen.smear.domain.load_reference`):
        with a model that gives features (``predict_with_features``) the field gets
        ``in_domain`` and ``domain_score`` from the same forward pass.
    smear_check : bool
        Refuse an image that is not a blood smear field (:func:`~malaria_screen.smear.domain.check_smear`,
        before segmentation: blank, noise, photos, text). Applies to uint8 images of at least
        8 x 8 px (what decoding gives); other arrays go straight to the segmentation.
    quantifier : Quantifier, optional
        The parasitemia estimator and cell labeller; default
        :func:`~malaria_screen.smear.parasitemia.field_quantifier` of ``model`` and ``rescorer``
        (the prior correction to 2 %; the rescorer's threshold with a rescorer).

    Returns
    -------
    FieldResult

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(H, W, 3)``, ``stain`` is unknown, or the model returns the wrong
        number of probabilities.
    NotASmearError
        (a ValueError) If ``smear_check`` and the image is not a blood smear field; the message
        is the reason.
    """
    t0 = time.perf_counter()
    if smear_check and segmentation is None and _checkable(rgb):
        require_smear(rgb)
    seg = segmentation or segment_field(rgb, segment_config)
    props: list[CellProps] = seg.cells()
    t1 = time.perf_counter()
    h, w = rgb.shape[:2]
    probs = feats = None
    if model is not None and props:
        src = normalize_stain(rgb, stain, mask=seg.labels > 0) if stain != "none" else rgb
        crops = cell_crops(src, seg.labels, props)
        if scale_to_nih:
            f = scale_factor_to_nih(seg.rbc_diameter_px)
            crops = [rescale(c, f) for c in crops]
        t2 = time.perf_counter()
        both = model_features(model, crops, batch_size=batch_size) if domain_reference is not None else None
        probs, feats = both if both is not None else (predict_batched(model, crops, batch_size), None)
        if rescorer is not None:
            probs = rescorer.rescore_field(rgb, seg, props, probs)
    else:
        t2 = time.perf_counter()
        check_stain_method(stain)
    t3 = time.perf_counter()
    classified = model is not None
    if classified and quantifier is None:
        quantifier = field_quantifier(model, rescorer=rescorer)
    is_counted = np.asarray([count_border_cells or not c.border for c in props], bool)
    called = np.zeros(len(props), bool)
    est = None
    if classified:
        p_all = np.zeros(0) if probs is None else np.asarray(probs, np.float64)
        est = estimate_parasitemia(quantifier, p_all[is_counted], ci_method=ci_method)
        called = quantifier.labels(p_all) if p_all.size else called
    cells = []
    for i, c in enumerate(props):
        p = None if probs is None else float(probs[i])
        lab = None if p is None else ("Parasitized" if called[i] else "Uninfected")
        cells.append(CellResult(c.id, list(c.bbox), c.area_px, p, lab, c.border))
    n = int(is_counted.sum())
    k = int((called & is_counted).sum())
    par = est.prevalence if (n and classified) else None
    ci = est.ci95 if (n and classified) else (0.0, 1.0)
    dom = domain_check(feats, domain_reference)
    return FieldResult(
        image=image_name,
        width=w,
        height=h,
        n_rbc=n,
        n_infected=k,
        parasitemia=par,
        parasitemia_ci95=[ci[0], ci[1]],
        cells=cells,
        rbc_diameter_px=seg.rbc_diameter_px,
        n_wbc=len(seg.wbc_boxes),
        classified=classified,
        seconds={"segment": t1 - t0, "crops": t2 - t1, "classify": t3 - t2, "total": t3 - t0},
        labels=seg.labels,
        wbc_boxes=list(seg.wbc_boxes),
        in_domain=dom.in_domain,
        domain_score=dom.score,
        domain_threshold=dom.threshold,
        parasitemia_method=quantifier.name if classified else None,
    )
