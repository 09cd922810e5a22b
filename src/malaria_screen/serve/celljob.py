"""One ``/v1/classify`` decode job: encoded cell images in, letterboxed model inputs out, within
the request's pixel and CPU budgets.

Run on a light-lane thread for light requests, and inside a heavy-lane worker process
(:mod:`malaria_screen.serve.jobs`) for the others, where the kernel also bounds the job's CPU
time and memory. Each image's outcome is handed to ``emit`` as soon as it is known, so that a
worker ended mid-job (its CPU or memory budget, or a departed client) loses only the images it
had not finished.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from malaria_screen.data.io import ImageDecodeError
from malaria_screen.data.parallel import prepare_cell
from malaria_screen.inference.base import prepare_or_error

__all__ = ["PEEK_BYTES", "PEEK_SECONDS", "Emit", "Item", "is_light", "prepare_cells"]

#: One image of a request: ``(encoded bytes, None)``, or ``(None, why it is not decoded)``.
Item = tuple[Optional[bytes], Optional[str]]
#: ``emit(index, cell, error)``: ``cell`` a ``(S, S, 3) uint8`` array, or None with the reason.
Emit = Callable[[int, Optional[np.ndarray], Optional[str]], None]

#: Bytes of a file read to learn its size for the light/heavy choice.
PEEK_BYTES = 64 * 1024
#: CPU time (of the calling thread) the light/heavy choice may take for one request (a JPEG of
#: 64 KB of empty markers takes Pillow ~30 ms to parse); past it, the request counts as heavy
#: and goes to a worker process. CPU time, not wall-clock time: a thread that waits for the CPU
#: or the GIL on a busy machine must not send a normal request to the heavy lane.
PEEK_SECONDS = 0.05


def _header_pixels(data: bytes) -> int | None:
    """Width x height from the header in an image's first :data:`PEEK_BYTES` bytes (no pixel
    decoded); None when the size is not there, or for a progressive JPEG: its cost is not bounded
    by its size (a 100 KB file of thousands of tiny scans, each a pass over every block, took 15 s
    of CPU at 1400 x 1400 px), so it goes to the heavy lane, whose workers have a CPU limit."""
    try:
        with Image.open(io.BytesIO(bytes(data[:PEEK_BYTES]))) as im:
            if im.format == "JPEG" and im.info.get("progressive"):
                return None
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - unknown size: heavy; the decode reports the real error
        return None


def is_light(items: Sequence[Item], max_pixels: int, *, max_seconds: float = PEEK_SECONDS) -> bool:
    """Whether a request's images hold at most ``max_pixels`` pixels in all, from their headers.

    Parameters
    ----------
    items : sequence of Item
        Images already refused (``(None, reason)``) are not counted.
    max_pixels : int
        The light lane's bound (``ServeLimits.light_request_pixels``).
    max_seconds : float, default=PEEK_SECONDS
        CPU time of the calling thread (:func:`time.thread_time`) allowed for reading the
        headers (Pillow's parsers); past it: heavy.

    Returns
    -------
    bool
        False as soon as the sum passes ``max_pixels``, an image's size cannot be read from its
        first :data:`PEEK_BYTES` bytes, an image is a progressive JPEG (its decoding cost is not
        bounded by its size), or the headers take longer than ``max_seconds``.
    """
    t_end = time.thread_time() + max_seconds
    total = 0
    for data, err in items:
        if err is not None:
            continue
        px = _header_pixels(data)
        if px is None or time.thread_time() > t_end:
            return False
        total += px
        if total > max_pixels:
            return False
    return True


def prepare_cells(items: Sequence[Item], size_px: int, *, max_pixels: int, max_request_pixels: int, cpu_s: float,
                  clock: Callable[[], float], emit: Emit, cancel: Optional[threading.Event] = None) -> None:
    """Decode, check and letterbox a request's images in order, within its budgets.

    Parameters
    ----------
    items : sequence of Item
    size_px : int
        The model's input side, pixels (:func:`~malaria_screen.data.parallel.prepare_cell`).
    max_pixels : int
        Largest image, width x height, read from the header before decoding.
    max_request_pixels : int
        Pixels decoded for the whole request; the images past it are not decoded.
    cpu_s : float
        CPU seconds for the whole request, measured with ``clock`` between images; the images
        after it is spent are not decoded.
    clock : callable
        CPU clock of the job, seconds: :func:`time.thread_time` on a thread,
        :func:`time.process_time` in a worker process.
    emit : Emit
        Called once per item, in order.
    cancel : threading.Event, optional
        Set when the client has left: the remaining items are emitted as ``"cancelled"``.
    """
    t0 = clock()
    spent = {"px": 0}

    def on_size(w: int, h: int) -> None:
        spent["px"] += w * h
        if spent["px"] > max_request_pixels:
            raise ImageDecodeError(f"not decoded: the request's pixel budget ({max_request_pixels:,} px in all "
                                   f"images) is spent")

    def prepare(data: bytes) -> np.ndarray:
        try:
            return prepare_cell(data, size_px, max_pixels=max_pixels, on_size=on_size)
        except MemoryError:  # under the worker's RLIMIT_AS: this image fails, the next one is tried
            raise ImageDecodeError("not decoded: decoding this image needs more memory than the per-request limit") from None

    for i, (data, err) in enumerate(items):
        if err is not None:
            emit(i, None, err)
        elif cancel is not None and cancel.is_set():  # the client left: nobody reads the rest
            emit(i, None, "cancelled")
        elif clock() - t0 > cpu_s:
            emit(i, None, f"not decoded: the request's CPU budget ({cpu_s:g} s) is spent")
        else:
            emit(i, *prepare_or_error(prepare, data))
