"""Uninfected red cells from another site, cut around annotated points, as extra training negatives.

The Chula-RBC-12 fields (Naruenatthanaset et al., arXiv:2012.01321; MIT licence) hold no malaria
and mark every red cell with a point (``labels/N.txt``: ``x y type`` per line). Adding their cells
to the training split as Uninfected shows the classifier red cells from another microscope,
camera and stain, so that the stain alone does not read as "parasite".

Each cell is cut like an NIH training crop (Rajaraman et al. 2018): a square around the point of
side 1.15 x the field's red-cell diameter, black outside the cell. The diameter of a field is
estimated from its points (the median distance to the nearest annotated neighbour: red cells of
a monolayer touch their neighbours); the cell mask is the largest dark (green optical density
above Otsu's threshold) region inside the inscribed circle, or the circle when thresholding fails.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.data.dataset import CellSet
from malaria_screen.data.io import ImageDecodeError, decode_image
from malaria_screen.data.preprocess import letterbox
from malaria_screen.fileio import read_point_labels

__all__ = ["read_point_labels", "field_rbc_diameter", "point_cell_crops", "point_cell_set", "list_point_fields",
           "trained_fields"]

log = logging.getLogger(__name__)

#: Crop side as a multiple of the estimated red-cell diameter.
CROP_SCALE = 1.15


def field_rbc_diameter(points: np.ndarray) -> float | None:
    """Red-cell diameter of a field, px: median distance of each point to its nearest neighbour.

    Returns None with fewer than 5 points (too few neighbours to tell).
    """
    from scipy.spatial import cKDTree

    if len(points) < 5:
        return None
    d, _ = cKDTree(points).query(points, k=2)
    return float(np.median(d[:, 1]))


def _cell_mask(box: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    h, w = box.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    circle = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
    g = box[..., 1].astype(np.float32)
    bg = max(float(np.percentile(g, 98)), 1.0)
    od = np.clip(-np.log((g + 1) / (bg + 1)), 0, None)
    t = float(threshold_otsu(od)) if od.max() > od.min() else 0.0
    fg = ndi.binary_fill_holes(od > max(t, 0.03)) & circle
    lab, n = ndi.label(fg)
    if n == 0:
        return circle
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = ndi.binary_fill_holes(lab == int(sizes.argmax()))
    return keep if keep.sum() >= 0.3 * circle.sum() else circle


def point_cell_crops(rgb: np.ndarray, points: np.ndarray, diameter_px: float) -> list[np.ndarray]:
    """Cut one NIH-style crop per point: square of side ``CROP_SCALE * diameter_px``, black outside the cell.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray of uint8
    points : (N, 2) ndarray
        ``(x, y)`` centres, px.
    diameter_px : float
        Red-cell diameter, px.

    Returns
    -------
    list of ndarray
        ``(s, s, 3)`` uint8 crops (cells at the image border are cut off there, as the NIH
        segmentation cut them); points outside the image are skipped.
    """
    h, w = rgb.shape[:2]
    half = max(2, int(round(CROP_SCALE * diameter_px / 2)))
    out = []
    for x, y in np.round(points).astype(int):
        if not (0 <= x < w and 0 <= y < h):
            continue
        canvas = np.zeros((2 * half, 2 * half, 3), np.uint8)
        x0, y0, x1, y1 = x - half, y - half, x + half, y + half
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = rgb[cy0:cy1, cx0:cx1]
        canvas[~_cell_mask(canvas)] = 0
        out.append(canvas)
    return out


def list_point_fields(folder: str | Path) -> list[str]:
    """Stems of the fields of a Chula-layout folder (``images/<stem>.*`` with ``labels/<stem>.txt``), sorted numerically."""
    root = Path(folder)
    stems = [p.stem for p in (root / "images").iterdir() if p.is_file() and (root / "labels" / f"{p.stem}.txt").is_file()]
    return sorted(stems, key=lambda s: (int(s) if s.isdigit() else 10**9, s))


def trained_fields(config, folder: str | Path) -> list[str]:
    """Stems of ``folder``'s fields a model was trained on as extra negatives.

    ``config`` is the model's :class:`~malaria_screen.config.TrainConfig`: none without
    ``extra_negatives``; its ``extra_negative_fields``, or every field of ``folder`` when that
    list is empty (what ``train --extra-negatives`` uses then).
    """
    if not config.extra_negatives:
        return []
    return list(config.extra_negative_fields) or list_point_fields(folder)


def point_cell_set(
    folder: str | Path,
    *,
    size_px: int,
    class_names: Sequence[str],
    label: str = "Uninfected",
    fields: Sequence[str] = (),
) -> CellSet:
    """All point-annotated red cells of a Chula-layout folder as a :class:`CellSet` of one class.

    Parameters
    ----------
    folder : path
        ``images/<stem>.jpg`` + ``labels/<stem>.txt`` (``x y type`` per red cell).
    size_px : int
        Letterbox side of the cells.
    class_names : sequence of str
        Classes of the set the cells join; ``label`` must be one of them.
    label : str, default="Uninfected"
    fields : sequence of str, optional
        Field stems to use; default all.

    Returns
    -------
    CellSet
        Patients ``"<folder name>:<stem>"`` (one group per field), relpaths
        ``"<folder name>/images/<file>#<k>"``. Fields that fail to decode or have fewer than 5
        points are left out and listed in ``errors``.

    Raises
    ------
    ValueError
        If ``label`` is not in ``class_names`` or a requested field does not exist.
    FileNotFoundError
        If ``folder`` has no ``images/`` folder.
    """
    root = Path(folder).resolve()
    if label not in class_names:
        raise ValueError(f"label {label!r} is not one of the classes {list(class_names)}")
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"no images/ folder in {root}")
    available = list_point_fields(root)
    missing = sorted(set(fields) - set(available))
    if missing:
        raise ValueError(f"fields not in {root}: {missing[:5]}")
    chosen = [s for s in available if not fields or s in set(fields)]
    images: list[np.ndarray] = []
    patients: list[str] = []
    relpaths: list[str] = []
    errors: dict[str, str] = {}
    for stem in chosen:
        img_path = next(p for p in sorted((root / "images").glob(f"{stem}.*")) if p.is_file())
        rel = f"{root.name}/images/{img_path.name}"
        points = read_point_labels(root / "labels" / f"{stem}.txt")
        d = field_rbc_diameter(points)
        if d is None:
            errors[rel] = f"{len(points)} points: too few to estimate the red-cell size"
            continue
        try:
            rgb = decode_image(img_path)
        except ImageDecodeError as exc:
            errors[rel] = str(exc)
            continue
        for k, crop in enumerate(point_cell_crops(rgb, points, d)):
            images.append(letterbox(crop, size_px))
            patients.append(f"{root.name}:{stem}")
            relpaths.append(f"{rel}#{k}")
    for rel, msg in errors.items():
        log.warning("extra negatives: skipping %s: %s", rel, msg)
    arr = np.stack(images) if images else np.zeros((0, size_px, size_px, 3), np.uint8)
    return CellSet(images=arr, labels=np.full(len(images), list(class_names).index(label), np.int64), patients=patients,
                   relpaths=relpaths, class_names=list(class_names), root=root, size_px=size_px, errors=errors)
