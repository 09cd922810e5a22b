"""Annotated cells: the IML_Malaria boxes and Chula-RBC-12 points, and labels for detections.

- **IML_Malaria** (Arshad et al. 2022): ``annotations.json`` lists per image its boxes
  ``(x, y, w, h)`` px with a type; ``ring``, ``trophozoite``, ``schizont`` and ``gametocyte``
  boxes are infected red cells, ``difficult`` ones are ignored, any other type is an uninfected
  red cell (:func:`load_iml_annotations`).
- **Chula-RBC-12** (Naruenatthanaset et al. 2021): one point per red cell (:func:`load_chula_points`).
- :func:`label_detections` labels a field's segmented cells by the annotated box each matches:
  the training labels of crop export and of the rescorer.

File I/O is limited to the two loaders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_screen.fileio import read_point_labels
from malaria_screen.smear.boxes import box_cover, match_boxes

__all__ = ["IGNORED_TYPES", "INFECTED_TYPES", "GroundTruthBox", "label_detections", "load_chula_points",
           "load_iml_annotations"]

#: IML box types of infected red cells (life-cycle stages).
INFECTED_TYPES = frozenset({"ring", "trophozoite", "schizont", "gametocyte"})
#: IML box types left out of every count.
IGNORED_TYPES = frozenset({"difficult"})


@dataclass(frozen=True)
class GroundTruthBox:
    """One annotated object: ``bbox`` = ``(x, y, w, h)`` px, top-left origin; ``type`` string."""

    bbox: tuple[float, float, float, float]
    type: str

    @property
    def infected(self) -> bool:
        """True for an infected red cell (:data:`INFECTED_TYPES`)."""
        return self.type in INFECTED_TYPES

    @property
    def ignored(self) -> bool:
        """True for a box left out of every count (:data:`IGNORED_TYPES`)."""
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
                box = (float(b["x"]), float(b["y"]), float(b["w"]), float(b["h"]))
                if not all(math.isfinite(v) for v in box):  # "nan", "inf": float() takes them
                    raise ValueError(f"box coordinates must be finite numbers (px), got {box}")
                objs.append(GroundTruthBox(box, str(o["type"]).strip().lower()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad annotation entry {str(entry)[:120]!r}: {exc}") from exc
        out[name] = objs
    return out


def load_chula_points(path: str | Path) -> np.ndarray:
    """Read a Chula-RBC-12 label file (lines ``x y type``).

    Returns
    -------
    (N, 2) float64 ndarray
        ``(x, y)`` px cell centres.
    """
    return read_point_labels(path)


def label_detections(
    pred_boxes: np.ndarray, gt: list[GroundTruthBox], *, iou_threshold: float = 0.5, unmatched: str = "skip"
) -> list[tuple[int, str, str]]:
    """Training labels of a field's detections from its annotated boxes.

    Detections are matched one-to-one to the boxes (:func:`~malaria_screen.smear.boxes.match_boxes`,
    IoU ≥ ``iou_threshold``): matched to an infected box → ``"Parasitized"``, to any other
    non-``difficult`` box → ``"Uninfected"`` (tag ``"det"``); matched to a ``difficult`` box →
    left out. Unmatched detections are left out, or with ``unmatched="uninfected"`` labelled
    ``"Uninfected"`` (tag ``"unm"``) unless they overlap an infected or ``difficult`` box by
    ≥ 10 % of their own box area (pieces of a split infected cell are not negatives).

    Parameters
    ----------
    pred_boxes : (N, 4) array-like
        Detection boxes ``(x, y, w, h)``, px.
    gt : list of GroundTruthBox
        The field's annotation.
    iou_threshold : float, default=0.5
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
    if unmatched not in ("skip", "uninfected"):
        raise ValueError(f"unmatched must be 'skip' or 'uninfected', got {unmatched!r}")
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray([g.bbox for g in gt], np.float64).reshape(-1, 4)
    pairs = match_boxes(pred_boxes, gt_boxes, iou_threshold=iou_threshold)
    out = [(i, "Parasitized" if gt[g].infected else "Uninfected", "det") for i, g in pairs if not gt[g].ignored]
    if unmatched == "uninfected":
        matched = {i for i, _ in pairs}
        risky = gt_boxes[np.asarray([g.infected or g.ignored for g in gt], bool)]
        cover = box_cover(pred_boxes, risky)
        out += [(i, "Uninfected", "unm") for i in range(len(pred_boxes)) if i not in matched and cover[i] < 0.1]
    return sorted(out)
