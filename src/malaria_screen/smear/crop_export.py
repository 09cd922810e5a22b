"""Annotated fields exported as an NIH-layout crop folder, for training or adapting a cell model.

:func:`export_annotation_crops` turns annotated fields (IML_Malaria boxes) into an NIH-layout
folder ``Parasitized/`` + ``Uninfected/`` of PNG crops named ``<field stem>_cell_<k>.png`` and a
``groups.csv`` (``path,patient`` with patient = field id) for leak-free grouped training.
:func:`export_detection_crops` writes the same layout from the *segmentation's* cells, cut
exactly as :func:`~malaria_screen.smear.screen.screen_field` cuts them, each labelled by the
annotated box it matches (IoU ≥ 0.5, :func:`~malaria_screen.smear.labels.label_detections`):
training crops then look like the crops the adapted model will classify.
"""

from __future__ import annotations

import glob
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from malaria_screen.fileio import atomic_write_bytes, atomic_write_text, rows_to_csv
from malaria_screen.smear.crops import box_cell_mask, cell_crops
from malaria_screen.smear.fields import decoded_fields, record_error
from malaria_screen.smear.labels import IGNORED_TYPES, INFECTED_TYPES, label_detections
from malaria_screen.smear.segment import SegmentConfig, segment_field
from malaria_screen.smear.stain import check_stain_method, normalize_stain

__all__ = ["ExportInterrupted", "ExportSummary", "annotation_crop", "export_annotation_crops", "export_detection_crops",
           "field_stems"]


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


def annotation_crop(rgb: np.ndarray, bbox, *, margin_px: int = 2, mask_cells: bool = True) -> np.ndarray | None:
    """Cut one annotated cell as :func:`export_annotation_crops` writes it.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray of uint8
        The field.
    bbox : (x, y, w, h)
        The annotated box, px (rounded to whole pixels).
    margin_px : int
        Margin around the box, px (clipped to the image).
    mask_cells : bool
        Black out pixels outside the cell (:func:`~malaria_screen.smear.crops.box_cell_mask`,
        as in the NIH crops); False keeps the whole box.

    Returns
    -------
    (h, w, 3) ndarray of uint8, or None
        None when the clipped box is narrower or lower than 4 px (nothing to classify).
    """
    H, W = rgb.shape[:2]
    x, y, w, h = (int(round(v)) for v in bbox)
    x0, y0 = max(0, x - margin_px), max(0, y - margin_px)
    x1, y1 = min(W, x + w + margin_px), min(H, y + h + margin_px)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    crop = rgb[y0:y1, x0:x1].copy()
    if mask_cells:
        crop[~box_cell_mask(crop)] = 0
    return crop


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
        Image name -> list of :class:`~malaria_screen.smear.labels.GroundTruthBox`
        (see :func:`~malaria_screen.smear.labels.load_iml_annotations`).
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
    annotation; two fields of one stem get their extension too: :func:`field_stems`) and ``groups.csv`` maps each crop's relative path to its field id, so a grouped
    split never puts cells of one field on both sides. Fields from the same patient/slide are
    still separate groups: group by slide if that is known.
    """
    inf_types = INFECTED_TYPES if infected_types is None else frozenset(infected_types)
    writer = _CropWriter(Path(out_dir))
    errors: dict[str, str] = {}
    stems = field_stems(annotations)
    try:
        for name, rgb in decoded_fields(Path(field_dir), sorted(annotations), errors):
            stem = stems[name]
            try:  # cut all of a field's crops before writing any: a bad box costs its field only
                n_skipped, todo = 0, []
                for k, box in enumerate(annotations[name]):
                    crop = None if box.type in IGNORED_TYPES else annotation_crop(rgb, box.bbox, margin_px=margin_px,
                                                                                   mask_cells=mask_cells)
                    if crop is None:
                        n_skipped += 1
                    else:
                        todo.append(("Parasitized" if box.type in inf_types else "Uninfected", f"{stem}_cell_{k}.png", crop))
            except Exception as exc:  # noqa: BLE001 - one bad field never costs the others
                record_error(errors, name, exc)
                continue
            for cls, fname, crop in todo:
                writer.write(cls, fname, crop, stem)
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
    segment_config: SegmentConfig | None = None,
) -> ExportSummary:
    """Write NIH-layout PNG crops of the segmented cells that match an annotated box.

    Each field is segmented (:func:`~malaria_screen.smear.segment.segment_field`), its cells
    are cut as in screening (:func:`cell_crops`, black outside the cell mask; optional stain
    normalisation as in :func:`~malaria_screen.smear.screen.screen_field`), and detections are
    matched one-to-one to the annotated boxes (:func:`~malaria_screen.smear.boxes.match_boxes`,
    IoU ≥ ``iou_threshold``). A detection matched to an infected box goes to ``Parasitized/``,
    one matched to any other non-``difficult`` box to ``Uninfected/``; detections matched to
    ``difficult`` boxes are skipped (``n_skipped``), and so are unmatched ones unless
    ``unmatched="uninfected"``.

    Parameters
    ----------
    field_dir : str or Path
        Folder of field images (names as in ``annotations``).
    annotations : dict
        Image name -> list of :class:`~malaria_screen.smear.labels.GroundTruthBox`.
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
    segment_config : SegmentConfig, optional
        Segmentation settings (e.g. ``pixel_size_um``); default :class:`SegmentConfig()`.

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
    if unmatched not in ("skip", "uninfected"):
        raise ValueError(f"unmatched must be 'skip' or 'uninfected', got {unmatched!r}")
    check_stain_method(stain)
    writer = _CropWriter(Path(out_dir))
    errors: dict[str, str] = {}
    stems = field_stems(annotations)
    try:
        for name, rgb in decoded_fields(Path(field_dir), sorted(annotations), errors):
            try:
                seg = segment_field(rgb, segment_config)
                cells = seg.cells()
                pred_boxes = np.asarray([c.bbox for c in cells], np.float64).reshape(-1, 4)
                kept = [(cells[i], cls, tag) for i, cls, tag in
                        label_detections(pred_boxes, annotations[name], iou_threshold=iou_threshold, unmatched=unmatched)]
                crops = []
                if kept:  # cut only the cells that get written
                    src = normalize_stain(rgb, stain, mask=seg.labels > 0) if stain != "none" else rgb
                    crops = cell_crops(src, seg.labels, [c for c, _, _ in kept])
            except Exception as exc:  # noqa: BLE001 - one bad field (too small, MemoryError, ...) never costs the others
                record_error(errors, name, exc)
                continue
            stem = stems[name]
            for (c, cls, tag), crop in sorted(zip(kept, crops), key=lambda t: t[0][0].id):
                writer.write(cls, f"{stem}_{tag}_{c.id}.png", crop, stem)
            writer.end_field(len(cells) - len(kept))
    except KeyboardInterrupt:
        raise ExportInterrupted(writer.finish(errors, interrupted=True)) from None
    return writer.finish(errors)


def field_stems(names: Iterable[str]) -> dict[str, str]:
    """The prefix of each field's crop names and its group in ``groups.csv``: the file name's stem,
    or, where two annotated fields share a stem (``a.jpg`` and ``a.png``), the stem and the
    extension (``a_jpg``, ``a_png``), so that no field's crops overwrite another's.

    Parameters
    ----------
    names : iterable of str
        The fields' file names (the annotation's ``image_name``).

    Returns
    -------
    dict
        File name -> prefix; the prefixes are unique.
    """
    names = sorted(set(names))
    counts = Counter(Path(n).stem for n in names)
    out = {n: (Path(n).stem if counts[Path(n).stem] == 1 else f"{Path(n).stem}_{Path(n).suffix.lstrip('.')}") for n in names}
    seen: Counter = Counter()
    for n in names:  # the rare clash left (``a_jpg.png`` beside ``a.jpg`` and ``a.png``): a numbered suffix
        seen[out[n]] += 1
        if seen[out[n]] > 1:
            out[n] = f"{out[n]}_{seen[out[n]]}"
    return out


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
        for rel, _ in self.pending:
            crop = self.out_dir / rel
            crop.unlink(missing_ok=True)
            # a Ctrl-C inside atomic_write's set-up (between mkstemp and its clean-up) can leave the
            # temporary part (`.<first 16 characters>.<random>.tmp`): seen with a real SIGINT
            for part in crop.parent.glob(f".{glob.escape(crop.name[:16])}.*.tmp"):
                part.unlink(missing_ok=True)
        self.pending = []
        groups = self.out_dir / "groups.csv"
        atomic_write_text(groups, rows_to_csv([{"path": r, "patient": g} for r, g in self.rows], ["path", "patient"]))
        n = {cls: sum(r.startswith(f"{cls}/") for r, _ in self.rows) for cls in self.CLASSES}
        return ExportSummary(n["Parasitized"], n["Uninfected"], self.n_fields, self.n_skipped, errors, groups, interrupted)
