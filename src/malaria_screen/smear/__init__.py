"""Whole thin-smear screening: segment the red cells of a field, classify each, report parasitemia.

The modules form one direction of flow, top to bottom: a module imports only from the lines
below its own (the import-linter ``layers`` contract "Inside smear, one direction" in
``pyproject.toml`` holds it).

1. ``report``: :func:`run_smear`, a slide's fields → per-field JSON, overlays, ``summary.json``,
   ``report.html``.
2. ``evaluate``: dataset runners, screen annotated fields and score them.
3. ``rescore`` | ``crop_export`` | ``scoring``: the second-stage rescorer; annotated fields →
   NIH-layout crop folders; per-field scoring against boxes or points, pooled metrics.
4. ``labels``: IML and Chula annotations; labels of detections from boxes.
5. ``screen``: :func:`screen_field`, segment → crops → classify → parasitemia.
6. ``crops`` | ``features`` | ``parasitemia``: NIH-style cell crops; hand-made cell features;
   parasitemia estimators and binomial intervals.
7. ``segment``: :func:`segment_field` with :class:`SegmentConfig`.
8. ``boxes``: box IoU, matching, cover, scaling.
9. ``density`` | ``stain`` | ``fields``: optical density; stain normalisation; decoding fields in
   a batch.

Heavy libraries (OpenCV, scikit-image, scipy, scikit-learn, torchstain) are imported inside the
functions that use them, so importing this package is cheap.
"""

from malaria_screen.smear.boxes import box_iou, match_boxes
from malaria_screen.smear.crop_export import ExportInterrupted, ExportSummary, export_annotation_crops, export_detection_crops
from malaria_screen.smear.crops import box_cell_mask, cell_crop, cell_crops
from malaria_screen.smear.evaluate import evaluate_chula, evaluate_dataset, match_iml_fields
from malaria_screen.smear.features import FEATURE_NAMES, cell_features
from malaria_screen.smear.labels import GroundTruthBox, label_detections, load_chula_points, load_iml_annotations
from malaria_screen.smear.report import collect_fields, overlay_image, run_smear, slide_warnings
from malaria_screen.smear.rescore import CellRescorer, RescorerConfig, collect_rescorer_data, is_rescorer_dir
from malaria_screen.smear.scoring import FieldMatch, evaluate_iml_field, match_points, summarize_iml
from malaria_screen.smear.parasitemia import binomial_ci
from malaria_screen.smear.screen import CellModel, CellResult, FieldResult, screen_field
from malaria_screen.smear.segment import CellProps, Segmentation, SegmentConfig, estimate_rbc_diameter_px, segment_field
from malaria_screen.smear.stain import STAIN_METHODS, normalize_stain

__all__ = [
    "FEATURE_NAMES",
    "STAIN_METHODS",
    "CellModel",
    "CellProps",
    "CellRescorer",
    "CellResult",
    "ExportInterrupted",
    "ExportSummary",
    "FieldMatch",
    "FieldResult",
    "GroundTruthBox",
    "RescorerConfig",
    "SegmentConfig",
    "Segmentation",
    "binomial_ci",
    "box_cell_mask",
    "box_iou",
    "cell_crop",
    "cell_crops",
    "cell_features",
    "collect_fields",
    "collect_rescorer_data",
    "estimate_rbc_diameter_px",
    "evaluate_chula",
    "evaluate_dataset",
    "evaluate_iml_field",
    "export_annotation_crops",
    "export_detection_crops",
    "is_rescorer_dir",
    "label_detections",
    "load_chula_points",
    "load_iml_annotations",
    "match_boxes",
    "match_iml_fields",
    "match_points",
    "normalize_stain",
    "overlay_image",
    "run_smear",
    "screen_field",
    "segment_field",
    "slide_warnings",
    "summarize_iml",
]
