"""Cell crops prepared like the NIH/NLM training crops, and annotation → NIH-folder export.

The NIH malaria cell images (Rajaraman et al., PeerJ 2018) were cut from thin-smear fields by
the NLM Malaria Screener segmentation (Poostchi et al. 2018): each crop is the bounding box of
one segmented cell with every pixel outside the cell mask set to black, about 130 px across.
:func:`cell_crop` reproduces that layout from a label image (cell centred in a square black
canvas, aspect kept), so the classifier trained on NIH crops sees the same kind of input; the
classifier's own letterbox resize then brings it to the model input size.

:func:`export_annotation_crops` turns annotated fields (IML_Malaria boxes) into an NIH-layout
folder ``Parasitized/`` + ``Uninfected/`` of PNG crops named ``<field stem>_cell_<k>.png`` and a
``groups.csv`` (``path,patient`` with patient = field id) for leak-free grouped training.
:func:`export_detection_crops` writes the same layout from the *segmentation's* cells, cut
exactly as :func:`~malaria_screen.smear.screen.screen_field` cuts them, each labelled by the
annotated box it matches (IoU ≥ 0.5): training crops then look like the crops the adapted model
will classify.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_screen.smear.segment import CellProps

logger = logging.getLogger(__name__)

__all__ = [
    "ExportInterrupted", "ExportSummary", "box_cell_mask", "cell_crop", "cell_crops", "export_annotation_crops", "export_detection_crops",
    "label_detections",
]


def _square_pad(crop: np.ndarray) -> np.ndarray:
    h, w = crop.shape[:2]
    s = max(h, w)
    if h == w:
        return crop
    out = np.zeros((s, s, 3), np.uint8)
    y0, x0 = (s - h) // 2, (s - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = crop
    return out


def cell_crop(
    rgb: np.ndarray,
    mask: np.ndarray,
    bbox: tuple[int, int, int, int],
    *,
    margin_px: int = 2,
    square: bool = True,
) -> np.ndarray:
    """Cut one cell: its bounding box plus a margin, black outside the cell mask.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 field.
    mask : np.ndarray
        ``(H, W)`` bool mask of this cell (or a ``(h, w)`` mask already aligned to ``bbox``
        grown by ``margin_px``, clipped to the image).
    bbox : tuple of int
        ``(x, y, w, h)`` px of the cell.
    margin_px : int
        Black margin around the cell, px.
    square : bool
        Pad with black to a square with the cell centred (as the NIH crops look after the
        classifier's letterbox; harmless either way).

    Returns
    -------
    np.ndarray
        ``(h', w', 3)`` uint8 crop.
    """
    H, W = rgb.shape[:2]
    x, y, w, h = (int(v) for v in bbox)
    x0, y0 = max(0, x - margin_px), max(0, y - margin_px)
    x1, y1 = min(W, x + w + margin_px), min(H, y + h + margin_px)
    crop = rgb[y0:y1, x0:x1].copy()
    m = mask[y0:y1, x0:x1] if mask.shape == (H, W) else mask
    crop[~m.astype(bool)] = 0
    return _square_pad(crop) if square else crop


def cell_crops(
    rgb: np.ndarray,
    labels: np.ndarray,
    cells: list[CellProps],
    *,
    margin_px: int = 2,
    square: bool = True,
) -> list[np.ndarray]:
    """Crops of all cells of a label image (see :func:`cell_crop`).

    Each crop is cut around the cell's own mask (its share of a group of touching cells), not
    around its reported box, which for touching cells covers the whole cell under its
    neighbours (:attr:`~malaria_screen.smear.segment.Segmentation.boxes`): the cell stays
    centred as in the training crops.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 field.
    labels : np.ndarray
        ``(H, W)`` int label image matching ``cells``.
    cells : list of CellProps
        Cells to cut (``id`` = label value).

    Returns
    -------
    list of np.ndarray
        One ``(h, w, 3)`` uint8 crop per cell, same order as ``cells``.

    Raises
    ------
    ValueError
        If a cell's ``id`` is not a label of ``labels``.
    """
    from scipy import ndimage as ndi

    H, W = labels.shape
    objs = ndi.find_objects(np.asarray(labels, np.int32))
    out = []
    for c in cells:
        sl = objs[c.id - 1] if 0 < c.id <= len(objs) else None
        if sl is None:
            raise ValueError(f"cell {c.id} is not in the label image")
        x, y, w, h = sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start
        x0, y0 = max(0, x - margin_px), max(0, y - margin_px)
        x1, y1 = min(W, x + w + margin_px), min(H, y + h + margin_px)
        m = labels[y0:y1, x0:x1] == c.id
        out.append(cell_crop(rgb, m, (x, y, w, h), margin_px=margin_px, square=square))
    return out


def box_cell_mask(rgb_box: np.ndarray, *, threshold_od: float | None = None) -> np.ndarray:
    """Mask of the cell inside an annotation box: green-OD foreground ∩ the inscribed ellipse.

    Parameters
    ----------
    rgb_box : np.ndarray
        ``(h, w, 3)`` uint8 pixels of the (slightly enlarged) annotation box.
    threshold_od : float, optional
        Green optical-density threshold; default: Otsu of the box.

    Returns
    -------
    np.ndarray
        ``(h, w)`` bool mask. Falls back to the ellipse alone if thresholding finds nothing.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    h, w = rgb_box.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    ell = ((xx + 0.5 - w / 2) / (w / 2 * 1.04)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2 * 1.04)) ** 2 <= 1.0
    g = rgb_box[..., 1].astype(np.float32)
    bg = max(float(np.percentile(g, 98)), 1.0)
    od = np.clip(-np.log((g + 1) / (bg + 1)), 0, None)
    if threshold_od is None:
        threshold_od = float(threshold_otsu(od)) if od.max() > od.min() else 0.0
    fg = ndi.binary_fill_holes(od > max(threshold_od, 0.03)) & ell
    lab, n = ndi.label(fg)
    if n == 0 or fg.sum() < 0.2 * ell.sum():
        return ell
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(lab == int(sizes.argmax()))


@dataclass
class ExportSummary:
    """Result of :func:`export_annotation_crops`: counts per class, fields, errors."""

    n_parasitized: int
    n_uninfected: int
    n_fields: int
    n_skipped: int
    errors: dict[str, str]
    groups_csv: Path
    interrupted: bool = False


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C during an export, raised after ``groups.csv`` was written for the fields finished
    (the crops of the field in progress are removed); ``summary`` counts those fields."""

    def __init__(self, summary: ExportSummary) -> None:
        super().__init__(f"interrupted after {summary.n_fields} field(s)")
        self.summary = summary


def export_annotation_crops(
    field_dir: str | Path,
    annotations: dict,
    out_dir: str | Path,
    *,
    infected_types: frozenset[str] | None = None,
    margin_px: int = 2,
    mask_cells: bool = True,
) -> ExportSummary:
    """Write NIH-layout PNG crops from annotated boxes.

    Parameters
    ----------
    field_dir : str or Path
        Folder of field images (names as in ``annotations``).
    annotations : dict
        Image name -> list of :class:`~malaria_screen.smear.evaluate.GroundTruthBox`
        (see :func:`~malaria_screen.smear.evaluate.load_iml_annotations`).
    out_dir : str or Path
        Output folder; ``Parasitized/``, ``Uninfected/`` and ``groups.csv`` are written there.
    infected_types : frozenset of str, optional
        Box types written to ``Parasitized/``; default ring/trophozoite/schizont/gametocyte.
        ``difficult`` boxes are skipped; every other type goes to ``Uninfected/``.
    margin_px : int
        Margin around each box, px.
    mask_cells : bool
        Black out pixels outside the cell (as in the NIH crops); False keeps the whole box.

    Returns
    -------
    ExportSummary
        Fields that cannot be decoded (or are grayscale) are listed in ``errors``.

    Raises
    ------
    ExportInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``), after ``groups.csv`` was written for the fields done.

    Notes
    -----
    Crops are named ``<field stem>_cell_<k>.png`` (k = index of the box in the field's
    annotation) and ``groups.csv`` maps each crop's relative path to its field id, so a grouped
    split never puts cells of one field on both sides. Fields from the same patient/slide are
    still separate groups: group by slide if that is known.
    """
    from malaria_screen.smear.evaluate import IGNORED_TYPES, INFECTED_TYPES

    inf_types = INFECTED_TYPES if infected_types is None else frozenset(infected_types)
    writer = _CropWriter(Path(out_dir))
    errors: dict[str, str] = {}
    try:
        for name, rgb in _decoded_fields(Path(field_dir), sorted(annotations), errors):
            stem = Path(name).stem
            H, W = rgb.shape[:2]
            n_skipped = 0
            for k, box in enumerate(annotations[name]):
                if box.type in IGNORED_TYPES:
                    n_skipped += 1
                    continue
                x, y, w, h = (int(round(v)) for v in box.bbox)
                x0, y0 = max(0, x - margin_px), max(0, y - margin_px)
                x1, y1 = min(W, x + w + margin_px), min(H, y + h + margin_px)
                if x1 - x0 < 4 or y1 - y0 < 4:
                    n_skipped += 1
                    continue
                crop = rgb[y0:y1, x0:x1].copy()
                if mask_cells:
                    crop[~box_cell_mask(crop)] = 0
                writer.write("Parasitized" if box.type in inf_types else "Uninfected", f"{stem}_cell_{k}.png", crop, stem)
            writer.end_field(n_skipped)
    except KeyboardInterrupt:
        raise ExportInterrupted(writer.finish(errors, interrupted=True)) from None
    return writer.finish(errors)


def export_detection_crops(
    field_dir: str | Path,
    annotations: dict,
    out_dir: str | Path,
    *,
    iou_threshold: float = 0.5,
    stain: str = "none",
    unmatched: str = "skip",
    **segment_kwargs,
) -> ExportSummary:
    """Write NIH-layout PNG crops of the segmented cells that match an annotated box.

    Each field is segmented (:func:`~malaria_screen.smear.segment.segment_field`), its cells
    are cut as in screening (:func:`cell_crops`, black outside the cell mask; optional stain
    normalisation as in :func:`~malaria_screen.smear.screen.screen_field`), and detections are
    matched one-to-one to the annotated boxes (:func:`~malaria_screen.smear.evaluate.match_boxes`,
    IoU ≥ ``iou_threshold``). A detection matched to an infected box goes to ``Parasitized/``,
    one matched to any other non-``difficult`` box to ``Uninfected/``; detections matched to
    ``difficult`` boxes are skipped (``n_skipped``), and so are unmatched ones unless
    ``unmatched="uninfected"``.

    Parameters
    ----------
    field_dir : str or Path
        Folder of field images (names as in ``annotations``).
    annotations : dict
        Image name -> list of :class:`~malaria_screen.smear.evaluate.GroundTruthBox`.
    out_dir : str or Path
        Output folder; ``Parasitized/``, ``Uninfected/`` and ``groups.csv`` (``path,patient``,
        patient = field stem) are written there. Crops are named ``<field stem>_det_<id>.png``
        (id = the cell's id in the segmentation).
    iou_threshold : float
        Minimum IoU of a match.
    stain : {"none", "reinhard", "macenko"}
        Stain normalisation applied before cutting (use the one the model will be run with).
    unmatched : {"skip", "uninfected"}
        What to do with detections that match no box. ``"uninfected"`` writes them to
        ``Uninfected/`` as ``<stem>_unm_<id>.png`` (negative mining: debris, lysed and white-cell
        fragments and burned-in marks that segmentation keeps are "not a parasitized red cell",
        which is what parasitemia counts), except those that overlap an infected or
        ``difficult`` box (≥ 10 % of the detection's box area): pieces of a split infected cell
        are not negatives. Cells the annotators left unboxed become negatives too: use it on
        exhaustively annotated fields.
    **segment_kwargs
        Passed to :func:`~malaria_screen.smear.segment.segment_field` (e.g. ``pixel_size_um``).

    Returns
    -------
    ExportSummary
        Fields that cannot be decoded or segmented (grayscale, too small, out of memory, ...: any
        ``Exception``) are listed in ``errors`` and not counted in ``n_fields``; the rest go on.

    Raises
    ------
    ExportInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``), after ``groups.csv`` was written for the fields done.
    ValueError
        If ``unmatched`` is not "skip" or "uninfected", or ``stain`` is unknown (checked before
        any field is read: a ValueError while screening a field is that field's error).
    """
    from malaria_screen.smear.segment import segment_field
    from malaria_screen.smear.stain import check_stain_method, normalize_stain

    if unmatched not in ("skip", "uninfected"):
        raise ValueError(f"unmatched must be 'skip' or 'uninfected', got {unmatched!r}")
    check_stain_method(stain)
    writer = _CropWriter(Path(out_dir))
    errors: dict[str, str] = {}
    try:
        for name, rgb in _decoded_fields(Path(field_dir), sorted(annotations), errors):
            try:
                seg = segment_field(rgb, **segment_kwargs)
                cells = seg.cells()
                pred_boxes = np.asarray([c.bbox for c in cells], np.float64).reshape(-1, 4)
                kept = [(cells[i], cls, tag) for i, cls, tag in
                        label_detections(pred_boxes, annotations[name], iou_threshold=iou_threshold, unmatched=unmatched)]
                crops = []
                if kept:  # cut only the cells that get written
                    src = normalize_stain(rgb, stain, mask=seg.labels > 0) if stain != "none" else rgb
                    crops = cell_crops(src, seg.labels, [c for c, _, _ in kept])
            except Exception as exc:  # noqa: BLE001 - one bad field (too small, MemoryError, ...) never costs the others
                _record_error(errors, name, exc)
                continue
            stem = Path(name).stem
            for (c, cls, tag), crop in sorted(zip(kept, crops), key=lambda t: t[0][0].id):
                writer.write(cls, f"{stem}_{tag}_{c.id}.png", crop, stem)
            writer.end_field(len(cells) - len(kept))
    except KeyboardInterrupt:
        raise ExportInterrupted(writer.finish(errors, interrupted=True)) from None
    return writer.finish(errors)


def label_detections(
    pred_boxes: np.ndarray, gt: list, *, iou_threshold: float = 0.5, unmatched: str = "skip"
) -> list[tuple[int, str, str]]:
    """Training labels of a field's detections from its annotated boxes.

    Detections are matched one-to-one to the boxes
    (:func:`~malaria_screen.smear.evaluate.match_boxes`, IoU ≥ ``iou_threshold``): matched to
    an infected box → ``"Parasitized"``, to any other non-``difficult`` box → ``"Uninfected"``
    (tag ``"det"``); matched to a ``difficult`` box → left out. Unmatched detections are left
    out, or with ``unmatched="uninfected"`` labelled ``"Uninfected"`` (tag ``"unm"``) unless
    they overlap an infected or ``difficult`` box by ≥ 10 % of their own box area (pieces of a
    split infected cell are not negatives).

    Parameters
    ----------
    pred_boxes : np.ndarray
        ``(N, 4)`` detection boxes ``(x, y, w, h)``, px.
    gt : list of GroundTruthBox
        The field's annotation.
    iou_threshold : float
    unmatched : {"skip", "uninfected"}

    Returns
    -------
    list of (int, str, str)
        ``(detection index, class name, tag)`` of the labelled detections, by index.

    Raises
    ------
    ValueError
        If ``unmatched`` is not "skip" or "uninfected".
    """
    from malaria_screen.smear.evaluate import match_boxes

    if unmatched not in ("skip", "uninfected"):
        raise ValueError(f"unmatched must be 'skip' or 'uninfected', got {unmatched!r}")
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray([g.bbox for g in gt], np.float64).reshape(-1, 4)
    pairs = match_boxes(pred_boxes, gt_boxes, iou_threshold=iou_threshold)
    out = [(i, "Parasitized" if gt[g].infected else "Uninfected", "det") for i, g in pairs if not gt[g].ignored]
    if unmatched == "uninfected":
        matched = {i for i, _ in pairs}
        risky = gt_boxes[np.asarray([g.infected or g.ignored for g in gt], bool)]
        cover = _box_cover(pred_boxes, risky)
        out += [(i, "Uninfected", "unm") for i in range(len(pred_boxes)) if i not in matched and cover[i] < 0.1]
    return sorted(out)


def _box_cover(pred: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` largest fraction of each ``(x, y, w, h)`` box in ``pred`` covered by one of ``boxes``."""
    if len(pred) == 0 or len(boxes) == 0:
        return np.zeros(len(pred))
    x0 = np.maximum(pred[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(pred[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(pred[:, None, 0] + pred[:, None, 2], boxes[None, :, 0] + boxes[None, :, 2])
    y1 = np.minimum(pred[:, None, 1] + pred[:, None, 3], boxes[None, :, 1] + boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return (inter / np.maximum(pred[:, 2] * pred[:, 3], 1e-9)[:, None]).max(axis=1)


def _decoded_fields(field_dir: Path, names: list[str], errors: dict[str, str]):
    """Yield ``(name, (H, W, 3) uint8 RGB)`` per field; undecodable or grayscale ones go to ``errors``
    and are skipped."""
    from malaria_screen.data.io import check_colour

    decode = _decoder()
    for name in names:
        try:
            rgb = check_colour(decode(field_dir / name))
        except Exception as exc:  # noqa: BLE001 - ImageDecodeError, and MemoryError on a huge field
            _record_error(errors, name, exc)
            continue
        yield name, rgb


def _record_error(errors: dict[str, str], name: str, exc: Exception) -> None:
    """``errors[name] = "<exception type>: <message>"``, logged at INFO (the commands print ``errors``)."""
    from malaria_screen.smear.evaluate import _error_text

    errors[name] = _error_text(exc)
    logger.info("skipping %s: %s", name, errors[name])


class _CropWriter:
    """Writes PNG crops into ``<out>/<class>/`` atomically, field by field, and ``groups.csv`` at the end."""

    CLASSES = ("Parasitized", "Uninfected")

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[tuple[str, str]] = []  # crops of the finished fields
        self.pending: list[tuple[str, str]] = []  # crops of the field in progress
        self.n_fields = self.n_skipped = 0
        for cls in self.CLASSES:
            (out_dir / cls).mkdir(parents=True, exist_ok=True)

    def write(self, cls: str, filename: str, crop: np.ndarray, group: str) -> None:
        from PIL import Image

        from malaria_screen.fileio import atomic_write_bytes

        rel = f"{cls}/{filename}"
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="PNG")
        self.pending.append((rel, group))
        atomic_write_bytes(self.out_dir / rel, buf.getvalue())

    def end_field(self, n_skipped: int) -> None:
        """The field in progress is done: its crops join ``groups.csv``."""
        self.rows += self.pending
        self.pending = []
        self.n_fields += 1
        self.n_skipped += n_skipped

    def finish(self, errors: dict[str, str], *, interrupted: bool = False) -> ExportSummary:
        """Write ``groups.csv`` for the finished fields (the crops of an unfinished one are removed)."""
        from malaria_screen.fileio import atomic_write_text, rows_to_csv

        for rel, _ in self.pending:
            (self.out_dir / rel).unlink(missing_ok=True)
        self.pending = []
        groups = self.out_dir / "groups.csv"
        atomic_write_text(groups, rows_to_csv([{"path": r, "patient": g} for r, g in self.rows], ["path", "patient"]))
        n = {cls: sum(r.startswith(f"{cls}/") for r, _ in self.rows) for cls in self.CLASSES}
        return ExportSummary(n["Parasitized"], n["Uninfected"], self.n_fields, self.n_skipped, errors, groups, interrupted)


def _decoder():
    """``decode_image`` from the core (raises ImageDecodeError, a ValueError)."""
    from malaria_screen.data.io import decode_image

    return decode_image
