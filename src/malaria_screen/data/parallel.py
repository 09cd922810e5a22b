"""Prepare cell files in worker processes, so that every core decodes.

``predict`` on thousands of cell files spends its time decoding (libspng: about 0.46 ms of CPU per
130 px NIH PNG), checking colour and letterboxing; inference of the int8 model costs about a tenth
of that. Threads cannot keep two cores busy with this mix, because the Python between the C calls
(opening the file, sniffing the header, numpy glue) holds the GIL; worker processes can. Each
worker takes a chunk of paths and returns the letterboxed ``(k, S, S, 3) uint8`` cells (12 KiB
each at 64 px) and one error message per failed file, so the parent only stacks and infers.

Memory stays bounded: a worker decodes one file at a time, and a file whose header says it is
larger than ``defer_above`` pixels (default :data:`WORKER_MAX_PIXELS`) is not decoded by the
worker but handed back, for the parent to decode under its
:class:`~malaria_screen.data.io.PixelBudget`. So ``workers`` processes hold at most
``workers * WORKER_MAX_PIXELS`` pixels besides the parent's budget, however large the files.

Workers are started by the ``forkserver`` method where the platform has it (a clean server process
that has imported this module once, then forks cheaply; never a fork of a parent that already runs
ONNX Runtime or torch threads), else ``spawn``. They ignore SIGINT: Ctrl-C stops the parent, which
shuts the pool down.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

try:  # POSIX only; process_context falls back to spawn elsewhere
    import multiprocessing.forkserver as _forkserver
except ImportError:  # pragma: no cover - Windows
    _forkserver = None

from malaria_screen.data.io import (
    MAX_PIXELS,
    ImageDecodeError,
    ImageSource,
    SizeHook,
    check_cell_size,
    check_colour,
    decode_image,
)
from malaria_screen.data.preprocess import letterbox
from malaria_screen.errors import error_text

try:
    import cv2
except ImportError:  # pragma: no cover - the torch-free runtime install has no OpenCV
    cv2 = None

__all__ = ["CLASSIFY_CHUNK", "WORKER_MAX_PIXELS", "classify_cell_files", "decode_cell", "decode_files", "default_workers", "init_classifier_worker",
           "init_worker", "iter_classified_cells", "iter_prepared_cells", "prepare_cell", "prepare_cell_files", "process_context",
           "start_fork_server"]

#: Largest image (width x height, pixels) a worker process decodes itself; larger files go back to
#: the parent. 4 Mpx is 20x the largest NIH crop (394x385) and holds a 1280x960 field 3 times.
WORKER_MAX_PIXELS: int = 4_000_000


def default_workers() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere), >= 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def decode_cell(image: ImageSource, *, max_pixels: int = MAX_PIXELS, on_size: Optional[SizeHook] = None) -> np.ndarray:
    """Decode a user's cell image and refuse a too small or grayscale one.

    :func:`~malaria_screen.data.io.decode_image`, then
    :func:`~malaria_screen.data.io.check_cell_size` and :func:`~malaria_screen.data.io.check_colour`:
    what every path that classifies users' cells (``predict``, ``explain``, REST ``/v1/classify``,
    the web app) accepts.

    Parameters
    ----------
    image : path, bytes, PIL image or ndarray
    max_pixels : int, default=MAX_PIXELS
    on_size : callable, optional
        Passed to :func:`~malaria_screen.data.io.decode_image`.

    Returns
    -------
    rgb : (H, W, 3) ndarray of uint8

    Raises
    ------
    ImageDecodeError
        If the file cannot be decoded, is too small to be a cell crop, or is grayscale.
    """
    return check_colour(check_cell_size(decode_image(image, max_pixels=max_pixels, on_size=on_size)))


def prepare_cell(image: ImageSource, size_px: int, *, max_pixels: int = MAX_PIXELS,
                 on_size: Optional[SizeHook] = None) -> np.ndarray:
    """:func:`decode_cell`, then :func:`~malaria_screen.data.preprocess.letterbox` to ``size_px``:
    a ``(size_px, size_px, 3)`` uint8 model input (``predict``, REST ``/v1/classify``).

    ``image``, ``max_pixels`` and ``on_size`` are :func:`decode_cell`'s, and so is the
    ``ImageDecodeError`` it raises.
    """
    return letterbox(decode_cell(image, max_pixels=max_pixels, on_size=on_size), size_px)


class _Deferred(Exception):
    """Raised by a worker's size hook: the file is larger than the worker may decode."""


def _deferring_hook(limit: int) -> SizeHook:
    def on_size(width: int, height: int) -> None:
        if width * height > limit:
            raise _Deferred
    return on_size


def prepare_cell_files(paths: Sequence[str], size_px: int, *, max_pixels: int = MAX_PIXELS,
                       defer_above: int = WORKER_MAX_PIXELS) -> tuple[np.ndarray, list[Optional[str]], list[int]]:
    """Prepare a chunk of cell files (:func:`prepare_cell`): the task of one worker process.

    Parameters
    ----------
    paths : sequence of str
    size_px : int
    max_pixels : int, default=MAX_PIXELS
        The size limit of :func:`~malaria_screen.data.io.decode_image`.
    defer_above : int, default=WORKER_MAX_PIXELS
        A file larger than this (pixels, from its header) is not decoded but listed in
        ``deferred``, for the caller to decode under its own memory budget.

    Returns
    -------
    cells : (k, size_px, size_px, 3) ndarray of uint8
        The prepared cells of the files that succeeded, in the order of ``paths``.
    errors : list of (str or None), one per path
        None for a prepared (or deferred) file, else why it failed.
    deferred : list of int
        Indices into ``paths`` of the files left to the caller.
    """
    hook = _deferring_hook(defer_above)
    cells: list[np.ndarray] = []
    errors: list[Optional[str]] = []
    deferred: list[int] = []
    for i, p in enumerate(paths):
        try:
            cells.append(prepare_cell(p, size_px, max_pixels=max_pixels, on_size=hook))
            errors.append(None)
        except _Deferred:
            deferred.append(i)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - never lose the chunk to one odd file
            errors.append(error_text(exc, plain=ImageDecodeError))
    out = np.stack(cells) if cells else np.zeros((0, size_px, size_px, 3), np.uint8)
    return out, errors, deferred


def decode_files(paths: Sequence[str]) -> list[Optional[tuple[int, int]]]:
    """Decode files and keep only their sizes: ``(H, W)`` per path, None for a failure.

    The decode-only work of :func:`prepare_cell_files`, for benchmarks to measure the decoding
    ceiling in worker processes (nothing but two integers per file comes back)."""
    out: list[Optional[tuple[int, int]]] = []
    for p in paths:
        try:
            out.append(decode_image(p).shape[:2])
        except Exception:  # noqa: BLE001
            out.append(None)
    return out


def init_worker() -> None:
    """Set up a worker process: ignore SIGINT, one OpenCV thread (``initializer`` of the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    if cv2 is not None:
        cv2.setNumThreads(1)  # one core per worker: letterboxing must not start its own threads


def process_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """The start method for worker processes: ``forkserver`` (preloading this module) where
    available, else ``spawn``; never ``fork`` (the parent may already run ONNX Runtime or torch
    threads, whose locks a forked child would inherit held).

    ``preload`` names more modules for the fork server to import before it forks the first
    worker, so that workers start with them imported instead of each importing them again (the
    torch cell model's module costs about 1.5 s of CPU to import). The fork server is started once
    per process, by the first pool: a later pool's ``preload`` only applies if it comes first.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, *(m for m in preload if m != "__main__")])  # never re-run a script
        return ctx
    return multiprocessing.get_context("spawn")  # pragma: no cover - Windows


def start_fork_server(preload: Sequence[str] = ()) -> None:
    """Start the worker fork server now, importing ``preload`` (see :func:`process_context`).

    Its imports then run on another core while this process does its own start-up (loading a
    model: ~2 s of torch imports on each side), instead of after it, when the first pool starts.
    A no-op where the start method is not ``forkserver`` or the server already runs.
    """
    ctx = process_context(preload)
    if ctx.get_start_method() == "forkserver" and _forkserver is not None:
        _forkserver.ensure_running()


def _in_order(pool: ProcessPoolExecutor, task_fn: Callable, tasks: list[list[str]], size_px: int, max_pixels: int, *,
              local: Callable[[str], object], ahead: int) -> Iterator[tuple[Optional[object], Optional[str]]]:
    """Run ``task_fn(task, size_px, max_pixels=...) -> (rows, errors, deferred)`` for every task in
    ``pool``, at most ``ahead`` queued, and yield one ``(row, error)`` per path in order: a worker's
    row, its error, or ``local(path)``'s for a deferred file and for every file from the task a
    worker died on (the pool is broken: this process does the rest). Shuts the pool down."""
    futures: dict[int, Future] = {}
    broken = False

    def submit(ti: int) -> bool:  # False once the pool is broken: a worker died (a crash, the OOM killer)
        try:
            futures[ti] = pool.submit(task_fn, tasks[ti], size_px, max_pixels=max_pixels)
        except BrokenProcessPool:
            return False
        return True

    try:
        for ti in range(min(ahead, len(tasks))):
            if not submit(ti):
                broken = True
                break
        for ti, task in enumerate(tasks):
            result = None
            if not broken:
                try:
                    result = futures.pop(ti).result()
                except BrokenProcessPool:
                    broken = True
            if not broken and ti + ahead < len(tasks) and not submit(ti + ahead):
                broken = True  # this task's rows stand; the rest is done here
            if result is None:
                yield from (_run_local(local, p) for p in task)
                continue
            rows, errors, deferred = result
            k = 0
            for i, p in enumerate(task):
                if i in deferred:
                    yield _run_local(local, p)
                elif errors[i] is None:
                    yield rows[k], None
                    k += 1
                else:
                    yield None, errors[i]
    finally:
        pool.shutdown(wait=not broken, cancel_futures=True)


def _run_local(local: Callable[[str], object], p: str) -> tuple[Optional[object], Optional[str]]:
    try:
        return local(p), None
    except Exception as exc:  # noqa: BLE001 - never lose the chunk to one odd file
        return None, error_text(exc, plain=ImageDecodeError)


def _chunks(paths: Sequence[str], workers: int, chunk: int) -> list[list[str]]:
    if workers < 1 or chunk < 1:
        raise ValueError(f"workers and chunk must be >= 1, got workers={workers}, chunk={chunk}")
    return [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]


def iter_prepared_cells(paths: Sequence[str], size_px: int, *, workers: int, local: Callable[[str], np.ndarray],
                        chunk: int = 32, max_pixels: int = MAX_PIXELS) -> Iterator[tuple[Optional[np.ndarray], Optional[str]]]:
    """Prepare cell files in ``workers`` processes; yield one ``(cell, error)`` per path, in order.

    Parameters
    ----------
    paths : sequence of str
    size_px : int
    workers : int
        Worker processes (>= 1).
    local : callable
        ``local(path) -> (S, S, 3) uint8``, run in this process for the files a worker defers
        (over :data:`WORKER_MAX_PIXELS`) and, if a worker process dies (a crash in a native
        decoder, the OOM killer), for every file not prepared yet; its exceptions become errors.
    chunk : int, default=32
        Files per task sent to a worker.
    max_pixels : int, default=MAX_PIXELS

    Yields
    ------
    cell : (S, S, 3) ndarray of uint8, or None
    error : str or None
        Why the file failed (``cell`` is None then).

    Raises
    ------
    ValueError
        If ``workers`` or ``chunk`` is < 1.
    """
    tasks = _chunks(paths, workers, chunk)
    if not tasks:
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=process_context(), initializer=init_worker)
    yield from _in_order(pool, prepare_cell_files, tasks, size_px, max_pixels, local=local, ahead=4 * workers)


#: Files per task of :func:`iter_classified_cells` (and per inference batch in a worker) by default:
#: of 64, 128 and 256, 128 gave the most cells/s on 4,096 NIH PNG cells on 2 cores, and the int8
#: model's CPU per cell is lower at batch 128 than at 256 (0.083 against 0.104 ms, one thread).
CLASSIFY_CHUNK: int = 128

#: The classifier of a worker process started by :func:`iter_classified_cells` (set by its initializer).
_worker_classifier = None


def init_classifier_worker(classifier) -> None:
    """:func:`init_worker`, and keep ``classifier`` (unpickled once per worker) for
    :func:`classify_cell_files` (``initializer`` of :func:`iter_classified_cells`' pool)."""
    global _worker_classifier
    init_worker()
    _worker_classifier = classifier


def classify_cell_files(paths: Sequence[str], size_px: int, *, max_pixels: int = MAX_PIXELS,
                        defer_above: int = WORKER_MAX_PIXELS) -> tuple[np.ndarray, list[Optional[str]], list[int]]:
    """Prepare a chunk of cell files (:func:`prepare_cell_files`) and classify them with the
    worker's classifier (:func:`init_classifier_worker`): the task of one worker process.

    Returns
    -------
    probs : (k, num_classes) ndarray of float32
        The class probabilities of the files that succeeded, in the order of ``paths``.
    errors, deferred
        As :func:`prepare_cell_files`; if inference fails, every prepared file's error is
        ``"inference failed: ..."`` and ``probs`` is empty.
    """
    cells, errors, deferred = prepare_cell_files(paths, size_px, max_pixels=max_pixels, defer_above=defer_above)
    empty = np.zeros((0, len(_worker_classifier.class_names)), np.float32)
    if len(cells) == 0:
        return empty, errors, deferred
    try:
        probs = np.asarray(_worker_classifier.predict_proba_prepared(cells), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - an inference failure fails this chunk's cells, not the run
        err = f"inference failed: {error_text(exc)}"
        skip = set(deferred)
        return empty, [err if (i not in skip and e is None) else e for i, e in enumerate(errors)], deferred
    return probs, errors, deferred


def iter_classified_cells(paths: Sequence[str], size_px: int, *, workers: int, classifier,
                          local: Callable[[str], np.ndarray], chunk: int = CLASSIFY_CHUNK,
                          max_pixels: int = MAX_PIXELS) -> Iterator[tuple[Optional[np.ndarray], Optional[str]]]:
    """Prepare **and classify** cell files in ``workers`` processes; yield one ``(probs, error)``
    per path, in order.

    Each worker receives ``classifier`` once (pickled; an ONNX model travels as its file's bytes)
    and classifies the cells of its own chunks, so only ``num_classes`` floats per cell come back
    instead of the ``(S, S, 3)`` cell, and this process does almost nothing but collect: on 2 cores
    6-9 % more cells/s than decoding in the workers and classifying here, about the same total CPU
    (``benchmarks/bench_predict.py``, twenty-fourth stop). The answers are the classifier's own:
    it must give the same probabilities in a worker as here (one intra-op thread per worker).

    Parameters
    ----------
    paths : sequence of str
    size_px : int
    workers : int
        Worker processes (>= 1).
    classifier : picklable object with ``predict_proba_prepared(cells) -> (N, C) float32`` and ``class_names``
    local : callable
        ``local(path) -> (C,) float32`` probabilities, run in this process for the files a worker
        defers (over :data:`WORKER_MAX_PIXELS`) and, if a worker dies, for every file not done
        yet; its exceptions become errors.
    chunk : int, default=CLASSIFY_CHUNK
        Files per task (and per inference batch in a worker).
    max_pixels : int, default=MAX_PIXELS

    Yields
    ------
    probs : (C,) ndarray of float32, or None
    error : str or None
        Why the file failed (``probs`` is None then).

    Raises
    ------
    ValueError
        If ``workers`` or ``chunk`` is < 1.
    """
    tasks = _chunks(paths, workers, chunk)
    if not tasks:
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=process_context([type(classifier).__module__]),
                               initializer=init_classifier_worker, initargs=(classifier,))
    yield from _in_order(pool, classify_cell_files, tasks, size_px, max_pixels, local=local, ahead=8 * workers)
