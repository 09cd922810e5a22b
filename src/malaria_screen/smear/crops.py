"""Cell crops prepared like the NIH/NLM training crops.

The NIH malaria cell images (Rajaraman et al., PeerJ 2018) were cut from thin-smear fields by
the NLM Malaria Screener segmentation (Poostchi et al. 2018): each crop is the bounding box of
one segmented cell with every pixel outside the cell mask set to black, about 130 px across.
:func:`cell_crop` reproduces that layout from a label image (cell centred in a square black
canvas, aspect kept), so the classifier trained on NIH crops sees the same kind of input; the
classifier's own letterbox resize then brings it to the model input size.

The export of annotated fields as NIH-layout crop folders is :mod:`malaria_screen.smear.crop_export`.
"""

from __future__ import annotations

import numpy as np

from malaria_screen.smear.density import green_optical_density
from malaria_screen.smear.segment import CellProps

__all__ = ["box_cell_mask", "cell_crop", "cell_crops"]


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

    Green optical density :func:`~malaria_screen.smear.density.green_optical_density`.

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
    od = green_optical_density(rgb_box)
    if threshold_od is None:
        threshold_od = float(threshold_otsu(od)) if od.max() > od.min() else 0.0
    fg = ndi.binary_fill_holes(od > max(threshold_od, 0.03)) & ell
    lab, n = ndi.label(fg)
    if n == 0 or fg.sum() < 0.2 * ell.sum():
        return ell
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(lab == int(sizes.argmax()))
