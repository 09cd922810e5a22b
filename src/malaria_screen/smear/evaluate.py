"""Dataset runners: screen annotated fields and score them (IML_Malaria boxes, Chula-RBC-12 points).

:func:`evaluate_dataset` screens every annotated IML field
(:func:`~malaria_screen.smear.screen.screen_field`), matches its detections to its boxes and
pools the metrics (:mod:`malaria_screen.smear.scoring`, which states the protocol);
:func:`evaluate_chula` checks the red-cell count on Chula-RBC-12. A field that cannot be read
or screened is recorded with its error and left out of the metrics; the others go on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from malaria_screen.errors import error_text
from malaria_screen.fileio import atomic_write_text, rows_to_csv
from malaria_screen.smear.fields import decode_field
from malaria_screen.smear.labels import GroundTruthBox, load_chula_points, load_iml_annotations
from malaria_screen.smear.parasitemia import field_quantifier
from malaria_screen.smear.scoring import FieldMatch, evaluate_iml_field, match_points, ratio, summarize_iml
from malaria_screen.smear.screen import screen_field
from malaria_screen.smear.segment import SegmentConfig, segment_field
from malaria_screen.smear.stain import check_stain_method

logger = logging.getLogger(__name__)

__all__ = ["evaluate_chula", "evaluate_dataset", "match_iml_fields"]


def evaluate_chula(chula_dir: str | Path, *, limit: int | None = None, segment_config: SegmentConfig | None = None) -> dict:
    """Red-cell counting check on Chula-RBC-12 (``images/N.jpg`` + ``labels/N.txt``).

    Parameters
    ----------
    chula_dir : str or Path
        Folder with ``images/`` and ``labels/``.
    limit : int, optional
        Only the first ``limit`` images (by name).
    segment_config : SegmentConfig, optional
        Segmentation settings; default :class:`SegmentConfig()`.

    Returns
    -------
    dict
        ``n_fields``, ``count_mae`` (cells per field), ``count_mean_rel_error`` (fraction),
        ``count_bias`` (mean detections − points), ``point_recall``, ``point_precision``
        (pooled), ``fields`` (per-field dicts), ``n_failed`` and ``failed`` (image name ->
        ``"<exception type>: <message>"`` of fields that could not be read or segmented). Fields
        whose label file is empty are skipped.
    """
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
            seg = segment_field(decode_field(p), segment_config)
        except Exception as exc:  # noqa: BLE001 - one bad field never costs the others
            failed[p.name] = error_text(exc)
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
        "point_recall": ratio(m, sum(r["n_points"] for r in per)),
        "point_precision": ratio(m, sum(r["n_detections"] for r in per)),
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
    segment_config: SegmentConfig | None = None,
    stain: str = "none",
    iou_threshold: float = 0.5,
    box_scale: float = 1.0,
    rescorer=None,
    parasitemia_method: str | None = None,
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
    segment_config, stain
        Passed to :func:`~malaria_screen.smear.screen.screen_field`.
    iou_threshold, box_scale
        Passed to :func:`evaluate_iml_field`.
    rescorer : CellRescorer, optional
        Second stage (see :func:`~malaria_screen.smear.screen.screen_field`).
    parasitemia_method : str, optional
        How cells are called Parasitized (:func:`~malaria_screen.smear.parasitemia.field_quantifier`);
        default as ``smear``: the prior correction to 2 %; ``"cc"``: the model's own threshold.

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
    check_stain_method(stain)  # here: a ValueError in the loop is a field's error
    quantifier = field_quantifier(model, rescorer=rescorer, method=parasitemia_method)
    matches: list[FieldMatch] = []
    failed: dict[str, str] = {}
    for name in (sorted(annotations) if names is None else names):
        try:
            rgb = decode_field(Path(field_dir) / name)
            t0 = time.perf_counter()
            res = screen_field(rgb, model, image_name=name, segment_config=segment_config, stain=stain,
                               rescorer=rescorer, quantifier=quantifier)
            dt = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one bad field (too small, MemoryError, ...) never costs the others
            failed[name] = error_text(exc)
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
    segment_config: SegmentConfig | None = None,
    stain: str = "none",
    iou_threshold: float = 0.5,
    chula_dir: str | Path | None = None,
    limit: int | None = None,
    names: list[str] | None = None,
    box_scale: float = 1.0,
    rescorer=None,
    parasitemia_method: str | None = None,
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
    segment_config, stain
        Passed to :func:`~malaria_screen.smear.screen.screen_field` (``segment_config`` also to
        the Chula check).
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
    parasitemia_method : str, optional
        Passed to :func:`match_iml_fields`.

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
    ann = annotations if isinstance(annotations, dict) else load_iml_annotations(annotations)
    names = sorted(ann) if names is None else list(names)
    if limit:
        names = names[:limit]
    matches, failed = match_iml_fields(field_dir, ann, model, names=names, segment_config=segment_config, stain=stain,
                                       iou_threshold=iou_threshold, box_scale=box_scale, rescorer=rescorer,
                                       parasitemia_method=parasitemia_method)
    out = summarize_iml(matches)
    out["classified"] = model is not None
    if model is None:
        for k in ("infected_sensitivity", "infected_ppv", "parasitemia_mae_pp", "parasitemia_max_abs_err_pp"):
            out[k] = None
    out["iou_threshold"] = iou_threshold
    out["n_failed"] = len(failed)
    out["failed"] = failed
    if chula_dir is not None:
        ch = evaluate_chula(chula_dir, segment_config=segment_config)
        ch.pop("fields", None)
        out["chula"] = ch
    if out_dir is not None:
        cols = ["image", "n_pred", "n_gt", "tp", "fp", "fn", "fp_border", "inf_gt", "inf_tp", "inf_pred",
                "parasitemia_pred", "parasitemia_true", "seconds"]
        rows = [{c: getattr(m, c) for c in cols} for m in matches]
        atomic_write_text(Path(out_dir) / "per_field.csv", rows_to_csv(rows, cols))
    return out
