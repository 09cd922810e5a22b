"""Letterbox resize: keep a cell's aspect ratio, pad with black to a square, as NIH crops are.

Downscaling uses area interpolation (no aliasing of the small ring-stage parasites); upscaling
uses bicubic (``cv2.INTER_CUBIC``, as seed 000 does).
"""

from __future__ import annotations

import numpy as np

try:  # OpenCV is faster; Pillow serves the light runtime install
    import cv2
except ImportError:  # pragma: no cover - exercised in the torch-free runtime install
    cv2 = None

__all__ = ["letterbox"]


def letterbox(rgb: np.ndarray, size_px: int) -> np.ndarray:
    """Resize an RGB image to ``size_px`` x ``size_px``, aspect kept, padded with black.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray of uint8
    size_px : int
        Side of the square output, in pixels.

    Returns
    -------
    out : (size_px, size_px, 3) ndarray of uint8
        The image scaled so its longer side is ``size_px``, centred on black.

    Raises
    ------
    ValueError
        If ``rgb`` is not (H, W, 3) with H, W > 0 or ``size_px`` < 1.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"letterbox needs an (H, W, 3) image, got shape {rgb.shape}")
    if size_px < 1:
        raise ValueError(f"size_px must be >= 1, got {size_px}")
    h, w = rgb.shape[:2]
    scale = size_px / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        if cv2 is not None:
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
            rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
        else:
            from PIL import Image

            resample = Image.Resampling.BOX if scale < 1.0 else Image.Resampling.BICUBIC
            rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), resample=resample))
    if nh == nw == size_px:
        return np.ascontiguousarray(rgb)
    out = np.zeros((size_px, size_px, 3), dtype=np.uint8)
    top, left = (size_px - nh) // 2, (size_px - nw) // 2
    out[top : top + nh, left : left + nw] = rgb
    return out
