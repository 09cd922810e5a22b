"""Evaluation of whole-smear screening against annotated fields.

- **IML_Malaria** (Arshad et al. 2022) boxes: detections are matched one-to-one to annotated
  boxes by maximum total IoU (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``)
  among pairs with IoU ≥ 0.5. Every non-``difficult`` box is a red cell; boxes of type
  ``ring``, ``trophozoite``, ``schizont`` or ``gametocyte`` are infected cells. ``difficult``
  boxes are ignored: detections matched to them are neither true nor false positives.
  Infected-cell sensitivity = matched infected boxes whose detection is predicted infected /
  all infected boxes; PPV = predicted-infected detections matched to an infected box / all
  predicted-infected detections. Field parasitemia error = |predicted − annotated| in
  percentage points, annotated = infected boxes / non-difficult boxes.
- **Chula-RBC-12** (Naruenatthanaset et al. 2021) points, one per red cell: count error per
  field; point-in-detection matching (a point inside a detected cell's mask, each detection
  and each point used once) gives recall and precision.

File I/O is limited to :func:`load_iml_annotations` and :func:`load_chula_points`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INFECTED_TYPES = frozenset({"ring", "trophozoite", "schizont", "gametocyte"})
IGNORED_TYPES = frozenset({"difficult"})

__all__ = [
    "INFECTED_TYPES",
    "FieldMatch",
    "GroundTruthBox",
    "box_iou",
    "evaluate_chula",
    "evaluate_dataset",
    "evaluate_iml_field",
    "load_chula_points",
    "load_iml_annotations",
    "match_boxes",
    "match_iml_fields",
    "match_points",
    "summarize_iml",
]


@dataclass(frozen=True)
class GroundTruthBox:
    """One annotated object: ``bbox`` = ``(x, y, w, h)`` px, top-left origin; ``type`` string."""

    bbox: tuple[float, float, float, float]
    type: str

    @property
    def infected(self) -> bool:
        return self.type in INFECTED_TYPES

    @property
    def ignored(self) -> bool:
        return self.type in IGNORED_TYPES


def load_iml_annotations(path: str | Path) -> dict[str, list[GroundTruthBox]]:
    """Read an IML_Malaria ``annotations.json``.

    Parameters
    ----------
    path : str or Path
        JSON list of ``{"image_name", "objects": [{"type", "bbox": {"x","y","w","h"}}]}``;
        coordinates may be strings.

    Returns
    -------
    dict
        Image file name -> list of :class:`GroundTruthBox`.

    Raises
    ------
    ValueError
        If the file is not in that layout.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of images")
    out: dict[str, list[GroundTruthBox]] = {}
    for entry in data:
        try:
            name = str(entry["image_name"])
            objs = []
            for o in entry.get("objects", []):
                b = o["bbox"]
                objs.append(
                    GroundTruthBox(
                        (float(b["x"]), float(b["y"]), float(b["w"]), float(b["h"])),
                        str(o["type"]).strip().lower(),
                    )
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad annotation entry {str(entry)[:120]!r}: {exc}") from exc
        out[name] = objs
    return out


def load_chula_points(path: str | Path) -> np.ndarray:
    """Read a Chula-RBC-12 label file (lines ``x y type``).

    Returns
    -------
    np.ndarray
        ``(N, 2)`` float64 ``(x, y)`` px cell centres.
    """
    pts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pts.append((float(parts[0]), float(parts[1])))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(x, y, w, h)`` boxes.

    Parameters
    ----------
    a : np.ndarray
        ``(N, 4)`` boxes, px.
    b : np.ndarray
        ``(M, 4)`` boxes, px.

    Returns
    -------
    np.ndarray
        ``(N, M)`` float64 IoU in [0, 1].
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax0, ay0, ax1, ay1 = a[:, 0, None], a[:, 1, None], (a[:, 0] + a[:, 2])[:, None], (a[:, 1] + a[:, 3])[:, None]
    bx0, by0, bx1, by1 = b[None, :, 0], b[None, :, 1], (b[:, 0] + b[:, 2])[None], (b[:, 1] + b[:, 3])[None]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(pred: np.ndarray, gt: np.ndarray, *, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one matching maximising total IoU among pairs with IoU ≥ ``iou_threshold``.

    Parameters
    ----------
    pred : np.ndarray
        ``(N, 4)`` predicted ``(x, y, w, h)`` boxes, px.
    gt : np.ndarray
        ``(M, 4)`` annotated boxes, px.
    iou_threshold : float
        Minimum IoU of a match.

    Returns
    -------
    list of (int, int)
        ``(pred_index, gt_index)`` pairs.
    """
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    if len(pred) == 0 or len(gt) == 0:
        return []
    iou = box_iou(pred, gt)
    cost = np.where(iou >= iou_threshold, -iou, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]


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
    if not box_scale > 0:
        raise ValueError(f"box_scale must be > 0, got {box_scale}")
    tight = pred_boxes
    if box_scale != 1.0:
        c = pred_boxes[:, :2] + pred_boxes[:, 2:] / 2
        pred_boxes = np.concatenate([c - pred_boxes[:, 2:] * box_scale / 2, pred_boxes[:, 2:] * box_scale], axis=1)
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
        h, w = image_shape

        def touches(b: np.ndarray) -> np.ndarray:
            b = b.reshape(-1, 4)
            return (b[:, 0] <= border_margin_px) | (b[:, 1] <= border_margin_px) | (
                b[:, 0] + b[:, 2] >= w - border_margin_px) | (b[:, 1] + b[:, 3] >= h - border_margin_px)

        pb, gb = touches(tight) | border, touches(gt_boxes)
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


def _error_text(exc: BaseException) -> str:
    """``"<type>: <message>"`` (just the type when the message is empty, as for ``MemoryError()``)."""
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def _interior(matches: list[FieldMatch]) -> dict:
    """Detection metrics of the interior protocol (border-cut cells left out on both sides)."""
    if not matches or any("tp_int" not in m.extra for m in matches):
        return {}
    tp, fp, fn = (sum(m.extra[k] for m in matches) for k in ("tp_int", "fp_int", "fn_int"))
    return {"rbc_precision_interior": _ratio(tp, tp + fp), "rbc_recall_interior": _ratio(tp, tp + fn),
            "rbc_f1_interior": _ratio(2 * tp, 2 * tp + fp + fn), "n_gt_rbc_interior": tp + fn}


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
        step sets for any classifier.
    """
    tp = sum(m.tp for m in matches)
    fp = sum(m.fp for m in matches)
    fn = sum(m.fn for m in matches)
    p = _ratio(tp, tp + fp)
    r = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    fpb = fp - sum(m.fp_border for m in matches)
    err = np.asarray([abs(m.parasitemia_pred - m.parasitemia_true) * 100.0 for m in matches])
    err_ideal = np.asarray([abs((m.inf_matched / m.n_pred if m.n_pred else 0.0) - m.parasitemia_true) * 100.0
                            for m in matches])
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
        "rbc_precision_border_fp_ignored": _ratio(tp, tp + fpb),
        "rbc_f1_border_fp_ignored": _ratio(2 * tp, 2 * tp + fpb + fn),
        **_interior(matches),
        "n_gt_infected": sum(m.inf_gt for m in matches),
        "n_pred_infected": sum(m.inf_pred for m in matches),
        "infected_sensitivity": _ratio(sum(m.inf_tp for m in matches), sum(m.inf_gt for m in matches)),
        "infected_ppv": _ratio(sum(m.inf_pred_tp for m in matches), sum(m.inf_pred for m in matches)),
        "parasitemia_mae_pp": float(err.mean()) if err.size else float("nan"),
        "parasitemia_max_abs_err_pp": float(err.max()) if err.size else float("nan"),
        "infected_matched": sum(m.inf_matched for m in matches),
        "parasitemia_mae_pp_perfect_classifier": float(err_ideal.mean()) if err_ideal.size else float("nan"),
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
        "recall": _ratio(matched, n_pts),
        "precision": _ratio(matched, n_det),
        "count_error": n_det - n_pts,
        "abs_rel_count_error": _ratio(abs(n_det - n_pts), n_pts),
    }


def evaluate_chula(chula_dir: str | Path, *, limit: int | None = None, **segment_kwargs) -> dict:
    """Red-cell counting check on Chula-RBC-12 (``images/N.jpg`` + ``labels/N.txt``).

    Returns
    -------
    dict
        ``n_fields``, ``count_mae`` (cells per field), ``count_mean_rel_error`` (fraction),
        ``count_bias`` (mean detections − points), ``point_recall``, ``point_precision``
        (pooled), ``fields`` (per-field dicts), ``n_failed`` and ``failed`` (image name ->
        ``"<exception type>: <message>"`` of fields that could not be read or segmented). Fields
        whose label file is empty are skipped.
    """
    from malaria_screen.data.io import check_colour, decode_image
    from malaria_screen.smear.segment import segment_field

    root = Path(chula_dir)
    imgs = sorted(p for p in (root / "images").iterdir() if p.is_file() and not p.name.startswith("."))
    if limit:
        imgs = imgs[:limit]
    per = []
    failed: dict[str, str] = {}
    for p in imgs:
        lbl = root / "labels" / (p.stem + ".txt")
        if not lbl.is_file():
            continue
        try:
            pts = load_chula_points(lbl)
            if len(pts) == 0:
                continue
            seg = segment_field(check_colour(decode_image(p)), **segment_kwargs)
        except Exception as exc:  # noqa: BLE001 - one bad field never costs the others
            failed[p.name] = _error_text(exc)
            logger.warning("Chula field %s failed: %s", p.name, failed[p.name])
            continue
        r = match_points(seg.labels, pts)
        r["image"] = p.name
        r["rbc_diameter_px"] = seg.rbc_diameter_px
        per.append(r)
    if not per:
        return {"n_fields": 0, "fields": [], "n_failed": len(failed), "failed": failed}
    m = sum(r["matched"] for r in per)
    return {
        "n_fields": len(per),
        "count_mae": float(np.mean([abs(r["count_error"]) for r in per])),
        "count_mean_rel_error": float(np.mean([r["abs_rel_count_error"] for r in per])),
        "count_bias": float(np.mean([r["count_error"] for r in per])),
        "point_recall": _ratio(m, sum(r["n_points"] for r in per)),
        "point_precision": _ratio(m, sum(r["n_detections"] for r in per)),
        "rbc_diameter_px_median": float(np.median([r["rbc_diameter_px"] for r in per])),
        "fields": per,
        "n_failed": len(failed),
        "failed": failed,
    }


def match_iml_fields(
    field_dir: str | Path,
    annotations: dict[str, list[GroundTruthBox]],
    model,
    *,
    names: list[str] | None = None,
    pixel_size_um: float | None = None,
    stain: str = "none",
    iou_threshold: float = 0.5,
    box_scale: float = 1.0,
    rescorer=None,
    **segment_kwargs,
) -> tuple[list[FieldMatch], dict[str, str]]:
    """Screen annotated fields and match each to its annotation.

    Parameters
    ----------
    field_dir : path
        Folder of field images.
    annotations : dict
        Image name -> boxes (:func:`load_iml_annotations`).
    model : CellModel or None
        Classifier; None matches the segmentation only.
    names : list of str, optional
        Fields to screen (default: all annotated, sorted).
    pixel_size_um, stain, **segment_kwargs
        Passed to :func:`~malaria_screen.smear.screen.screen_field`.
    iou_threshold, box_scale
        Passed to :func:`evaluate_iml_field`.
    rescorer : CellRescorer, optional
        Second stage (see :func:`~malaria_screen.smear.screen.screen_field`).

    Returns
    -------
    (list of FieldMatch, dict)
        One match per screened field (``seconds`` = screening wall time, s), and image name ->
        ``"<exception type>: <message>"`` for fields that could not be decoded or screened
        (grayscale, too small to segment, out of memory, ...: any ``Exception``); the others go on.

    Raises
    ------
    ValueError
        If ``stain`` is unknown (checked before any field is read).
    """
    import time

    from malaria_screen.data.io import check_colour, decode_image
    from malaria_screen.smear.screen import screen_field
    from malaria_screen.smear.stain import check_stain_method

    check_stain_method(stain)  # here: a ValueError in the loop is a field's error
    matches: list[FieldMatch] = []
    failed: dict[str, str] = {}
    for name in (sorted(annotations) if names is None else names):
        try:
            rgb = check_colour(decode_image(Path(field_dir) / name))
            t0 = time.perf_counter()
            res = screen_field(rgb, model, image_name=name, pixel_size_um=pixel_size_um, stain=stain, rescorer=rescorer,
                               **segment_kwargs)
            dt = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one bad field (too small, MemoryError, ...) never costs the others
            failed[name] = _error_text(exc)
            logger.warning("field %s failed: %s", name, failed[name])
            continue
        boxes = np.asarray([c.bbox for c in res.cells], np.float64).reshape(-1, 4)
        inf = np.asarray([c.label == "Parasitized" for c in res.cells], bool)
        border = np.asarray([c.border for c in res.cells], bool)
        matches.append(
            evaluate_iml_field(
                name, boxes, inf if model is not None else None, annotations[name], iou_threshold=iou_threshold,
                seconds=dt, pred_border=border, image_shape=rgb.shape[:2], box_scale=box_scale,
            )
        )
    return matches, failed


def evaluate_dataset(
    field_dir: str | Path,
    annotations: str | Path | dict[str, list[GroundTruthBox]],
    model,
    *,
    out_dir: str | Path | None = None,
    pixel_size_um: float | None = None,
    stain: str = "none",
    iou_threshold: float = 0.5,
    chula_dir: str | Path | None = None,
    limit: int | None = None,
    names: list[str] | None = None,
    box_scale: float = 1.0,
    rescorer=None,
    **segment_kwargs,
) -> dict:
    """Screen every annotated IML field and compute all metrics (see module docstring).

    Parameters
    ----------
    field_dir : path
        Folder of field images.
    annotations : path or dict
        IML ``annotations.json``, or its contents as read by :func:`load_iml_annotations`.
    model : CellModel or None
        Classifier; None evaluates the segmentation only.
    out_dir : path, optional
        If given, ``per_field.csv`` is written there (atomically).
    pixel_size_um, stain, **segment_kwargs
        Passed to :func:`~malaria_screen.smear.screen.screen_field`.
    iou_threshold : float
        Minimum IoU of a match.
    chula_dir : path, optional
        Chula-RBC-12 folder for the counting check (added under ``"chula"``).
    limit : int, optional
        Evaluate only the first ``limit`` fields (sorted by name).
    names : list of str, optional
        Evaluate only these fields (image names as in the annotation); default all.
    box_scale : float, default=1.0
        Box convention correction of the detections (see :func:`evaluate_iml_field`).
    rescorer : CellRescorer, optional
        Second stage (see :func:`~malaria_screen.smear.screen.screen_field`).

    Returns
    -------
    dict
        :func:`summarize_iml` metrics plus ``classified``, ``n_failed``, ``failed`` (image name ->
        error of each field that could not be read or screened, left out of the metrics),
        optional ``chula``.

    Raises
    ------
    ValueError
        If ``annotations`` is a file not in the IML layout.
    """
    import csv
    import io as _io

    ann = annotations if isinstance(annotations, dict) else load_iml_annotations(annotations)
    names = sorted(ann) if names is None else list(names)
    if limit:
        names = names[:limit]
    matches, failed = match_iml_fields(field_dir, ann, model, names=names, pixel_size_um=pixel_size_um, stain=stain,
                                       iou_threshold=iou_threshold, box_scale=box_scale, rescorer=rescorer,
                                       **segment_kwargs)
    out = summarize_iml(matches)
    out["classified"] = model is not None
    if model is None:
        for k in ("infected_sensitivity", "infected_ppv", "parasitemia_mae_pp", "parasitemia_max_abs_err_pp"):
            out[k] = None
    out["iou_threshold"] = iou_threshold
    out["n_failed"] = len(failed)
    out["failed"] = failed
    if chula_dir is not None:
        ch = evaluate_chula(chula_dir, pixel_size_um=pixel_size_um, **segment_kwargs)
        ch.pop("fields", None)
        out["chula"] = ch
    if out_dir is not None:
        from malaria_screen.fileio import atomic_write_text

        sio = _io.StringIO()
        cols = ["image", "n_pred", "n_gt", "tp", "fp", "fn", "fp_border", "inf_gt", "inf_tp", "inf_pred",
                "parasitemia_pred", "parasitemia_true", "seconds"]
        w = csv.writer(sio, lineterminator="\n")
        w.writerow(cols)
        for m in matches:
            w.writerow([getattr(m, c) for c in cols])
        atomic_write_text(Path(out_dir) / "per_field.csv", sio.getvalue())
    return out
