"""Decode any common image file into an 8-bit RGB array, by content, never by extension.

Every input a user can throw at a batch (PNG, JPEG, WebP, TIFF, BMP, GIF; 16-bit, RGBA,
grayscale, palette, CMYK) becomes a ``(H, W, 3) uint8`` RGB array, and every input that cannot be
read (empty, truncated, corrupt, not an image, absurdly large) raises one exception type,
:class:`ImageDecodeError`, whose message says what is wrong, so that batch code can record a
per-file error and carry on.

Transparent pixels are composited onto black, the background of the NIH cell crops
(Rajaraman et al., PeerJ 2018).

Only regular files are read: a named pipe, socket or device is refused before it is opened
(opening a pipe for reading waits for a writer, forever if none comes).

Each format goes to the cheapest decoder that gives Pillow's pixels exactly (tested on every real
file in ``../shared/data`` and the bundled samples): 8-bit truecolour PNG to libspng (``pyspng``),
baseline/progressive YCbCr or grey JPEG to libjpeg-turbo (``simplejpeg``, whose wheel carries the
library), simple-format lossless WebP to OpenCV; everything else, every failure of a fast decoder,
and installs without these optional packages go through Pillow, so errors and their messages are
Pillow's. Per 130 px NIH PNG cell, on one core: libspng 0.46 ms CPU, OpenCV 0.55 ms, Pillow ~1 ms;
per 1280x960 IML JPEG field, libjpeg-turbo through ``simplejpeg`` 10 ms against Pillow's ~15 ms.

One size limit, ``max_pixels`` (default :data:`MAX_PIXELS`), is checked by :func:`check_image_size`
on the width and height in the file header, before any pixel is decoded, by every decoder. Pillow's
own decompression-bomb guard (warn above ``PIL.Image.MAX_IMAGE_PIXELS``, raise above twice that)
is never the one that decides: its warning turns into an error only under the warnings filters,
which are process-wide state that other threads change, so the same file would be accepted or
rejected by chance. Pillow's limit is therefore raised (never lowered) to at least the
``max_pixels`` in use; an image over it may still make Pillow print its warning, but the refusal
and its message are ours.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import threading
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

try:  # optional fast decoders (see the module docstring); Pillow decodes everything without them
    import pyspng
except ImportError:  # pragma: no cover - an install without the wheel
    pyspng = None
try:
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None
try:
    import cv2
except ImportError:  # pragma: no cover - the torch-free runtime install has no OpenCV
    cv2 = None

__all__ = ["ImageDecodeError", "ImageSource", "PixelBudget", "SizeHook", "check_cell_size", "check_colour", "check_image_size",
           "decode_image", "fast_decoders", "is_image_entry", "open_image_file", "GRAY_SAMPLES", "GRAY_SPREAD", "MAX_PIXELS",
           "MIN_CELL_SIDE", "NON_IMAGE_NAMES", "NON_IMAGE_SUFFIXES"]

#: Largest image accepted, in pixels (width x height). A 1280x960 smear field is 1.2 Mpx;
#: whole-slide tiles beyond 100 Mpx belong in a tiling reader, not here.
MAX_PIXELS: int = 100_000_000

#: Shortest side, in pixels, of an image accepted as one cell crop. The NIH crops here are 40-394 px
#: (median shorter side 124 px); below 8 px no parasite can be resolved, and
#: letterboxing to the model's 64 px would only enlarge a few pixels.
MIN_CELL_SIDE: int = 8

#: Largest spread between a pixel's three channels, in 8-bit levels, of an image taken as grayscale
#: by :func:`check_colour` (a grayscale JPEG saved as RGB keeps a level or two of chroma noise; the
#: pink cells and pale background of a Giemsa-stained image differ by tens of levels).
GRAY_SPREAD: int = 4

#: Pixels :func:`check_colour` looks at, on a regular grid: its cost does not grow with the image.
GRAY_SAMPLES: int = 4096

#: Suffixes (lower case) of files that sit beside images in a folder and are never images: notes,
#: tables, annotations, reports, configuration, archives, arrays, model files, OS metadata.
NON_IMAGE_SUFFIXES: frozenset[str] = frozenset({
    ".txt", ".csv", ".tsv", ".json", ".jsonl", ".md", ".rst", ".html", ".htm", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".log", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".zip", ".gz", ".tar", ".7z", ".npy", ".npz",
    ".pt", ".pth", ".ckpt", ".onnx", ".safetensors", ".skops", ".py", ".sh", ".db", ".ds_store",
})
#: Stems (lower case, any suffix or none) of licence and read-me files shipped beside images.
NON_IMAGE_NAMES: frozenset[str] = frozenset({"license", "licence", "readme", "copying", "notice", "authors", "changelog"})


def is_image_entry(name: str) -> bool:
    """Whether a folder entry called ``name`` is taken for an image when a folder is listed.

    The package's one rule for listing folders (cells for ``predict``/``evaluate``/training,
    :func:`~malaria_screen.data.dataset.list_image_files`; fields for ``smear``, crops for
    ``smear-crops``): every entry whose name does not start with ``"."`` (hidden files, and the
    package's own ``.*.part``/``.*.tmp`` files while they are written) and is not a known non-image
    file, by suffix (:data:`NON_IMAGE_SUFFIXES`) or by name (:data:`NON_IMAGE_NAMES`: ``LICENSE``,
    ``README``, ...), compared case-insensitively. It is not an allow-list of image suffixes,
    because images are decoded by content (:func:`decode_image`; a WebP named ``.png`` is read as
    WebP): a file in another format, or without a suffix, is listed and then decoded or reported
    as that file's error, never dropped silently. Files a user names one by one are taken whatever
    their name; only folder listings use this rule. Nothing is opened.

    On ``../shared/data`` and the bundled samples this takes the same files as the allow-list of
    ``.jpg .jpeg .png .tif .tiff .bmp .webp .gif`` that whole-smear screening used before, in
    every folder (the NIH ``.webp`` crops, the IML and Chula ``.jpg``/``.JPG`` fields; not
    ``annotations.json``, ``README.md``, ``labels/*.txt`` or ``LICENSE``).

    Parameters
    ----------
    name : str
        The entry's file name (no folder part).

    Returns
    -------
    bool
    """
    if not name or name.startswith("."):
        return False
    stem, dot, suffix = name.lower().rpartition(".")
    if not dot:
        stem, suffix = suffix, ""
    return f".{suffix}" not in NON_IMAGE_SUFFIXES and stem not in NON_IMAGE_NAMES


ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

#: Called by a decoder with ``(width, height)`` after the size check and before decoding pixels.
SizeHook = Callable[[int, int], None]

# Never let PIL silently fill a truncated file with grey: truncation is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An input could not be decoded into an RGB image; the message says why."""


def check_image_size(width: int, height: int, *, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image of ``width`` x ``height`` pixels that is empty or over ``max_pixels``.

    The one size check of every decoder, run on the header's size before pixels are decoded,
    so that every path accepts the same images and words its refusal the same way.

    Parameters
    ----------
    width, height : int
        Image size from the file header, in pixels.
    max_pixels : int, default=MAX_PIXELS
        Largest accepted ``width * height``, in pixels.

    Raises
    ------
    ImageDecodeError
        If ``width`` or ``height`` is <= 0, or ``width * height > max_pixels``; the message
        quotes the size and ``max_pixels``.
    """
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: {width}x{height} px = {width * height:,} px > limit {max_pixels:,} px")


def check_cell_size(rgb: np.ndarray, *, min_side: int = MIN_CELL_SIDE) -> np.ndarray:
    """Refuse a decoded image too small to be a cell crop; return it unchanged otherwise.

    Run by every path that classifies users' cell files (``predict``, ``explain``, REST
    ``/v1/classify``, the web app), so that a 1x1 or 3x500 px file gets a per-file error instead
    of a confident call on a few enlarged pixels. The Python API's
    :meth:`~malaria_screen.inference.base.CellClassifierBase.predict` does not check: ``smear``
    classifies its own cell masks through it, and a caller passing arrays decides.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray
        A decoded image.
    min_side : int, default=MIN_CELL_SIDE
        Shortest accepted side, in pixels.

    Returns
    -------
    rgb : the same array

    Raises
    ------
    ImageDecodeError
        If ``min(H, W) < min_side``; the message quotes the size.
    """
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise ImageDecodeError(f"image too small to be a cell crop: {w}x{h} px (needs at least {min_side} px on each side; "
                               f"NIH cell crops are 40-394 px)")
    return rgb


def check_colour(rgb: np.ndarray, *, max_spread: int = GRAY_SPREAD, samples: int = GRAY_SAMPLES) -> np.ndarray:
    """Refuse a decoded image that has no colour (grayscale); return it unchanged otherwise.

    The cell model and the smear's segmentation read the Giemsa stain's colour: a grayscale copy of
    an infected NIH cell that the bundled model scores 0.99 in colour scores 0.01, and a grayscale
    copy of a 3.8 % IML field screens as 0 %. A grayscale file therefore gets a per-file error
    instead of a confident wrong answer. Run by the same paths as :func:`check_cell_size` and by
    ``smear`` / ``smear-eval`` / ``crops`` on field files; :func:`decode_image` itself still
    converts grayscale to RGB.

    Only about ``samples`` pixels are read, on a regular grid offset half a step from the edges
    (cost O(samples), at most about 20 us whatever the image's size: a 25 Mpx black PNG no longer
    costs seconds; the grid's middle row is read first, which settles a stained cell in about
    6 us). A pixel on the grid whose channels spread by more than ``max_spread`` makes the image
    colour. Reading a subset can only turn "colour" into "grayscale", never the reverse, and only
    for an image whose coloured pixels all fall between grid points (a grey image with a small
    coloured mark); on every real image in ``../shared/data`` (20,576 NIH cells, 120 IML and 54
    Chula fields, the 24 bundled samples) and on their grayscale copies, the verdict equals that of
    the full scan (``tests/data/test_colour_check.py``).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        A decoded image.
    max_spread : int, default=GRAY_SPREAD
        A pixel with ``max(R, G, B) - min(R, G, B) > max_spread`` (8-bit levels) is coloured.
    samples : int, default=GRAY_SAMPLES
        About how many pixels are read (all of them for an image of at most ``samples`` pixels).

    Returns
    -------
    rgb : the same array

    Raises
    ------
    ImageDecodeError
        If the image is not ``(H, W, 3)``, or no sampled pixel is coloured (grayscale).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageDecodeError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if h and w:
        step = max(1, math.ceil(math.sqrt(h * w / max(1, samples))))
        # the half-step offset, but inside the image: a strip thinner than half a step (5000 x 1 px)
        # would otherwise leave an empty grid
        grid = rgb[min(step // 2, h - 1) :: step, min(step // 2, w - 1) :: step]
        # the grid's middle row first (a cell's centre is stained): most images stop there, at a
        # third of the cost; the verdict is the whole grid's either way
        if _any_coloured(grid[len(grid) // 2], max_spread) or _any_coloured(grid, max_spread):
            return rgb
    raise ImageDecodeError("image has no colour (grayscale): the classifier reads the Giemsa stain's colours, "
                           "so it needs a colour image")


def _any_coloured(pixels: np.ndarray, max_spread: int) -> bool:
    """Whether any pixel of ``(..., 3) uint8`` spreads over its channels by more than ``max_spread``."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # uint8 arithmetic is safe: max >= min
    return bool((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b) > max_spread).any())


class PixelBudget:
    """Bounds the pixels that threads decode at once, so that memory does not grow with threads.

    ``predict --workers 8`` on a folder of 100 Mpx files would otherwise hold eight decodes of
    0.3-0.7 GB each (RGB(A) buffers) at the same time. A decode first learns its image's size from
    the header (the decoders call their ``on_size`` hook there), then waits until the pixels held
    by other threads plus its own fit in ``max_pixels``; a decode is always admitted when no other
    holds pixels, so any image the size check accepts goes through. Cell crops (about 15,000 px)
    never wait for one another, only for a large image being decoded.

    Parameters
    ----------
    max_pixels : int, default=MAX_PIXELS
        Pixels (width x height) that may be in decoding across all threads at once.

    Examples
    --------
    >>> budget = PixelBudget()
    >>> with budget.session() as on_size:             # doctest: +SKIP
    ...     cell = letterbox(decode_image(path, on_size=on_size), 64)
    """

    def __init__(self, max_pixels: int = MAX_PIXELS) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = max_pixels
        self._cond = threading.Condition()
        self._held = 0
        self._peak = 0

    @property
    def held(self) -> int:
        """Pixels held by open sessions now."""
        with self._cond:
            return self._held

    @property
    def peak(self) -> int:
        """Most pixels held at once since this budget was made."""
        with self._cond:
            return self._peak

    @contextmanager
    def session(self) -> Iterator[SizeHook]:
        """One image's decode and what follows it (letterboxing), until the ``with`` block ends.

        Yields the ``on_size(width, height)`` hook to pass to :func:`decode_image` (or
        :func:`~malaria_screen.inference.base.decode_fast`); it blocks until the pixels fit. A
        session whose hook is called again (a fast decoder falling back to Pillow) holds the
        larger size once. The pixels are released when the block exits, also on an exception.
        """
        mine = 0

        def on_size(width: int, height: int) -> None:
            nonlocal mine
            extra = width * height - mine
            if extra <= 0:
                return
            with self._cond:
                while self._held - mine > 0 and self._held + extra > self.max_pixels:
                    self._cond.wait()
                self._held += extra
                self._peak = max(self._peak, self._held)
                mine += extra

        try:
            yield on_size
        finally:
            if mine:
                with self._cond:
                    self._held -= mine
                    self._cond.notify_all()


_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)


def _check_regular(st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise ImageDecodeError("is a directory, not an image file")
    if not stat.S_ISREG(mode):
        kind = ("named pipe (FIFO)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        raise ImageDecodeError(f"not a regular file: a {kind} is never read")
    if st.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")


def open_image_file(path: str | os.PathLike) -> BinaryIO:
    """Open a regular, non-empty file for binary reading; never blocks on a pipe or device.

    Symbolic links are followed. The file type is checked with :func:`os.stat` before the file is
    opened (a named pipe opened for reading waits for a writer, forever if none comes), and again
    on the open descriptor, which is opened non-blocking, in case the path changed in between.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    fh : binary file object
        Positioned at offset 0; the caller closes it.

    Raises
    ------
    ImageDecodeError
        If ``path`` does not exist, is a broken symbolic link, a directory, not a regular file
        (named pipe, socket, device), empty, or cannot be opened. The message names the cause.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageDecodeError(f"broken symbolic link: {path} points to a missing file") from None
        raise ImageDecodeError(f"no such file: {path}") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc}") from None
    _check_regular(st)
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc}") from None
    try:
        _check_regular(os.fstat(fd))
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Coerce an array image to ``(H, W, 3) uint8``.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` arrays of dtype uint8,
    uint16 (scaled by 1/257), bool, or float in [0, 1].

    Raises
    ------
    ImageDecodeError
        For other shapes or dtypes, and for float arrays with NaN, infinity or values outside
        [0, 1] (a float copy of a 0..255 image must be divided by 255 first).
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
        lo, hi = float(arr.min()), float(arr.max())
        if hi > 1.0:
            raise ImageDecodeError(f"float image array has values up to {hi:g}, but float images must lie in [0, 1]: "
                                   "divide a 0..255 image by 255, or pass it as uint8")
        if lo < 0.0:
            raise ImageDecodeError(f"float image array has values down to {lo:g}, but float images must lie in [0, 1]")
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
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
        arr = np.nan_to_num(arr) / (255.0 if hi > 1.0 and hi <= 255.0 else max(hi, 1.0))
        return _array_to_rgb(np.clip(arr, 0.0, 1.0))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def decode_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, on_size: Optional[SizeHook] = None) -> np.ndarray:
    """Decode an image file, bytes, PIL image or array into RGB.

    The format is found from the content (magic bytes), not the file name. Multi-frame files
    (TIFF stacks, animated GIF/WebP) give their first frame. 8-bit truecolour PNG, YCbCr/grey JPEG
    and lossless WebP are decoded by libspng, libjpeg-turbo and OpenCV when installed
    (:func:`fast_decoders`), with Pillow's pixels; the rest, and any file they fail on, by Pillow.

    Parameters
    ----------
    source : path, bytes, PIL.Image.Image or ndarray
        A path to a regular file (symbolic links followed), the encoded bytes of a file, a PIL
        image, or an ``(H, W[, C])`` array (uint8, uint16, bool, or float in [0, 1]: divide a
        float copy of a 0..255 image by 255).
    max_pixels : int, default=MAX_PIXELS
        Largest accepted width x height, in pixels; checked (:func:`check_image_size`) on the
        header's size before the pixels are decoded. Not applied to arrays, which are decoded
        already.
    on_size : callable, optional
        ``on_size(width, height)``, called after the size check and before the pixels are
        decoded (not for arrays); :meth:`PixelBudget.session` gives one that waits for memory.

    Returns
    -------
    rgb : (H, W, 3) ndarray of uint8
        RGB pixels; transparency composited onto black, 16-bit data scaled to 8 bits.

    Raises
    ------
    ImageDecodeError
        If the input is missing (or a broken symbolic link), a directory, not a regular file
        (named pipe, socket, device), empty, not an image, truncated or corrupt, larger than
        ``max_pixels``, or a float array outside [0, 1]. The message names the cause.
    TypeError
        If ``source`` is none of the accepted types.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _check_size_and_convert(source, max_pixels, on_size)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageDecodeError("empty input (0 bytes)")
        data = bytes(source)
        kind = _fast_kind(data[:16])
        rgb = _decode_fast(kind, data, max_pixels, on_size) if kind is not None else None
        return rgb if rgb is not None else _open_and_convert(io.BytesIO(data), max_pixels, on_size)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot decode a {type(source).__name__}: expected a path, bytes, PIL image or ndarray")
    with open_image_file(source) as fh:
        try:
            head = fh.read(16)
            kind = _fast_kind(head)
            if kind is not None and os.fstat(fh.fileno()).st_size <= _FAST_MAX_BYTES:
                rgb = _decode_fast(kind, head + fh.read(), max_pixels, on_size)
                if rgb is not None:
                    return rgb
            fh.seek(0)
            return _open_and_convert(fh, max_pixels, on_size)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {exc}") from None


#: Files larger than this (bytes) are left to Pillow, which reads them in pieces.
_FAST_MAX_BYTES: int = 64 * 2**20


def fast_decoders() -> dict[str, str]:
    """Which library decodes each format here: ``{"PNG": ..., "JPEG": ..., "WebP": ..., "other": "Pillow"}``.

    PNG: ``"libspng (pyspng)"``, else ``"OpenCV"``, else ``"Pillow"``; JPEG: ``"libjpeg-turbo
    (simplejpeg)"`` else ``"Pillow"``; lossless WebP: ``"OpenCV"`` else ``"Pillow"``. Formats and
    variants outside the fast paths (palette, grey, 16-bit or transparent-key PNG; CMYK JPEG;
    lossy WebP; TIFF, BMP, GIF) always go to Pillow.
    """
    return {"PNG": "libspng (pyspng)" if pyspng is not None else "OpenCV" if cv2 is not None else "Pillow",
            "JPEG": "libjpeg-turbo (simplejpeg)" if simplejpeg is not None else "Pillow",
            "WebP": "OpenCV" if cv2 is not None else "Pillow", "other": "Pillow"}


def _fast_kind(head: bytes) -> str | None:
    """The fast decoder's name for a file starting with ``head`` (16 bytes), or None for Pillow."""
    if head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8L":
        return "webp" if cv2 is not None else None
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png" if pyspng is not None or cv2 is not None else None
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg" if simplejpeg is not None else None
    return None


def _fast_size(kind: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) if a fast decoder gives exactly Pillow's pixels for ``data``, else None.

    Lossless WebP in the simple format (lossless decoding is bit-exact by definition); 8-bit
    truecolour PNG (colour type 2 or 6) with no ``tRNS`` chunk before the image data (zlib and
    the filters are exact; no decoder here applies gamma or ICC profiles); JPEG whose colour space
    is YCbCr or grey (libjpeg-turbo with the default accurate IDCT and fancy upsampling, as
    Pillow's). CMYK/YCCK/RGB-coded JPEG, palette, grey and 16-bit PNG go to Pillow.
    """
    if kind == "webp":
        if len(data) < 25 or data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == "png":
        if len(data) < 33 or data[12:16] != b"IHDR" or data[24] != 8 or data[25] not in (2, 6):
            return None
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        pos = 33  # walk the chunks before IDAT: no tRNS allowed
        while pos + 8 <= len(data):
            n, typ = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
            if typ == b"IDAT":
                return w, h
            if typ == b"tRNS":
                return None
            pos += 12 + n
        return None
    if kind == "jpeg":
        try:
            h, w, colourspace, _sub = simplejpeg.decode_jpeg_header(data)
        except Exception:  # noqa: BLE001 - any header libjpeg-turbo cannot read goes to Pillow
            return None
        return (w, h) if colourspace in ("YCbCr", "Gray") else None
    return None


def _decode_fast(kind: str, data: bytes, max_pixels: int, on_size: Optional[SizeHook]) -> np.ndarray | None:
    """Decode ``data`` with the fast decoder of ``kind``: ``(H, W, 3) uint8``, or None to use Pillow.

    The size check and ``on_size`` come first, as on Pillow's path (their errors propagate); a
    failure of the fast decoder itself returns None, so Pillow decodes the file and words the error.
    """
    wh = _fast_size(kind, data)
    if wh is None:
        return None
    w, h = wh
    check_image_size(w, h, max_pixels=max_pixels)
    if on_size is not None:
        on_size(w, h)
    try:
        if kind == "jpeg":
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: libjpeg warnings raise
        elif kind == "png" and pyspng is not None:
            arr = pyspng.load(data)
        else:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is not None and arr.ndim == 3 and arr.shape[2] in (3, 4):
                arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB if arr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    except Exception:  # noqa: BLE001 - Pillow decodes it again and reports the error
        return None
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[:2] != (h, w) or arr.shape[2] not in (3, 4):
        return None
    return np.ascontiguousarray(arr) if arr.shape[2] == 3 else _array_to_rgb(arr)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"), (b"GIF8", "GIF"),
)


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


_PIL_LIMIT_LOCK = threading.Lock()


def _lift_pillow_limit(max_pixels: int) -> None:
    """Raise ``PIL.Image.MAX_IMAGE_PIXELS`` to at least ``max_pixels``; never lower it.

    So Pillow's guard never fires on an image this module accepts (see the module docstring).
    The value only ever grows, under a lock, so no thread can see it below its ``max_pixels``.
    """
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= max_pixels:
        return
    with _PIL_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _pillow_bomb_error(exc: Exception, max_pixels: int) -> ImageDecodeError:
    """Our message for Pillow's DecompressionBombError (over twice ``max_pixels``)."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)):,} px" if m else "the image"
    return ImageDecodeError(f"image too large: {size} > limit {max_pixels:,} px")


def _open_and_convert(fp, max_pixels: int, on_size: Optional[SizeHook] = None) -> np.ndarray:
    _lift_pillow_limit(max_pixels)
    try:
        im = Image.open(fp)
    except UnidentifiedImageError:
        fp.seek(0)
        fmt = _sniff(fp.read(16))
        if fmt:
            raise ImageDecodeError(f"corrupt {fmt} file: the header cannot be read") from None
        raise ImageDecodeError("not a recognised image format (content is not PNG/JPEG/WebP/TIFF/BMP/GIF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pillow_bomb_error(exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    with im:
        return _check_size_and_convert(im, max_pixels, on_size)


def _check_size_and_convert(im: Image.Image, max_pixels: int, on_size: Optional[SizeHook] = None) -> np.ndarray:
    w, h = im.size
    check_image_size(w, h, max_pixels=max_pixels)
    if on_size is not None:
        on_size(w, h)
    try:
        # the first frame of a multi-frame file; never ``im.n_frames``, which walks every frame
        # (1.4 s for a GIF of 550,000 one-pixel frames in 8 MB)
        if im.tell() != 0:
            im.seek(0)
        im.load()
        return _pil_to_rgb(im)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a frame or tile beyond the header's size
        raise _pillow_bomb_error(exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({im.format or 'unknown'} {w}x{h}): {exc}") from None
