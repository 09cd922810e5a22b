"""Whole thin-smear screening: segment the red cells of a field, classify each, report parasitemia.

The modules form one direction of flow, top to bottom: a module imports only from the lines
below its own (the import-linter ``layers`` contract "Inside smear, one direction" in
``pyproject.toml`` holds it).

1. ``report``: :func:`run_smear`, a slide's fields → per-field JSON, overlays, ``summary.json``,
   ``report.html``.
2. ``evaluate`` | ``slides``: dataset runners, screen annotated fields and score them; the
   per-slide table of screened slides.
3. ``rescore`` | ``crop_export`` | ``scoring``: the second-stage rescorer; annotated fields →
   NIH-layout crop folders; per-field scoring against boxes or points, pooled metrics.
4. ``labels`` | ``slide``: IML and Chula annotations, labels of detections from boxes; a slide's
   totals over its counted fields.
5. ``screen``: :func:`screen_field`, segment → crops → classify → parasitemia.
   ``domain`` (below it): the self-check, "is this a blood smear field, like the training cells?".
6. ``crops`` | ``features`` | ``parasitemia``: NIH-style cell crops; hand-made cell features;
   parasitemia estimators and binomial intervals.
7. ``segment``: :func:`segment_field` with :class:`SegmentConfig`.
8. ``boxes``: box IoU, matching, cover, scaling.
9. ``density`` | ``stain`` | ``fields`` | ``gallery`` | ``parallel``: optical density; stain
   normalisation; decoding fields in a batch; the report's gallery of cells to confirm; running
   per-field jobs in worker processes or on Ray.

Importing the package is cheap: the names below load their module on first use (heavy
libraries, OpenCV, scikit-image, scipy, scikit-learn, torchstain, are imported inside the
functions that need them).
"""

from importlib import import_module

_WHERE = {
    "box_iou": "boxes", "match_boxes": "boxes",
    "ExportInterrupted": "crop_export", "ExportSummary": "crop_export", "export_annotation_crops": "crop_export", "export_detection_crops": "crop_export",
    "box_cell_mask": "crops", "cell_crop": "crops", "cell_crops": "crops",
    "evaluate_chula": "evaluate", "evaluate_dataset": "evaluate", "match_iml_fields": "evaluate",
    "FEATURE_NAMES": "features", "cell_features": "features",
    "GroundTruthBox": "labels", "label_detections": "labels", "load_chula_points": "labels", "load_iml_annotations": "labels",
    "binomial_ci": "parasitemia",
    "collect_fields": "report", "overlay_image": "report", "run_smear": "report", "slide_warnings": "report",
    "CellRescorer": "rescore", "RescorerConfig": "rescore", "collect_rescorer_data": "rescore", "is_rescorer_dir": "rescore",
    "FieldMatch": "scoring", "evaluate_iml_field": "scoring", "match_points": "scoring", "summarize_iml": "scoring",
    "CellModel": "screen", "CellResult": "screen", "FieldResult": "screen", "screen_field": "screen",
    "CellProps": "segment", "SegmentConfig": "segment", "Segmentation": "segment", "estimate_rbc_diameter_px": "segment", "segment_field": "segment",
    "STAIN_METHODS": "stain", "normalize_stain": "stain",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"malaria_screen.smear.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'malaria_screen.smear' has no attribute {name!r}")


__all__ = sorted(_WHERE)
