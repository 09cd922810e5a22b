"""Domain-shift helpers: stain normalisation and scale normalisation of field images.

Stain normalisation maps the colours of a field from another site/microscope towards those of
the NIH/NLM training crops (Rajaraman et al. 2018), with torchstain's numpy backend:

- **Reinhard** (Reinhard et al. 2001, "Color transfer between images"): per-channel mean and
  standard deviation matching in CIE-Lab. The source statistics are taken over the *cell
  pixels* of the field only (background glass would otherwise dominate them); the target
  statistics are fixed constants measured on the non-black pixels of the 24 bundled-size NIH
  sample crops (``nih_samples_png``).
- **Macenko** (Macenko et al. 2009, "A method for normalizing histology slides for
  quantitative analysis"): stain vectors from the extreme angles of the optical-density plane,
  concentrations re-mapped onto a fixed reference stain matrix, also measured once on the NIH
  sample cell pixels. Macenko was designed for H&E; with Giemsa its two "stains" are roughly
  the azure/methylene-blue and eosin components. Treat it as an experimental option.

Scale normalisation resizes a field (or a crop) so that a red cell is as many pixels across as
in the NIH crops (median ~130 px per cell crop).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

#: Median side of an NIH cell crop (one cell), px.
NIH_CELL_DIAMETER_PX = 130.0

# Lab statistics (torchstain lab_split units: L in 0..100, a/b centred) of the non-black
# pixels of the 24 NIH sample crops.
_NIH_LAB_MEANS = np.array([67.0648, 16.925, 2.5942], dtype=np.float32)
_NIH_LAB_STDS = np.array([5.9589, 8.8851, 8.7194], dtype=np.float32)
# Macenko reference (torchstain numpy backend fitted on the same pixels).
_NIH_HE_REF = np.array([[0.2829, -0.0494], [0.9412, 0.8347], [0.1844, 0.5484]], dtype=np.float64)
_NIH_MAXC_REF = np.array([0.6628, 0.7335], dtype=np.float64)
_MACENKO_REF_IO = 240.0  # the transmitted light the reference was fitted at (torchstain's default Io)

STAIN_METHODS = ("none", "reinhard", "macenko")

__all__ = ["NIH_CELL_DIAMETER_PX", "STAIN_METHODS", "check_stain_method", "normalize_stain", "scale_factor_to_nih",
           "rescale"]


def check_stain_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`STAIN_METHODS`.

    Batch functions call it before their loop over fields, where a ValueError would be one
    field's error rather than the caller's.

    Raises
    ------
    ValueError
        If ``method`` is not one of :data:`STAIN_METHODS` (the message lists them).
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of {STAIN_METHODS}")
    return method


def normalize_stain(rgb: np.ndarray, method: str = "reinhard", *, mask: np.ndarray | None = None) -> np.ndarray:
    """Map a field's colours towards the NIH training crops.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    method : {"none", "reinhard", "macenko"}
        Normalisation method.
    mask : np.ndarray, optional
        ``(H, W)`` bool, the cell pixels whose statistics are matched (Reinhard). Default: all
        pixels. Only the masked pixels are transformed (the rest are returned unchanged), which
        is all that cell crops need and ~2x faster than the whole field.

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 normalised field (the input itself for ``"none"``).

    Raises
    ------
    ValueError
        For an unknown method or a non-(H, W, 3) input.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must have shape (H, W, 3), got {rgb.shape}")
    method = (method or "none").lower()
    if method == "none":
        return rgb
    if method == "reinhard":
        from torchstain.numpy.utils.lab2rgb import lab2rgb
        from torchstain.numpy.utils.rgb2lab import rgb2lab
        from torchstain.numpy.utils.split import lab_merge, lab_split

        sel = np.ones(rgb.shape[:2], bool) if mask is None or not np.any(mask) else mask.astype(bool)
        px = rgb[sel][None]  # (1, N, 3): only the cell pixels are converted (speed)
        labs = lab_split(rgb2lab(px.astype(np.float32) / 255.0))
        out = []
        for ch, mu_t, sd_t in zip(labs, _NIH_LAB_MEANS, _NIH_LAB_STDS):
            mu, sd = float(ch.mean()), float(ch.std())
            out.append((ch - mu) / max(sd, 1e-6) * sd_t + mu_t)
        res = rgb.copy()
        res[sel] = np.clip(lab2rgb(lab_merge(*out))[0] * 255.0, 0, 255).astype(np.uint8)
        return res
    if method == "macenko":
        import torchstain

        norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        norm.HERef = _NIH_HE_REF.copy()
        norm.maxCRef = _NIH_MAXC_REF.copy()
        io = float(np.percentile(rgb.reshape(-1, 3).mean(axis=1), 97))
        sel = np.ones(rgb.shape[:2], bool) if mask is None or not np.any(mask) else mask.astype(bool)
        try:
            res, _, _ = norm.normalize(rgb[sel][None], Io=max(io, 1.0), stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
            logger.warning("Macenko normalisation failed (%s); field left unnormalised", exc)
            return rgb
        # torchstain rebuilds the colours under the light it was given (the field's own): rebuilt
        # under the reference's light instead (240, torchstain's default, at which the NIH
        # reference was fitted), a dim field's cells come out as bright as NIH's, not as dim as its lamp
        out = rgb.copy()
        res = np.asarray(res, dtype=np.float64) * (_MACENKO_REF_IO / max(io, 1.0))
        out[sel] = np.clip(res, 0, 255).astype(np.uint8).reshape(-1, 3)
        return out
    check_stain_method(method)
    raise AssertionError(f"stain method {method!r} listed but not implemented")  # pragma: no cover


def scale_factor_to_nih(rbc_diameter_px: float, *, target_px: float = NIH_CELL_DIAMETER_PX) -> float:
    """Resize factor that makes a cell of ``rbc_diameter_px`` px as large as an NIH crop.

    Parameters
    ----------
    rbc_diameter_px : float
        Typical RBC diameter in the field, px.
    target_px : float
        Target diameter, px (default 130, the NIH median crop side).

    Returns
    -------
    float
        Factor (> 0); 1.0 if the diameter is not finite/positive.
    """
    if not np.isfinite(rbc_diameter_px) or rbc_diameter_px <= 0:
        return 1.0
    return float(target_px) / float(rbc_diameter_px)


def rescale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 image by ``factor`` (area interpolation when shrinking,
    cubic when enlarging). Returns the input itself when ``factor`` is ~1."""
    import cv2

    if abs(factor - 1.0) < 1e-3:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
