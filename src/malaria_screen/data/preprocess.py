"""Letterbox resize: keep a cell's aspect ratio, pad with black to a square, as NIH crops are.

Downscaling uses area interpolation (no aliasing of the small ring-stage parasites), OpenCV's
``INTER_AREA`` run on a float32 copy (the same pixels as on the uint8 image, cheaper); upscaling
uses bicubic (``cv2.INTER_CUBIC``, as seed 000 does). Without OpenCV (the light runtime install)
the area resize is computed in numpy with the same weights as ``cv2.INTER_AREA``, so a model sees
the same pixels whichever install runs it; only upscaling falls back to Pillow's bicubic.
"""

from __future__ import annotations

import numpy as np

try:  # OpenCV is faster; the light runtime install uses area_resize (and Pillow to upscale)
    import cv2
except ImportError:  # pragma: no cover - exercised in the torch-free runtime install
    cv2 = None

__all__ = ["area_resize", "letterbox"]


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse area-resize weights: ``(T, n_out)`` int64 input indices and float32 weights.

    Output pixel ``i`` averages the input span ``[i*s, (i+1)*s)``, ``s = n_in / n_out``; tap ``t``
    is the ``t``-th input pixel it overlaps, left to right, weighted by the overlapped length
    over ``s`` (weight 0 past the span's end).
    """
    s = n_in / n_out
    lo = np.arange(n_out) * s
    first = np.floor(lo).astype(np.int64)
    n_taps = int(np.ceil(s)) + 1
    idx = first[None, :] + np.arange(n_taps)[:, None]
    overlap = np.minimum(lo + s, idx + 1) - np.maximum(lo, idx)
    weights = np.clip(overlap, 0.0, None) / s
    weights[idx >= n_in] = 0.0
    return np.minimum(idx, n_in - 1), weights.astype(np.float32)


def _area_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    idx, wts = _area_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    acc = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1 :], np.float32)
    for t in range(len(idx)):  # accumulate tap by tap, left to right, in float32
        acc += np.take(x, idx[t], axis=axis) * wts[t].reshape(shape)
    return acc


def area_resize(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Downscale by pixel-area averaging, as ``cv2.resize(..., interpolation=cv2.INTER_AREA)``.

    Each output pixel is the mean of the input area it covers, fractional pixels weighted by
    their covered fraction (separable: columns, then rows), rounded half to even. Pixel-identical
    to OpenCV on all 412 NIH crops tested (every 50th of the shared set, to 64 px).

    Parameters
    ----------
    rgb : (H, W, C) ndarray of uint8
    out_h, out_w : int
        Output size in pixels, each at most the input's.

    Returns
    -------
    (out_h, out_w, C) ndarray of uint8

    Raises
    ------
    ValueError
        If the output is larger than the input or empty.
    """
    h, w = rgb.shape[:2]
    if not (1 <= out_h <= h and 1 <= out_w <= w):
        raise ValueError(f"area_resize downscales only: {h}x{w} -> {out_h}x{out_w}")
    # float32, columns first then rows, taps summed left to right: OpenCV's order and precision.
    out = _area_axis(_area_axis(rgb.astype(np.float32), out_w, axis=1), out_h, axis=0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _area_resize_cv2(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)`` of a uint8 image, the
    same pixels at about three quarters of the CPU.

    OpenCV's area resize of a uint8 image accumulates in float32 and rounds half to even at the
    end; run on a float32 copy it computes the same float32 sums (same tables, same order) in a
    faster loop, and ``np.rint`` rounds them as OpenCV's ``saturate_cast`` does (sums of uint8
    pixels with weights summing to 1 never leave [0, 255]). Pixel-identical on all 4,096 NIH cells
    of ``benchmarks/bench_predict.py`` (``tests/data/test_dataset.py`` checks every 100th cell).
    """
    out = cv2.resize(rgb.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_AREA)
    return np.rint(out, out=out).astype(np.uint8)


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
        if cv2 is not None and scale < 1.0:
            rgb = _area_resize_cv2(rgb, nh, nw)
        elif cv2 is not None:
            rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_CUBIC)
        elif scale < 1.0:
            rgb = area_resize(rgb, nh, nw)
        else:
            from PIL import Image

            rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), resample=Image.Resampling.BICUBIC))
    if nh == nw == size_px:
        return np.ascontiguousarray(rgb)
    out = np.zeros((size_px, size_px, 3), dtype=np.uint8)
    top, left = (size_px - nh) // 2, (size_px - nw) // 2
    out[top : top + nh, left : left + nw] = rgb
    return out
