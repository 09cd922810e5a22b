"""Hand-crafted colour, texture and shape features of segmented red cells.

A Giemsa-stained *Plasmodium* parasite shows as dark purple chromatin and blue (basophilic)
cytoplasm inside a pink (eosinophilic) red cell: pixels that absorb red light more than the rest
of the cell does. Infected cells of *P. vivax* (the IML_Malaria species) are also enlarged and
stippled (Schüffner's dots). :func:`cell_features` measures this in optical density (OD), each
cell against its own median and the field against its own background, so that the features
follow the stain regime of the field rather than absolute colours: the classic colour/size
features of the pre-CNN malaria literature (Tek, Dempster & Kale, *Malaria Journal* 2009,
review of computer-vision malaria diagnosis; Poostchi et al., *Transl. Res.* 2018, section 4),
fed here to a gradient-boosted second stage (:mod:`malaria_screen.smear.rescore`) together with
the CNN's logit.
"""

from __future__ import annotations

import numpy as np

from malaria_screen.smear.density import optical_density_log10
from malaria_screen.smear.segment import CellProps

__all__ = ["FEATURE_NAMES", "cell_features"]

_Q = (50, 90, 95, 99, 99.5, 100)
_T = (0.3, 0.6, 1.0)


def _names() -> list[str]:
    names = []
    for region in ("cell", "inner"):
        for ch in "RGB":
            names += [f"{region}_ex{ch}_q{q:g}" for q in _Q]
    for t in _T:
        names += [f"blobR{t:g}_n", f"blobR{t:g}_max", f"blobR{t:g}_frac", f"blobG{t:g}_n", f"blobG{t:g}_frac"]
    names += ["area_rel", "filled_area_rel", "aspect", "extent", "medR_rel", "medG_rel", "medB_rel",
              "field_odR", "field_odG", "field_odB", "border",
              "ratioRG_q99", "ratioRG_q95", "odR_std", "odG_std", "ratioRG_rel"]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(_names())
"""Column names of :func:`cell_features`, in order."""


def cell_features(rgb: np.ndarray, labels: np.ndarray, cells: list[CellProps]) -> np.ndarray:
    """Colour, texture and shape features of each segmented cell of one field.

    Optical density ``OD = -log10((I + 1) / (background + 1))`` per channel, background = the
    field's 97th percentile per channel (:func:`~malaria_screen.smear.density.optical_density_log10`), smoothed with a Gaussian of σ = 1 px. ``ex`` = OD minus
    the cell's median OD, divided by the field's median green OD of all cell pixels (the stain
    strength). Per cell (see :data:`FEATURE_NAMES`): percentiles 50-100 of ``ex`` in R, G, B over
    the whole cell mask and over its interior (eroded by 6 % of the typical diameter, so the dark
    rims where cells overlap count less); number, largest size and area fraction of interior
    blobs with ``ex`` above 0.3 / 0.6 / 1.0 (chromatin dots); area and filled area relative to the
    field's median cell; aspect ratio and extent of the mask's box; the cell's median OD relative
    to the field's; the field's median OD (stain regime); the border flag; red/green OD ratio
    percentiles and OD spread.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    labels : np.ndarray
        ``(H, W)`` int label image of the segmentation (0 = background).
    cells : list of CellProps
        Cells to describe (``id`` = label value), e.g. ``Segmentation.cells()``.

    Returns
    -------
    np.ndarray
        ``(len(cells), len(FEATURE_NAMES))`` float32.

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(H, W, 3)``, ``labels`` does not match it, or a cell id is not in
        ``labels``.
    """
    from scipy import ndimage as ndi

    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB field, got shape {rgb.shape}")
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the field {rgb.shape[:2]}")
    nf = len(FEATURE_NAMES)
    if not cells:
        return np.zeros((0, nf), np.float32)
    od = ndi.gaussian_filter(optical_density_log10(rgb), (1, 1, 0))
    lab = labels.astype(np.int32, copy=False)
    objs = ndi.find_objects(lab)
    cellpix = od[lab > 0]
    fmed = np.median(cellpix, 0) if len(cellpix) else np.full(3, 0.3, np.float32)
    s = max(float(fmed[1]), 0.05)
    field_ratio = float(fmed[0]) / (float(fmed[1]) + 0.05)
    med_area = float(np.median([c.area_px for c in cells])) or 1.0
    er = max(1, int(round(np.sqrt(med_area) * 0.06)))
    out = np.zeros((len(cells), nf), np.float32)
    for i, c in enumerate(cells):
        sl = objs[c.id - 1] if 0 < c.id <= len(objs) else None
        if sl is None:
            raise ValueError(f"cell {c.id} is not in the label image")
        m = lab[sl] == c.id
        o = od[sl]
        inner = ndi.binary_erosion(m, iterations=er)
        if inner.sum() < 10:
            inner = m
        med = np.median(o[m], 0)
        row: list[float] = []
        for mask in (m, inner):
            ex = (o[mask] - med) / s
            for ch in range(3):
                row += list(np.percentile(ex[:, ch], _Q))
        area = float(m.sum())
        exr = np.where(inner, (o[..., 0] - med[0]) / s, 0.0)
        exg = np.where(inner, (o[..., 1] - med[1]) / s, 0.0)
        for t in _T:
            lb, nb = ndi.label(exr > t)
            sizes = np.bincount(lb.ravel())[1:] if nb else np.zeros(1)
            row += [nb, sizes.max() / area, (exr > t).sum() / area]
            _, ng = ndi.label(exg > t)
            row += [ng, (exg > t).sum() / area]
        h, w = m.shape
        ratio = o[m][:, 0] / (o[m][:, 1] + 0.05)
        mr = float(np.median(ratio))
        row += [c.area_px / med_area, ndi.binary_fill_holes(m).sum() / med_area, max(h, w) / max(min(h, w), 1),
                area / (h * w), *(med / np.maximum(fmed, 1e-3)), *fmed, float(c.border),
                np.percentile(ratio, 99) - mr, np.percentile(ratio, 95) - mr, o[m][:, 0].std(), o[m][:, 1].std(),
                mr / (field_ratio + 1e-6)]
        out[i] = row
    return out
