"""Scoring one field's detections against its annotation, and pooling fields into metrics.

- **IML_Malaria** boxes (:func:`evaluate_iml_field`): detections are matched one-to-one to
  annotated boxes by maximum total IoU (Hungarian algorithm,
  :func:`~malaria_screen.smear.boxes.match_boxes`) among pairs with IoU ≥ 0.5. Every
  non-``difficult`` box is a red cell; boxes of type ``ring``, ``trophozoite``, ``schizont`` or
  ``gametocyte`` are infected cells. ``difficult`` boxes are ignored: detections matched to
  them are neither true nor false positives. Infected-cell sensitivity = matched infected boxes
  whose detection is predicted infected / all infected boxes; PPV = predicted-infected detections
  matched to an infected box / all predicted-infected detections. Field parasitemia error =
  |predicted − annotated| in percentage points, annotated = infected boxes / non-difficult
  boxes (:func:`summarize_iml`).
- **Chula-RBC-12** points, one per red cell (:func:`match_points`): count error per field;
  point-in-detection matching (a point inside a detected cell's mask, each detection and each
  point used once) gives recall and precision.

Pure functions: no file I/O, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from malaria_screen.smear.boxes import match_boxes, scale_boxes, touches_border
from malaria_screen.smear.labels import GroundTruthBox

__all__ = ["FieldMatch", "evaluate_iml_field", "match_points", "ratio", "summarize_iml"]


@dataclass
class FieldMatch:
    """Matching counts for one IML field.

    Attributes are counts except ``parasitemia_pred`` / ``parasitemia_true`` (fractions 0..1)
    and ``seconds`` (wall time of the screening, s). ``inf_matched``: infected boxes matched to
    a detection, whatever its label (what a perfect classifier of these detections would find).
    """

    image: str
    n_pred: int
    n_gt: int
    tp: int
    fp: int
    fn: int
    inf_gt: int
    inf_tp: int
    inf_pred: int
    inf_pred_tp: int
    parasitemia_pred: float
    parasitemia_true: float
    seconds: float = float("nan")
    fp_border: int = 0
    inf_matched: int = 0
    extra: dict = field(default_factory=dict)


def evaluate_iml_field(
    image: str,
    pred_boxes: np.ndarray,
    pred_infected: np.ndarray | None,
    gt: list[GroundTruthBox],
    *,
    iou_threshold: float = 0.5,
    seconds: float = float("nan"),
    pred_border: np.ndarray | None = None,
    image_shape: tuple[int, int] | None = None,
    border_margin_px: int = 2,
    box_scale: float = 1.0,
) -> FieldMatch:
    """Match one field's detections to its annotation.

    Besides the strict counts, an *interior* protocol is recorded in ``extra`` (``tp_int``,
    ``fp_int``, ``fn_int``): every cell cut by the image border is left out on both sides (a
    detection or a box within ``border_margin_px`` of the edge, and any match involving one),
    because IML leaves most border-cut cells unboxed and clinical counts skip cut cells.

    Parameters
    ----------
    image : str
        Field name (for the record).
    pred_boxes : np.ndarray
        ``(N, 4)`` detected cell boxes ``(x, y, w, h)`` px.
    pred_infected : np.ndarray or None
        ``(N,)`` bool predicted labels; None when no classifier was run (infected metrics 0).
    gt : list of GroundTruthBox
        Annotation of the field.
    iou_threshold : float
        Minimum IoU of a match.
    seconds : float
        Screening wall time for the field, s.
    pred_border : np.ndarray, optional
        ``(N,)`` bool border flags; unmatched border detections are counted in ``fp_border``
        (IML leaves some edge cells unboxed).
    image_shape : (int, int), optional
        ``(H, W)`` of the field, px; enables the interior protocol.
    border_margin_px : int, default=2
    box_scale : float, default=1.0
        Detections are matched with their boxes scaled by this factor about their centres (width
        and height): a box *convention* correction. Detection boxes are tight around the cell
        (its mask, or the whole cell for touching cells); IML's annotators drew boxes with a
        margin (median annotated/detected linear size 1.15 on matched cells of fields 1-40, see
        ``extra["size_ratio"]``). 1 = tight boxes (strict).

    Returns
    -------
    FieldMatch
        ``extra["size_ratio"]`` lists ``sqrt(annotated box area / detected box area)`` of every
        valid match (for estimating ``box_scale`` on other fields).
    """
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    n = len(pred_boxes)
    inf = np.zeros(n, bool) if pred_infected is None else np.asarray(pred_infected, bool).reshape(-1)
    gt_boxes = np.asarray([g.bbox for g in gt], np.float64).reshape(-1, 4)
    gt_ign = np.asarray([g.ignored for g in gt], bool)
    gt_inf = np.asarray([g.infected for g in gt], bool)
    tight = pred_boxes
    pred_boxes = scale_boxes(pred_boxes, box_scale)
    pairs = match_boxes(pred_boxes, gt_boxes, iou_threshold=iou_threshold)
    matched_pred_ign = {p for p, g in pairs if gt_ign[g]}
    pairs_valid = [(p, g) for p, g in pairs if not gt_ign[g]]
    tp = len(pairs_valid)
    n_pred_eff = n - len(matched_pred_ign)
    n_gt = int((~gt_ign).sum())
    inf_gt = int(gt_inf.sum())
    inf_tp = sum(1 for p, g in pairs_valid if gt_inf[g] and inf[p])
    pred_inf_idx = [i for i in range(n) if inf[i] and i not in matched_pred_ign]
    inf_pred = len(pred_inf_idx)
    inf_pred_tp = inf_tp
    matched_pred = {p for p, _ in pairs}
    border = np.zeros(n, bool) if pred_border is None else np.asarray(pred_border, bool).reshape(-1)
    fp_border = int(sum(1 for i in range(n) if border[i] and i not in matched_pred))
    extra: dict = {"size_ratio": [float(np.sqrt(gt_boxes[g, 2] * gt_boxes[g, 3] / max(tight[p, 2] * tight[p, 3], 1e-9)))
                                  for p, g in pairs_valid]}
    if image_shape is not None:
        pb = touches_border(tight, image_shape, border_margin_px) | border
        gb = touches_border(gt_boxes, image_shape, border_margin_px)
        tp_int = sum(1 for p, g in pairs_valid if not pb[p] and not gb[g])
        matched_gt = {g for _, g in pairs}
        extra |= {
            "tp_int": tp_int,
            "fp_int": sum(1 for i in range(n) if not pb[i] and i not in matched_pred),
            "fn_int": sum(1 for g in range(len(gt_boxes)) if not gt_ign[g] and not gb[g] and g not in matched_gt),
        }
    par_pred = (inf_pred / n_pred_eff) if n_pred_eff > 0 else 0.0
    par_true = (inf_gt / n_gt) if n_gt > 0 else 0.0
    return FieldMatch(
        image=image,
        n_pred=n_pred_eff,
        n_gt=n_gt,
        tp=tp,
        fp=n_pred_eff - tp,
        fn=n_gt - tp,
        inf_gt=inf_gt,
        inf_tp=inf_tp,
        inf_pred=inf_pred,
        inf_pred_tp=inf_pred_tp,
        parasitemia_pred=par_pred,
        parasitemia_true=par_true,
        seconds=seconds,
        fp_border=fp_border,
        inf_matched=sum(1 for _, g in pairs_valid if gt_inf[g]),
        extra=extra,
    )


def ratio(a: float, b: float) -> float:
    """``a / b`` as a float, NaN when ``b`` is 0 (a metric with an empty denominator)."""
    return float(a) / float(b) if b else float("nan")


def _interior(matches: list[FieldMatch]) -> dict:
    """Detection metrics of the interior protocol (border-cut cells left out on both sides)."""
    if not matches or any("tp_int" not in m.extra for m in matches):
        return {}
    tp, fp, fn = (sum(m.extra[k] for m in matches) for k in ("tp_int", "fp_int", "fn_int"))
    return {"rbc_precision_interior": ratio(tp, tp + fp), "rbc_recall_interior": ratio(tp, tp + fn),
            "rbc_f1_interior": ratio(2 * tp, 2 * tp + fp + fn), "n_gt_rbc_interior": tp + fn}


def summarize_iml(matches: list[FieldMatch]) -> dict:
    """Aggregate per-field matches into detection, infection and parasitemia metrics.

    Returns
    -------
    dict
        ``rbc_precision``, ``rbc_recall``, ``rbc_f1`` (pooled over fields), ``infected_sensitivity``,
        ``infected_ppv``, ``parasitemia_mae_pp`` and ``parasitemia_max_abs_err_pp`` (percentage
        points), ``seconds_per_field_mean`` / ``_median`` (s), ``n_fields``, counts;
        ``infected_matched`` (infected boxes matched to a detection) and
        ``parasitemia_mae_pp_perfect_classifier``: the per-field parasitemia error if exactly the
        detections matched to infected boxes were called Parasitized: the floor the detection
        step sets for any classifier; with it ``infected_sensitivity_perfect_classifier`` (the
        ceiling of the sensitivity, ``infected_matched / n_gt_infected``) and
        ``parasitemia_r_perfect_classifier`` (that classifier's Pearson r with the annotated
        per-field parasitemia, NaN when either is constant).
    """
    tp = sum(m.tp for m in matches)
    fp = sum(m.fp for m in matches)
    fn = sum(m.fn for m in matches)
    p = ratio(tp, tp + fp)
    r = ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    fpb = fp - sum(m.fp_border for m in matches)
    err = np.asarray([abs(m.parasitemia_pred - m.parasitemia_true) * 100.0 for m in matches])
    ideal = np.asarray([m.inf_matched / m.n_pred if m.n_pred else 0.0 for m in matches])
    truth = np.asarray([m.parasitemia_true for m in matches])
    err_ideal = np.abs(ideal - truth) * 100.0
    r_ideal = float(np.corrcoef(ideal, truth)[0, 1]) if len(matches) > 1 and ideal.std() > 0 and truth.std() > 0 else float("nan")
    secs = np.asarray([m.seconds for m in matches], np.float64)
    secs = secs[np.isfinite(secs)]
    return {
        "n_fields": len(matches),
        "n_gt_rbc": sum(m.n_gt for m in matches),
        "n_pred_rbc": sum(m.n_pred for m in matches),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "rbc_precision": p,
        "rbc_recall": r,
        "rbc_f1": f1,
        "fp_border": fp - fpb,
        "rbc_precision_border_fp_ignored": ratio(tp, tp + fpb),
        "rbc_f1_border_fp_ignored": ratio(2 * tp, 2 * tp + fpb + fn),
        **_interior(matches),
        "n_gt_infected": sum(m.inf_gt for m in matches),
        "n_pred_infected": sum(m.inf_pred for m in matches),
        "infected_sensitivity": ratio(sum(m.inf_tp for m in matches), sum(m.inf_gt for m in matches)),
        "infected_ppv": ratio(sum(m.inf_pred_tp for m in matches), sum(m.inf_pred for m in matches)),
        "parasitemia_mae_pp": float(err.mean()) if err.size else float("nan"),
        "parasitemia_max_abs_err_pp": float(err.max()) if err.size else float("nan"),
        "infected_matched": sum(m.inf_matched for m in matches),
        "parasitemia_mae_pp_perfect_classifier": float(err_ideal.mean()) if err_ideal.size else float("nan"),
        "infected_sensitivity_perfect_classifier": ratio(sum(m.inf_matched for m in matches), sum(m.inf_gt for m in matches)),
        "parasitemia_r_perfect_classifier": r_ideal,
        "seconds_per_field_mean": float(secs.mean()) if secs.size else float("nan"),
        "seconds_per_field_median": float(np.median(secs)) if secs.size else float("nan"),
    }


def match_points(labels: np.ndarray, points: np.ndarray) -> dict:
    """Point-in-detection matching of one-point-per-cell labels to a label image.

    Each point is assigned to the detection whose mask contains it; a detection containing
    several points matches only one of them (the others are misses), so recall and precision
    both penalise merged cells.

    Parameters
    ----------
    labels : np.ndarray
        ``(H, W)`` int label image (0 = background).
    points : np.ndarray
        ``(N, 2)`` ``(x, y)`` px cell centres.

    Returns
    -------
    dict
        ``n_points``, ``n_detections``, ``matched``, ``recall``, ``precision``,
        ``count_error`` (detections − points), ``abs_rel_count_error``.
    """
    labels = np.asarray(labels)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = labels.shape
    n_det = int(len(np.unique(labels[labels > 0])))
    xi = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
    hit = labels[yi, xi] if len(pts) else np.zeros(0, int)
    matched = int(len(np.unique(hit[hit > 0])))
    n_pts = len(pts)
    return {
        "n_points": n_pts,
        "n_detections": n_det,
        "matched": matched,
        "recall": ratio(matched, n_pts),
        "precision": ratio(matched, n_det),
        "count_error": n_det - n_pts,
        "abs_rel_count_error": ratio(abs(n_det - n_pts), n_pts),
    }
