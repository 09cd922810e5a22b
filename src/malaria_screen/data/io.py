"""Decode any common image file into an 8-bit RGB array, by content, never by extension.

Every input a user can throw at a batch (PNG, JPEG, WebP, TIFF, BMP, GIF; 16-bit, RGBA,
grayscale, palette, CMYK) becomes a ``(H, W, 3) uint8`` RGB array, and every input that cannot be
read (empty, truncated, corrupt, not an image, absurdly large) raises one exception type,
:class:`ImageDecodeError`, whose message says what is wrong, so that batch code can record a
per-file error and carry on.

Transparent pixels are composited onto black, the background of the NIH cell crops
(Rajaraman et al., PeerJ 2018).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["ImageDecodeError", "ImageSource", "decode_image", "to_rgb_uint8", "MAX_PIXELS"]

#: Largest image accepted, in pixels (width x height). A 1280x960 smear field is 1.2 Mpx;
#: whole-slide tiles beyond 100 Mpx belong in a tiling reader, not here.
MAX_PIXELS: int = 100_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

# Never let PIL silently fill a truncated file with grey: truncation is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An input could not be decoded into an RGB image; the message says why."""


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Coerce an array image to ``(H, W, 3) uint8``.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` arrays of dtype uint8,
    uint16 (scaled by 1/257), bool, or float in [0, 1].

    Raises
    ------
    ImageDecodeError
        For other shapes or dtypes.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"expected an (H, W[, 1|3|4]) image array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) // 257).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageDecodeError("float image array contains NaN or infinity")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageDecodeError(f"unsupported image array dtype {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.uint16)
        arr = ((arr[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to ``(H, W, 3) uint8`` (alpha onto black)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16)
        return _array_to_rgb(arr)
    if mode == "I":  # 32-bit signed ints: 16-bit PNG/TIFF data lands here
        arr = np.asarray(im, dtype=np.int64)
        hi = 65535 if arr.max(initial=0) > 255 else 255
        arr = np.clip(arr, 0, hi).astype(np.float64) / hi
        return _array_to_rgb(arr)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max(initial=0.0)) if finite.size else 0.0
        return _array_to_rgb(np.nan_to_num(arr) / (255.0 if hi > 1.0 and hi <= 255.0 else max(hi, 1.0)))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def decode_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file, bytes, PIL image or array into RGB.

    The format is found from the content (magic bytes), not the file name. Multi-frame files
    (TIFF stacks, animated GIF/WebP) give their first frame.

    Parameters
    ----------
    source : path, bytes, PIL.Image.Image or ndarray
        A file path, the encoded bytes of a file, a PIL image, or an ``(H, W[, C])`` array
        (uint8, uint16, bool or float in [0, 1]).
    max_pixels : int, default=MAX_PIXELS
        Largest accepted width x height, in pixels; checked before the pixels are decoded.

    Returns
    -------
    rgb : (H, W, 3) ndarray of uint8
        RGB pixels; transparency composited onto black, 16-bit data scaled to 8 bits.

    Raises
    ------
    ImageDecodeError
        If the input is missing, empty, not an image, truncated or corrupt, or larger than
        ``max_pixels``. The message names the cause.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _check_size_and_convert(source, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageDecodeError("empty input (0 bytes)")
        return _open_and_convert(io.BytesIO(bytes(source)), max_pixels)
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError(f"no such file: {path}") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc}") from None
    if path.is_dir():
        raise ImageDecodeError("is a directory, not an image file")
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            return _open_and_convert(fh, max_pixels)
    except OSError as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"cannot read file: {exc}") from None


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"), (b"GIF8", "GIF"),
)


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def _open_and_convert(fp, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except UnidentifiedImageError:
        fp.seek(0)
        fmt = _sniff(fp.read(16))
        if fmt:
            raise ImageDecodeError(f"corrupt {fmt} file: the header cannot be read") from None
        raise ImageDecodeError("not a recognised image format (content is not PNG/JPEG/WebP/TIFF/BMP/GIF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    with im:
        return _check_size_and_convert(im, max_pixels)


def _check_size_and_convert(im: Image.Image, max_pixels: int) -> np.ndarray:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(f"image too large: {w}x{h} px = {w * h:,} px > limit {max_pixels:,} px")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        return _pil_to_rgb(im)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({im.format or 'unknown'} {w}x{h}): {exc}") from None


def to_rgb_uint8(image: ImageSource) -> np.ndarray:
    """Alias of :func:`decode_image` with default limits, for API inputs."""
    return decode_image(image)
