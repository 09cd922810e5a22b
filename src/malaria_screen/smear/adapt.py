"""Site calibration from a few labelled cells: ``malaria-screen adapt``.

A clinic labels a few hundred cells of its own fields (the web app's labelling tab, or any tool
that writes the labels CSV below), or has annotated fields (IML JSON boxes); :func:`adapt` fits
what the amount of labels supports and writes one **site folder** that every command takes with
``--model`` (:class:`~malaria_screen.inference.site.SitePredictor`):

==================  ==========================================================================
method              fitted on the labelled cells
==================  ==========================================================================
``calibration``     Platt scaling of the cell model's logit + a count-matched threshold (Platt
                    1999): tens of labels, or crop files without their field
``linear``          the above + a logistic regression over the cells' field-relative colour and
                    shape features and the model's logit (:class:`~malaria_screen.smear.rescore.CellRescorer`,
                    ``kind="linear"``): from :data:`LINEAR_MIN_LABELS` labels with
                    :data:`LINEAR_MIN_PARASITIZED` Parasitized on at least 2 fields
``trees``           the above with gradient-boosted trees (``kind="trees"``, the ``rescorer``
                    command's model, leaves of ``n / 20`` cells, 5 to 40): from
                    :data:`TREES_MIN_LABELS` labels with :data:`TREES_MIN_PARASITIZED` Parasitized
==================  ==========================================================================

The thresholds of that rule were chosen on the learning curve of the 120 IML dev fields
(``benchmarks/bench_learning_curve.py``, blocked folds of contiguous frames; one repeat): trees
with small leaves beat the logistic regression from about 200 actively chosen labels on (PPV
0.80 against 0.73 at equal sensitivity), the logistic regression was as good at 100 and the
trees worse at 50. The method choice was made on the data the benchmark reports, which its
record says.

Labels CSV (UTF-8, header row; paths relative to the CSV's folder unless absolute): either

- ``field,x,y,w,h,label``: a cell of a field image, its box in px (top-left origin); the box is
  matched to the cell that segmentation finds there (IoU ≥ 0.5), so the site model is fitted on
  the cells as ``smear`` cuts and measures them; or
- ``crop,label``: a cell crop file (``calibration`` only: no field, no field-relative features),

with ``label`` one of :data:`LABEL_CLASSES` (``not a cell``: debris, a white cell, a platelet, two
cells in one box; it counts as not Parasitized in every fit). :func:`read_labels_csv` refuses a
file with unknown paths, boxes outside their image, unknown labels, duplicate cells or too few
labels of a class, naming the rows.

Active learning (:func:`select_cells`): the cells to label next are those the current model is
least sure of (smallest distance of the logit from the decision threshold; uncertainty sampling,
Lewis & Gale 1994), with a quarter of each batch drawn at random from the rest, so the
calibration also sees the cells it is sure of.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from malaria_screen.errors import error_text
from malaria_screen.evaluation.metrics import binary_metrics, count_matched_threshold
from malaria_screen.evaluation.quantify import QuantifierParams
from malaria_screen.fileio import atomic_write_json, atomic_write_text, file_sha256, rows_to_csv
from malaria_screen import __version__
from malaria_screen.inference import load_model
from malaria_screen.inference.base import default_model_dir
from malaria_screen.inference.site import MODEL_DIR, RESCORER_DIR, SITE_FILE, SiteConfig, is_site_dir, platt
from malaria_screen.smear.boxes import box_cover, match_boxes
from malaria_screen.smear.crops import cell_crops
from malaria_screen.smear.domain import DOMAIN_FILE, DomainReference, load_reference, model_features
from malaria_screen.smear.fields import decode_field
from malaria_screen.smear.labels import GroundTruthBox
from malaria_screen.smear.rescore import CellRescorer, rescorer_inputs
from malaria_screen.smear.screen import predict_batched
from malaria_screen.smear.segment import SegmentConfig, segment_field

logger = logging.getLogger(__name__)

__all__ = ["ADAPT_METHODS", "AdaptResult", "FieldCells", "LABEL_CLASSES", "LabelledCell", "LabelledData", "LabelsError",
           "SiteFit", "adapt", "choose_method", "collect_labelled", "field_cells", "fit_calibration", "fit_site",
           "labels_from_annotations", "read_labels_csv", "select_cells", "site_reference", "uncertainty", "write_labels_csv"]

#: The labels a cell can get.
LABEL_CLASSES: tuple[str, ...] = ("Parasitized", "Uninfected", "not a cell")
#: ``adapt --method`` values (``auto``: :func:`choose_method`).
ADAPT_METHODS: tuple[str, ...] = ("auto", "calibration", "linear", "trees")
#: Fewest labels of each of Parasitized and not-Parasitized for any fit.
MIN_PER_CLASS = 3
#: ``linear`` from this many labelled field cells, with this many Parasitized.
LINEAR_MIN_LABELS, LINEAR_MIN_PARASITIZED = 50, 8
#: ``trees`` from this many labelled field cells, with this many Parasitized.
TREES_MIN_LABELS, TREES_MIN_PARASITIZED = 150, 20
#: Columns of the two CSV layouts.
FIELD_COLUMNS = ("field", "x", "y", "w", "h", "label")
CROP_COLUMNS = ("crop", "label")
#: Most label rows read from one CSV (bounded work).
MAX_ROWS = 200_000


class LabelsError(ValueError):
    """Labels that cannot be used; ``problems`` lists one message per offending row (or rule)."""

    def __init__(self, problems: Sequence[str], *, source: str = "labels") -> None:
        self.problems = list(problems)
        shown = self.problems[:20]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class LabelledCell:
    """One labelled cell: ``label`` (:data:`LABEL_CLASSES`), and either ``field`` (image path) +
    ``bbox`` ``(x, y, w, h)`` px, or ``crop`` (a crop file). ``row``: its line in the CSV (1 =
    header), 0 when it came from elsewhere."""

    label: str
    field: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    crop: str | None = None
    row: int = 0


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header (no decode)."""
    from PIL import Image

    with Image.open(path) as im:
        return int(im.width), int(im.height)


def _check_counts(cells: Sequence[LabelledCell], problems: list[str]) -> None:
    pos = [c.row for c in cells if c.label == "Parasitized"]
    neg = [c.row for c in cells if c.label != "Parasitized"]
    for name, rows in (("Parasitized", pos), ("Uninfected / not a cell", neg)):
        if len(rows) < MIN_PER_CLASS:
            where = f" (rows {', '.join(map(str, rows))})" if rows and rows[0] else ""
            problems.append(f"only {len(rows)} {name} label(s){where}: label at least {MIN_PER_CLASS} of each")


def read_labels_csv(path: str | Path, *, check_images: bool = True) -> list[LabelledCell]:
    """Read and check a labels CSV (layouts in the module doc).

    Parameters
    ----------
    path : path
        The CSV file; relative image paths in it are relative to its folder.
    check_images : bool
        Check that every image exists and every box lies inside it (reads image headers only).

    Returns
    -------
    list of LabelledCell
        Paths made absolute.

    Raises
    ------
    LabelsError
        (a ValueError) Listing every row with an unknown path, a box outside its image or not
        positive, an unknown label or a duplicate cell; a missing column; more than
        :data:`MAX_ROWS` rows; or fewer than :data:`MIN_PER_CLASS` labels of a class.
    FileNotFoundError
        If the CSV itself does not exist.

    Notes
    -----
    A box that overhangs its image by less than half its area (annotators' boxes of edge cells
    do) is clipped to the image; one mostly outside is refused.
    """
    path = Path(path)
    root = path.parent
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if set(FIELD_COLUMNS) <= set(cols):
        layout = "field"
    elif set(CROP_COLUMNS) <= set(cols):
        layout = "crop"
    else:
        raise LabelsError([f"columns {cols}: need {','.join(FIELD_COLUMNS)} or {','.join(CROP_COLUMNS)}"], source=str(path))
    problems: list[str] = []
    out: list[LabelledCell] = []
    seen: dict[tuple, int] = {}
    sizes: dict[Path, tuple[int, int] | None] = {}
    for i, raw in enumerate(reader):
        row = i + 2
        if i >= MAX_ROWS:
            problems.append(f"more than {MAX_ROWS} rows: split the labels")
            break
        if None in raw:  # csv.DictReader puts the cells beyond the header's columns under None
            problems.append(f"row {row}: {len(raw[None])} more cell(s) than the header's {len(cols)} columns")
            continue
        rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        label = rec.get("label", "")
        if label not in LABEL_CLASSES:
            problems.append(f"row {row}: unknown label {label!r} (use {', '.join(LABEL_CLASSES)})")
            continue
        img = Path(rec.get(layout, ""))
        if not rec.get(layout):
            problems.append(f"row {row}: empty {layout} path")
            continue
        img = img if img.is_absolute() else root / img
        if check_images and not img.is_file():
            problems.append(f"row {row}: no such file {rec[layout]!r}")
            continue
        if layout == "crop":
            key: tuple = (str(img.resolve()) if img.exists() else str(img),)
            cell = LabelledCell(label=label, crop=str(img), row=row)
        else:
            try:
                x, y, w, h = (float(rec[k]) for k in ("x", "y", "w", "h"))
            except ValueError:
                problems.append(f"row {row}: x, y, w, h must be numbers (px), got {[rec[k] for k in 'xywh']}")
                continue
            if not all(np.isfinite([x, y, w, h])) or w < 1 or h < 1:
                problems.append(f"row {row}: box {[x, y, w, h]} is not a box (w and h >= 1 px)")
                continue
            if check_images:
                if img not in sizes:
                    try:
                        sizes[img] = _image_size(img)
                    except Exception as exc:  # noqa: BLE001 - not an image, truncated header, ...
                        sizes[img] = None
                        problems.append(f"row {row}: cannot read {rec[layout]!r} ({error_text(exc)})")
                        continue
                size = sizes[img]
                if size is None:
                    problems.append(f"row {row}: cannot read {rec[layout]!r}")
                    continue
                ix = max(0.0, min(x + w, size[0]) - max(x, 0.0))
                iy = max(0.0, min(y + h, size[1]) - max(y, 0.0))
                if ix * iy < 0.5 * w * h:  # annotators' boxes of edge cells may overhang a little: clipped below
                    problems.append(f"row {row}: box {[x, y, w, h]} lies outside the {size[0]}x{size[1]} image")
                    continue
                x0, y0 = max(x, 0.0), max(y, 0.0)
                x, y, w, h = x0, y0, min(x + w, size[0]) - x0, min(y + h, size[1]) - y0
            key = (str(img.resolve()) if img.exists() else str(img), round(x), round(y), round(w), round(h))
            cell = LabelledCell(label=label, field=str(img), bbox=(x, y, w, h), row=row)
        if key in seen:
            problems.append(f"row {row}: the same cell as row {seen[key]}")
            continue
        seen[key] = row
        out.append(cell)
    _check_counts(out, problems)
    if problems:
        raise LabelsError(problems, source=str(path))
    return out


def write_labels_csv(cells: Iterable[LabelledCell], path: str | Path) -> Path:
    """Write labels in the CSV layout :func:`read_labels_csv` reads (atomically).

    Field cells and crop cells cannot be mixed in one file (``ValueError``); paths are written
    as given."""
    cells = list(cells)
    kinds = {c.crop is not None for c in cells}
    if len(kinds) > 1:
        raise ValueError("field cells and crop cells go in separate CSV files")
    if cells and cells[0].crop is not None:
        rows = [{"crop": c.crop, "label": c.label} for c in cells]
        return atomic_write_text(path, rows_to_csv(rows, CROP_COLUMNS))
    rows = [{"field": c.field, "x": _num(c.bbox[0]), "y": _num(c.bbox[1]), "w": _num(c.bbox[2]), "h": _num(c.bbox[3]),
             "label": c.label} for c in cells]
    return atomic_write_text(path, rows_to_csv(rows, FIELD_COLUMNS))


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else round(float(v), 2)


def labels_from_annotations(field_dir: str | Path, annotations: dict[str, list[GroundTruthBox]], *,
                            names: Sequence[str] | None = None) -> list[LabelledCell]:
    """Labelled cells from annotated fields (IML JSON boxes, :func:`~malaria_screen.smear.labels.load_iml_annotations`).

    Infected types → Parasitized, other red cells → Uninfected; ``difficult`` boxes are left out.
    Only fields present in ``field_dir`` are used (``names`` restricts them further)."""
    field_dir = Path(field_dir)
    keep = sorted(annotations) if names is None else list(names)
    out = []
    for name in keep:
        if name not in annotations or not (field_dir / name).is_file():
            continue
        for g in annotations[name]:
            if not g.ignored:
                out.append(LabelledCell(label="Parasitized" if g.infected else "Uninfected", field=str(field_dir / name),
                                        bbox=tuple(float(v) for v in g.bbox)))
    return out


@dataclass
class FieldCells:
    """Every segmented cell of one field as the site model sees it (:func:`field_cells`).

    Attributes
    ----------
    boxes : (N, 4) float64
        ``(x, y, w, h)`` px of each cell.
    border : (N,) bool
        Cut by the image border.
    p : (N,) float64
        The cell model's P(Parasitized).
    X : (N, F) float64
        Field-relative rescorer inputs (:func:`~malaria_screen.smear.rescore.rescorer_inputs`).
    features : (N, D) float32 or None
        The model's features (None when it gives none).
    crops : list of (h, w, 3) uint8
        The cells as ``smear`` cuts them (masked), for display.
    shape : (int, int)
        ``(H, W)`` of the field, px.
    """

    boxes: np.ndarray
    border: np.ndarray
    p: np.ndarray
    X: np.ndarray
    features: np.ndarray | None
    crops: list
    shape: tuple[int, int]


def field_cells(rgb: np.ndarray, model: Any, *, segment_config: SegmentConfig | None = None,
                batch_size: int = 256) -> FieldCells:
    """Segment a field and score every cell: what labelling, fitting and the learning curve share.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        The field.
    model : cell model
        ``predict`` (and ``predict_with_features`` when it has it) over RGB crops.
    segment_config : SegmentConfig, optional
        As ``smear`` segments (default ``SegmentConfig()``).
    batch_size : int
        Crops per ``predict`` call.

    Returns
    -------
    FieldCells
        Empty arrays when no cell is found.

    Raises
    ------
    ValueError
        If ``rgb`` is not an RGB field.
    """
    seg = segment_field(rgb, segment_config)
    props = seg.cells()
    if not props:
        return FieldCells(np.zeros((0, 4)), np.zeros(0, bool), np.zeros(0), np.zeros((0, 0)), None, [], rgb.shape[:2])
    det = np.asarray([c.bbox for c in props], np.float64).reshape(-1, 4)
    crops = cell_crops(rgb, seg.labels, props)
    both = model_features(model, crops, batch_size=batch_size)
    p, f = both if both is not None else (predict_batched(model, crops, batch_size), None)
    return FieldCells(boxes=det, border=np.asarray([c.border for c in props], bool), p=np.asarray(p, np.float64),
                      X=rescorer_inputs(rgb, seg, props, p), features=f, crops=crops, shape=rgb.shape[:2])


@dataclass
class LabelledData:
    """The labelled cells as the site model sees them.

    Attributes
    ----------
    p : (N,) float64
        The cell model's P(Parasitized) of each labelled cell.
    y : (N,) int64
        1 = Parasitized (``not a cell`` and Uninfected are 0).
    label : (N,) object
        The label given.
    groups : (N,) object
        The cell's field (file stem), or ``"crop"``.
    X : (M, F) float64 or None
        Field-relative rescorer inputs of the field cells (:func:`~malaria_screen.smear.rescore.rescorer_inputs`),
        rows ``x_index`` of the arrays above; None without field cells.
    x_index : (M,) int
        Which labelled cells ``X`` describes.
    site_features : (K, D) float32 or None
        The model's features of every segmented cell of the labelled fields (the self-check's
        site reference, :func:`site_reference`); None when the model gives none.
    site_feature_groups : (K,) object or None
        The field of each row of ``site_features``.
    skipped : list of str
        One message per label row left out (a box that matches no segmented cell, a crop that
        does not decode, a field that cannot be read).
    fields : list of str
        Fields used.
    mined : int
        Unlabelled cells added as Uninfected (``exhaustive``).
    """

    p: np.ndarray
    y: np.ndarray
    label: np.ndarray
    groups: np.ndarray
    X: np.ndarray | None
    x_index: np.ndarray
    site_features: np.ndarray | None
    site_feature_groups: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    mined: int = 0

    @property
    def counts(self) -> dict[str, int]:
        """Labels per class of :data:`LABEL_CLASSES`."""
        return {c: int(np.sum(self.label == c)) for c in LABEL_CLASSES}

    @property
    def field_counts(self) -> tuple[int, int, int]:
        """``(cells, Parasitized, fields)`` of the labelled cells that lie in a field (rows ``x_index``)."""
        xi = np.asarray(self.x_index, np.int64)
        if not len(xi):
            return 0, 0, 0
        return len(xi), int(self.y[xi].sum()), len(set(self.groups[xi].tolist()))


def collect_labelled(cells: Sequence[LabelledCell], model: Any, *, segment_config: SegmentConfig | None = None,
                     exhaustive: bool = False, iou_threshold: float = 0.5, batch_size: int = 256,
                     progress: Callable[[str], None] | None = None) -> LabelledData:
    """Segment the labelled fields (or read the crops), match labels to cells, score them with ``model``.

    Parameters
    ----------
    cells : sequence of LabelledCell
        From :func:`read_labels_csv` or :func:`labels_from_annotations`.
    model : cell model
        ``predict`` (and, if it has it, ``predict_with_features``) over RGB crops.
    segment_config : SegmentConfig, optional
        As ``smear`` segments (default ``SegmentConfig()``).
    exhaustive : bool
        The fields' labels cover every cell (annotated fields): segmented cells that match no
        label become Uninfected unless they overlap a Parasitized box by ≥ 10 % of their area.
    iou_threshold : float
        Least IoU of a label box and a segmented cell to match.
    batch_size : int
        Crops per ``predict`` call.
    progress : callable, optional
        Called with each field or crop batch's name.

    Returns
    -------
    LabelledData
        A field that cannot be read costs only its own rows (``skipped``).
    """
    say = progress or (lambda _m: None)
    ps, labs, groups, xs, x_idx, feats, skipped, used, feat_groups = [], [], [], [], [], [], [], [], []
    mined = 0
    by_field: dict[str, list[LabelledCell]] = defaultdict(list)
    crops = []
    for c in cells:
        (by_field[c.field].append(c) if c.field is not None else crops.append(c))
    n = 0
    stems = Counter(Path(f).stem for f in by_field)
    for fpath in sorted(by_field):
        rows = by_field[fpath]
        name = Path(fpath).name
        # a field's group (folds, the self-check's reference, the field count): its name, or its
        # whole path where two fields of different folders share a name
        key = Path(fpath).stem if stems[Path(fpath).stem] == 1 else str(fpath)
        say(name)
        try:
            fc = field_cells(decode_field(fpath), model, segment_config=segment_config, batch_size=batch_size)
            if not len(fc.boxes):
                raise ValueError("no cell segmented in this field")
        except Exception as exc:  # noqa: BLE001 - one unreadable field costs its rows only
            msg = error_text(exc)
            skipped += [f"row {c.row}: field {name}: {msg}" if c.row else f"{name}: {msg}" for c in rows[:1]]
            skipped += [f"row {c.row}: field {name} left out (see above)" for c in rows[1:] if c.row]
            continue
        det, p_all, f_all, x_all = fc.boxes, fc.p, fc.features, fc.X
        boxes = np.asarray([c.bbox for c in rows], np.float64).reshape(-1, 4)
        pairs = dict(match_boxes(det, boxes, iou_threshold=iou_threshold))
        matched_rows = set(pairs.values())
        for j, c in enumerate(rows):
            if j not in matched_rows and c.row:
                skipped.append(f"row {c.row}: no segmented cell matches the box {list(c.bbox)} in {name} "
                               f"(IoU < {iou_threshold}); left out")
        chosen = [(i, rows[j].label) for i, j in sorted(pairs.items())]
        if exhaustive:
            pos = boxes[[k for k, c in enumerate(rows) if c.label == "Parasitized"]].reshape(-1, 4)
            cover = box_cover(det, pos) if len(pos) else np.zeros(len(det))
            extra = [(i, "Uninfected") for i in range(len(det)) if i not in pairs and cover[i] < 0.1]
            mined += len(extra)
            chosen += extra
        if not chosen:
            continue
        idx = np.asarray([i for i, _ in chosen])
        ps.append(p_all[idx])
        labs += [lab for _, lab in chosen]
        groups += [key] * len(idx)
        xs.append(x_all[idx])
        x_idx.append(np.arange(n, n + len(idx)))
        n += len(idx)
        if f_all is not None:
            feats.append(np.asarray(f_all, np.float32))
            feat_groups += [key] * len(f_all)
        used.append(key)
    for s in range(0, len(crops), batch_size):
        part = crops[s : s + batch_size]
        say(f"crops {s + 1}-{s + len(part)}")
        results = list(model.predict_files([c.crop for c in part]))
        for c, r in zip(part, results):
            if r.error is not None or r.p_parasitized is None:
                skipped.append(f"row {c.row}: {c.crop}: {r.error}")
                continue
            ps.append(np.asarray([r.p_parasitized], np.float64))
            labs.append(c.label)
            groups.append("crop")
            n += 1
    label = np.asarray(labs, dtype=object)
    return LabelledData(
        p=np.concatenate(ps).astype(np.float64) if ps else np.zeros(0),
        y=(label == "Parasitized").astype(np.int64),
        label=label,
        groups=np.asarray(groups, dtype=object),
        X=np.concatenate(xs) if xs else None,
        x_index=np.concatenate(x_idx) if x_idx else np.zeros(0, np.int64),
        site_features=np.concatenate(feats) if feats else None,
        site_feature_groups=np.asarray(feat_groups, dtype=object) if feats else None,
        skipped=skipped,
        fields=used,
        mined=mined,
    )


def choose_method(n_field_labels: int, n_field_parasitized: int, n_fields: int) -> str:
    """The method :func:`adapt` fits for this many labels (the table in the module doc).

    Parameters
    ----------
    n_field_labels, n_field_parasitized : int
        Labelled cells matched in their fields, and how many of them are Parasitized.
    n_fields : int
        Distinct fields they lie in (a second stage needs ≥ 2: its threshold is set on held-out fields).
    """
    neg = n_field_labels - n_field_parasitized
    if n_fields >= 2 and n_field_labels >= TREES_MIN_LABELS and n_field_parasitized >= TREES_MIN_PARASITIZED:
        return "trees"
    if (n_fields >= 2 and n_field_labels >= LINEAR_MIN_LABELS and n_field_parasitized >= LINEAR_MIN_PARASITIZED
            and neg >= LINEAR_MIN_PARASITIZED):
        return "linear"
    return "calibration"


def fit_calibration(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Platt scaling of a model's posteriors on labelled cells, and the count-matched threshold.

    Parameters
    ----------
    p : (N,) float
        The model's P(Parasitized).
    y : (N,) int
        1 = Parasitized.

    Returns
    -------
    (a, b, threshold) : floats
        ``p_site = sigmoid(a * logit(p) + b)`` (a logistic regression of ``y`` on ``logit(p)``,
        L2 ``C = 1``), and the threshold on ``p_site`` that calls as many cells as are
        Parasitized (:func:`~malaria_screen.evaluation.metrics.count_matched_threshold`), in (0, 1).

    Raises
    ------
    ValueError
        If a class is missing or the lengths differ.
    """
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(p, np.float64).reshape(-1)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if p.shape != y.shape or len(set(y.tolist())) < 2:
        raise ValueError("need labels of both classes, one per probability")
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(z[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if a <= 0:  # the labels do not follow the model's ranking: keep its ranking, shift to the labels' prevalence
        prev = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        a, b = 1.0, float(np.log(prev / (1 - prev)) - np.median(z))
    thr = float(count_matched_threshold(y.astype(bool), platt(p, a, b)))
    return a, b, float(np.clip(thr, 1e-4, 1 - 1e-4))


@dataclass
class SiteFit:
    """A fitted site model in memory (:func:`fit_site`): the calibration and the optional second stage.

    Attributes
    ----------
    method : str
        ``"calibration"``, ``"linear"`` or ``"trees"``.
    a, b, threshold : float
        Platt scaling of the cell model's logit and its count-matched threshold (:func:`fit_calibration`).
    rescorer : CellRescorer or None
        The second stage (``linear``/``trees``).
    """

    method: str
    a: float
    b: float
    threshold: float
    rescorer: CellRescorer | None = None

    def proba(self, p: np.ndarray, X: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """``(probabilities (N,), threshold)`` of cells: the second stage's when it exists and the
        cells' field-relative inputs ``X`` ``(N, F)`` are given (whole fields), else the calibration's."""
        if self.rescorer is not None and X is not None:
            return self.rescorer.predict_proba(X), self.rescorer.threshold
        return platt(p, self.a, self.b), self.threshold


def fit_site(data: LabelledData, *, method: str = "auto", model: str = "default",
             segment_config: SegmentConfig | None = None) -> SiteFit:
    """Fit the calibration and, for ``linear``/``trees``, the second stage on labelled cells.

    Parameters
    ----------
    data : LabelledData
        :func:`collect_labelled` (or any arrays of that shape: the learning-curve benchmark
        builds them from its cached fields).
    method : {"auto", "calibration", "linear", "trees"}
        ``auto``: :func:`choose_method` of the field cells.
    model : str
        The cell model's name, recorded in the second stage's config.
    segment_config : SegmentConfig, optional
        Recorded in the second stage's config.

    Returns
    -------
    SiteFit

    Raises
    ------
    LabelsError
        If a class has fewer than :data:`MIN_PER_CLASS` labels, or ``linear``/``trees`` is asked
        without labelled field cells of both classes on ≥ 2 fields.
    ValueError
        On an unknown ``method``.
    """
    if method not in ADAPT_METHODS:
        raise ValueError(f"method must be one of {ADAPT_METHODS}, got {method!r}")
    problems: list[str] = []
    _check_counts([LabelledCell(label="Parasitized" if v else "Uninfected") for v in data.y], problems)
    if problems:
        raise LabelsError(problems, source="labels")
    xi = np.asarray(data.x_index, np.int64)
    n_field, n_pos, n_fields = data.field_counts
    chosen = choose_method(n_field, n_pos, n_fields) if method == "auto" else method
    if chosen != "calibration" and (n_fields < 2 or n_pos < MIN_PER_CLASS or n_field - n_pos < MIN_PER_CLASS):
        raise LabelsError([f"method {chosen!r} needs labelled cells of both classes on >= 2 fields "
                           f"(have {n_field} on {n_fields} fields, {n_pos} Parasitized)"], source="labels")
    a, b, thr = fit_calibration(data.p, data.y)
    rescorer = None
    if chosen != "calibration":
        leaf = int(np.clip(n_field // 20, 5, 40))  # small leaves for a few hundred labels, the rescorer's 40 for thousands
        rescorer = CellRescorer(kind="linear" if chosen == "linear" else "trees", min_samples_leaf=leaf)
        rescorer.fit(data.X, data.y[xi], data.groups[xi], model=model, segment_config=segment_config)
    return SiteFit(chosen, a, b, thr, rescorer)


def uncertainty(p: np.ndarray, threshold: float) -> np.ndarray:
    """``(N,)`` distance of each cell's logit from the threshold's logit (smaller = less sure)."""
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    return np.abs(np.log(q / (1 - q)) - np.log(t / (1 - t)))


def select_cells(p: np.ndarray, threshold: float, k: int, *, exclude: Iterable[int] = (), explore: float = 0.25,
                 seed: int = 0) -> np.ndarray:
    """The ``k`` cells to label next (active learning; see module doc).

    Parameters
    ----------
    p : (N,) float
        Current P(Parasitized) of the unlabelled pool (the site model's, or the cell model's
        prior-corrected to the expected prevalence before any label).
    threshold : float
        The current decision threshold on ``p``.
    k : int
        Cells wanted.
    exclude : iterable of int
        Indices already labelled.
    explore : float
        Share of the batch drawn at random from the rest of the pool (the rest: least sure first).
    seed : int
        Seed of the random share.

    Returns
    -------
    (min(k, available),) int ndarray
        Indices into ``p``, least sure first, then the random ones.
    """
    p = np.asarray(p, np.float64).reshape(-1)
    free = np.setdiff1d(np.arange(len(p)), np.fromiter(exclude, dtype=np.int64), assume_unique=False)
    k = min(int(k), len(free))
    if k <= 0:
        return np.zeros(0, np.int64)
    n_random = int(round(k * explore)) if k > 3 else 0
    order = free[np.argsort(uncertainty(p[free], threshold), kind="stable")]
    sure = order[: k - n_random]
    rest = order[k - n_random :]
    rng = np.random.default_rng(seed)
    rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if n_random and len(rest) else np.zeros(0, np.int64)
    return np.concatenate([sure, np.asarray(rand, np.int64)]).astype(np.int64)


@dataclass
class AdaptResult:
    """What :func:`adapt` wrote: the site folder, its :class:`SiteConfig`, and the report
    (``adapt_report.json``: counts, rows left out, the method and why, fit metrics)."""

    out: Path
    site: SiteConfig
    report: dict


#: The site reference's threshold: this times the largest score of the labelled fields.
SITE_DOMAIN_MARGIN = 1.25


def site_reference(features: np.ndarray, groups: np.ndarray, *, margin: float = SITE_DOMAIN_MARGIN,
                   base: DomainReference | None = None) -> DomainReference | None:
    """The self-check's reference of a site: its own cells in the cell model's feature space.

    The mean and the Ledoit-Wolf precision of the site's segmented cells' features (Lee et al.
    2018, as :func:`~malaria_screen.smear.domain.fit_reference` does for the NIH training cells);
    a field is in the site's domain when its score (median cell distance) is at most ``margin``
    times the largest score of the site's own fields. A field of another microscope or stain is
    then flagged for this site model, as it should be: it was calibrated on this site only.

    Parameters
    ----------
    features : (N, D) float
        Features of every segmented cell of the labelled fields.
    groups : (N,) object
        The field of each cell.
    margin : float
        Threshold margin over the largest field score.
    base : DomainReference, optional
        The cell model's own reference (its calibration is kept for the record).

    Returns
    -------
    DomainReference or None
        None with fewer than 50 cells or 2 fields (then the cell model's own reference is kept).
    """
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    g = np.asarray(groups)
    fields = sorted(set(g.tolist()))
    if len(f) < 50 or len(fields) < 2:
        return None
    mean = f.mean(axis=0)
    lw = LedoitWolf().fit(f - mean)
    ref = DomainReference(class_means=mean[None], precision=lw.precision_, threshold=1.0)
    scores = np.asarray([ref.score(f[g == k]) for k in fields])
    thr = float(margin * scores.max())
    cal = {"site_cells": int(len(f)), "site_fields": len(fields), "site_field_score_max": float(scores.max()),
           "site_field_score_median": float(np.median(scores))}
    if base is not None:
        cal["model_weights_sha256"] = base.calibration.get("model_weights_sha256")
    return DomainReference(class_means=mean[None], precision=lw.precision_, threshold=round(thr, 4),
                           threshold_rule=f"{margin:g} x the largest score of the site's {len(fields)} labelled fields",
                           calibration=cal)


def _check_out(out: Path, base_dir: Path, labels: Sequence[LabelledCell], labels_source: str | Path | None) -> None:
    """Refuse an ``out`` that ``--overwrite`` would wrongly replace: an existing folder that is not
    a site folder (nor empty), or one that holds an input (the model, a labelled field or crop,
    the labels file), which the replacement would delete."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a site folder: choose another --out")
        if not is_site_dir(out) and any(out.iterdir()):
            raise FileExistsError(f"{out} is not a site folder (no {SITE_FILE}): --overwrite only replaces a site "
                                  "folder written by adapt; choose another --out")
    root = out.resolve()
    inputs = {base_dir, *(Path(c.field) for c in labels if c.field), *(Path(c.crop) for c in labels if c.crop)}
    if labels_source:
        inputs.add(Path(labels_source))
    for p in sorted(inputs, key=str):
        q = p.resolve()
        if q == root or root in q.parents:
            raise ValueError(f"--out {out} holds an input ({p}): replacing it would delete it; choose another --out")


def adapt(
    labels: Sequence[LabelledCell],
    out: str | Path,
    *,
    model: str | Path | None = None,
    method: str = "auto",
    exhaustive: bool = False,
    segment_config: SegmentConfig | None = None,
    labels_source: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> AdaptResult:
    """Fit a site model on labelled cells and write its folder (atomically).

    Parameters
    ----------
    labels : sequence of LabelledCell
        :func:`read_labels_csv` or :func:`labels_from_annotations`.
    out : path
        The site folder to write. Built in a temporary sibling folder and renamed into place
        when complete: an adapt that fails or is interrupted leaves no half folder.
    model : path, optional
        The cell model to adapt: a run folder (``config.json`` + ``weights.safetensors``);
        default the bundled model. A copy goes into ``out/model/``.
    method : {"auto", "calibration", "linear", "trees"}
        ``auto``: :func:`choose_method`.
    exhaustive : bool
        Every cell of the labelled fields is labelled (annotated fields): see :func:`collect_labelled`.
    segment_config : SegmentConfig, optional
        Segmentation settings (saved with the second stage).
    labels_source : path, optional
        The file the labels came from (recorded with its hash).
    overwrite : bool
        Replace an existing ``out`` (only once the new folder is complete).
    progress : callable, optional
        Called with progress messages.

    Returns
    -------
    AdaptResult

    Raises
    ------
    FileExistsError
        If ``out`` exists and not ``overwrite``, or it exists and is neither a site folder nor empty.
    FileNotFoundError
        If ``model`` is not a run folder.
    LabelsError
        If, after matching, a class has fewer than :data:`MIN_PER_CLASS` labels, or the
        method asked for needs field cells the labels do not have.
    ValueError
        On an unknown ``method``, or an ``out`` that holds an input (the model, a labelled field
        or crop, the labels file).
    """
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    if method not in ADAPT_METHODS:
        raise ValueError(f"method must be one of {ADAPT_METHODS}, got {method!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    base_dir = default_model_dir() if model is None else Path(model)
    _check_out(out, base_dir, labels, labels_source)
    if is_site_dir(base_dir):
        raise ValueError(f"{base_dir} is already a site model: adapt the cell model it wraps ({base_dir / MODEL_DIR})")
    if not (base_dir / "config.json").is_file() or not (base_dir / "weights.safetensors").is_file():
        raise FileNotFoundError(f"{base_dir} is not a model run folder (config.json + weights.safetensors)")
    predictor = load_model(base_dir)
    data = collect_labelled(labels, predictor, segment_config=segment_config, exhaustive=exhaustive, progress=say)
    if not len(data.y):
        raise LabelsError(list(data.skipped) or ["no labelled cell could be used"], source="labels after matching")
    say(f"fitting on {len(data.y)} labelled cells ({int(data.y.sum())} Parasitized)")
    fit = fit_site(data, method=method, model=str(model or "default"), segment_config=segment_config)
    chosen, a, b, thr, rescorer = fit.method, fit.a, fit.b, fit.threshold, fit.rescorer
    n_field, n_field_pos, n_fields = data.field_counts
    m = binary_metrics(data.y, platt(data.p, a, b), threshold=thr)
    metrics = {"threshold": thr, "n": int(len(data.y)), "sensitivity": m["sensitivity"], "ppv": m["precision"],
               "specificity": m["specificity"]}  # both classes have >= 3 labels (fit_site): all defined
    counts = data.counts
    src = Path(labels_source) if labels_source else None
    weights = base_dir / "weights.safetensors"
    site = SiteConfig(
        method=chosen, calibration_a=a, calibration_b=b, threshold=thr,
        labelled_prevalence=float(data.y.mean()), n_parasitized=counts["Parasitized"],
        n_uninfected=counts["Uninfected"], n_not_a_cell=counts["not a cell"], n_fields=len(data.fields),
        n_rows_skipped=len(data.skipped), base_model=str(model or "default"), base_model_sha256=file_sha256(weights),
        labels_source=str(src) if src else "", labels_sha256=file_sha256(src) if src and src.is_file() else "",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=__version__,
        extra={"metrics": {k: v for k, v in metrics.items() if k != "n"} | {"where": "labelled cells, in-sample"},
               "mined_uninfected": data.mined},
    )
    report = {
        "method": chosen, "method_asked": method,
        "why": (f"{n_field} labelled field cells ({n_field_pos} Parasitized) on {n_fields} fields; rule: trees from "
                f"{TREES_MIN_LABELS}/{TREES_MIN_PARASITIZED}, linear from {LINEAR_MIN_LABELS}/{LINEAR_MIN_PARASITIZED} "
                "labels/Parasitized on >= 2 fields, else calibration"),
        "counts": counts, "n_field_cells": n_field, "n_crop_cells": int(len(data.y) - n_field), "fields": data.fields,
        "mined_uninfected": data.mined, "skipped_rows": data.skipped, "calibration": {"a": a, "b": b, "threshold": thr},
        "fit_metrics_calibration": metrics,
        "rescorer": None if rescorer is None else {"kind": rescorer.config.kind, "threshold": rescorer.threshold,
                                                   "n_cells": rescorer.config.n_cells},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(base_dir, tmp / MODEL_DIR, ignore=shutil.ignore_patterns(".*"))
        if rescorer is not None:
            rescorer.save(tmp / RESCORER_DIR)
        QuantifierParams(threshold=thr, train_prior=site.labelled_prevalence, tpr=metrics["sensitivity"],
                         fpr=1.0 - metrics["specificity"],
                         source=f"site labels ({len(data.y)} cells, in-sample)").to_json(tmp / "quantify.json")
        base_ref = load_reference(base_dir)
        ref = None if data.site_features is None else site_reference(data.site_features, data.site_feature_groups,
                                                                      base=base_ref)
        ref = ref or base_ref
        if ref is not None:
            ref.save(tmp / DOMAIN_FILE)
        write_labels_csv([c for c in labels if c.crop is None] or list(labels), tmp / "labels.csv")
        atomic_write_json(tmp / "adapt_report.json", report)
        site.to_json(tmp / SITE_FILE)  # last: its presence marks a complete site folder
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out} ({chosen}) in {time.perf_counter() - t0:.1f} s")
    return AdaptResult(out=out, site=site, report=report)
