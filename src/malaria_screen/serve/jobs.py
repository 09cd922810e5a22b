"""Bounded job queues of the REST API: a thread lane for light cell requests, worker processes
for everything heavy.

Every decode or screening job enters a queue with a fixed number of workers and a fixed number
of waiting places; a job that finds them all taken is refused at once with :class:`QueueFull`
(503 with ``Retry-After``), so hostile load can fill a queue but never the server's memory, and
never the event loop, which keeps answering ``/healthz`` and ``/readyz``.

:class:`Lane`
    A thread pool with a bounded queue, for work that takes milliseconds (light cell requests,
    classifying decoded cells). The job gets a :class:`threading.Event` that is set when the
    client leaves; jobs check it between images.
:class:`ProcessLane`
    Worker processes (``spawn``) for heavy work: ``"field"`` workers load the model once and
    screen ``/v1/field`` images; ``"cells"`` workers decode the cell images of heavy
    ``/v1/classify`` requests (no model). Heavy work runs in processes, not threads, because
    decoders such as libspng hold the GIL for a whole image (about 0.2 s for a black 25 Mpx PNG),
    which would stall the event loop and the light lane however low the thread's priority. A
    job's CPU seconds are bounded by ``RLIMIT_CPU`` (the kernel ends the worker with ``SIGXCPU``
    when they are spent) and its memory by ``RLIMIT_AS``; a job whose client leaves, or that
    overruns its wall-clock time, is ended by killing its worker. A dead or worn worker
    (``jobs_per_worker`` jobs) is replaced, so the server's memory cannot creep under load.
    Workers run at niceness +10 from their start (imports included), so the server process
    wins the CPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Optional

__all__ = ["ClientGone", "JobFailed", "Lane", "ProcessLane", "QueueFull", "WorkerSpec", "until_disconnect"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """All workers and waiting places of a queue are taken; ``retry_after`` in seconds."""

    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(f"the {name} queue is full; retry in {retry_after} s")
        self.name, self.retry_after = name, retry_after


class ClientGone(Exception):
    """The client disconnected before its job finished; the job was dropped or ended."""


class JobFailed(Exception):
    """A job that ended without a result; ``status`` (HTTP) and ``detail`` say why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def until_disconnect(receive: Callable) -> None:
    """Return when the client has gone (``http.disconnect``), after its body was read.

    Parameters
    ----------
    receive : ASGI receive callable
        The request's (``request.receive``); once the body is consumed, the server answers it
        only when the client disconnects or the response is complete.
    """
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that repeats empty body messages must not spin the loop


async def _race(work: "asyncio.Future", receive: Optional[Callable], timeout: Optional[float]):
    """Await ``work``; raise :class:`ClientGone` if the client leaves first,
    :class:`TimeoutError` if ``timeout`` passes first."""
    watch = asyncio.ensure_future(until_disconnect(receive)) if receive is not None else None
    try:
        done, _ = await asyncio.wait({work} | ({watch} if watch else set()), timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        if watch is not None and watch in done:
            raise ClientGone
        raise TimeoutError
    finally:
        if watch is not None:
            watch.cancel()


#: Niceness added to worker processes: the server (probes, light requests) wins the CPU.
WORKER_NICE = 10


def _renice(pid: int, nice: int) -> None:
    """Set process ``pid``'s niceness to the calling thread's plus ``nice`` (Linux: a process's
    threads started later inherit it)."""
    if hasattr(os, "setpriority"):
        try:
            own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, pid, min(own + nice, 19))
        except OSError:
            pass


class _Admission:
    """Admission bookkeeping shared by :class:`Lane` and :class:`FieldWorkers`: jobs running or
    waiting, the bound ``workers + max_queue``, and a running mean job time for ``Retry-After``."""

    workers: int
    max_queue: int
    _pending: int
    _seconds: float  # running mean job time, s

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    @property
    def full(self) -> bool:
        return self._pending >= self.workers + self.max_queue

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds * (1 + self._pending / self.workers)))

    def _admit(self, name: str) -> float:
        """Count a new job in (or raise :class:`QueueFull`); returns its start time (monotonic s)."""
        if self.full:
            raise QueueFull(name, self.retry_after())
        self._pending += 1
        return time.monotonic()

    def _release(self, t0: float) -> None:
        """Count a job out and fold its time into the running mean."""
        self._pending -= 1
        self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - t0)


class Lane(_Admission):
    """A bounded job queue on its own threads.

    Heavy jobs do not belong here: a thread that holds the GIL (a decoder in C) stalls the
    event loop whatever its niceness. They go to a :class:`ProcessLane`.

    Parameters
    ----------
    name : str
        Named in the 503 message.
    workers : int
        Threads running jobs.
    max_queue : int
        Jobs that may wait for a thread; one more raises :class:`QueueFull`.
    """

    def __init__(self, name: str, workers: int, max_queue: int) -> None:
        self.name, self.workers, self.max_queue = name, workers, max_queue
        self._pool: Optional[ThreadPoolExecutor] = None  # made on first use; again after close()
        self._pending = 0
        self._seconds = 1.0  # running mean job time, for Retry-After

    async def run(self, fn: Callable[..., Any], *args, receive: Optional[Callable] = None) -> Any:
        """Run ``fn(cancel, *args)`` on a lane thread; ``cancel`` is set when the client leaves.

        Raises
        ------
        QueueFull
            If all threads and waiting places are taken.
        ClientGone
            If the client disconnected (``receive`` given); a job not started is dropped.
        """
        t0 = self._admit(self.name)
        cancel = threading.Event()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"malaria-screen-{self.name}")
        fut = asyncio.wrap_future(self._pool.submit(fn, cancel, *args))
        try:
            return await _race(fut, receive, None)
        except BaseException:
            cancel.set()
            fut.cancel()
            raise
        finally:
            self._release(t0)

    def close(self) -> None:
        """Stop the threads once their jobs end; a later :meth:`run` starts new ones."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process does, and its budgets.

    Attributes
    ----------
    task : str
        ``"field"``: load the cell model (and rescorer) and screen whole fields
        (:func:`~malaria_screen.serve.fieldjob.screen_field_bytes`); ``"cells"``: decode cell
        images into model inputs (:func:`~malaria_screen.serve.celljob.prepare_cells`), no model.
    max_pixels : int
        Largest image, width x height.
    cpu_s : float
        CPU seconds per job (``RLIMIT_CPU``; ``"cells"`` also checks it between images).
    memory_bytes : int
        Address space a job may add to the loaded worker (``RLIMIT_AS``); 0: no limit.
    model : str, default=""
        ``"field"``: run folder or ``.onnx`` file (the predictor's ``source``).
    backend : str, default=""
        ``"field"``: ``"torch"`` or ``"onnx"``, as in the server.
    rescorer : str, optional
        ``"field"``: rescorer file (``CellRescorer.load``).
    input_size : int, default=0
        ``"cells"``: the model's input side, pixels.
    max_request_pixels : int, default=0
        ``"cells"``: pixels decoded per job, all images together.
    """

    task: str
    max_pixels: int
    cpu_s: float
    memory_bytes: int
    model: str = ""
    backend: str = ""
    rescorer: Optional[str] = None
    input_size: int = 0
    max_request_pixels: int = 0


def _vm_size() -> int:
    """This process's virtual memory size, bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (Python's, OpenCV's or C++'s) under ``RLIMIT_AS``."""
    msg = str(exc)
    return isinstance(exc, MemoryError) or "Insufficient memory" in msg or "bad_alloc" in msg or "Cannot allocate" in msg


def _set_process_name(name: str) -> None:
    """Name this process in ``ps``/``top`` (``/proc/PID/comm``, Linux ``prctl``; at most 15 bytes)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError, TypeError):
        pass


#: What a worker's handler returns for one job: ``("ok", result)``, ``("refused", status, detail)``
#: or ``("error", text)``; items of a ``"cells"`` job go out before it as ``("item", i, cell, error)``.
Handler = Callable[[Any, Callable[..., None]], tuple]


def _field_task(spec: WorkerSpec) -> Handler:
    """Load the model (and rescorer, and the self-check's reference) once; the field handler."""
    from malaria_screen.inference import load_model
    from malaria_screen.serve.fieldjob import FieldRefused, json_bytes, screen_field_bytes

    kw = {"num_threads": 1} if spec.backend == "onnx" else {}
    if spec.backend != "onnx":
        import torch

        torch.set_num_threads(1)
    predictor = load_model(spec.model, backend=spec.backend, **kw)
    rescorer = None
    if spec.rescorer:
        from malaria_screen.smear.rescore import CellRescorer

        rescorer = CellRescorer.load(spec.rescorer)
    import malaria_screen.smear.report  # noqa: F401 - loaded now, not in the first job's budget
    from malaria_screen.smear.domain import load_reference

    reference = load_reference(predictor)  # the self-check's reference beside the model (or None)

    def handle(job: tuple, emit: Callable[..., None]) -> tuple:
        data, name, options, extra = job
        try:
            out = screen_field_bytes(data, predictor, name=name, max_pixels=spec.max_pixels, **options,
                                     rescorer=rescorer, domain_reference=reference)
        except FieldRefused as exc:
            return ("refused", exc.status, exc.detail)
        return ("ok", json_bytes(out | extra))  # encoded here, not on the server's event loop

    return handle


def _cells_task(spec: WorkerSpec) -> Handler:
    """The cell decoder (no model); the handler of a heavy ``/v1/classify`` request's images."""
    from malaria_screen.serve.celljob import prepare_cells

    def handle(items: list, emit: Callable[..., None]) -> tuple:
        prepare_cells(items, spec.input_size, max_pixels=spec.max_pixels, max_request_pixels=spec.max_request_pixels,
                      cpu_s=spec.cpu_s, clock=time.process_time, emit=emit)
        return ("ok", None)

    return handle


_TASKS: dict[str, Callable[[WorkerSpec], Handler]] = {"field": _field_task, "cells": _cells_task}


def _worker_main(conn, spec: WorkerSpec) -> None:
    """Worker process: set up the task once, then run jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which ends us
    _set_process_name(f"malaria-{spec.task}")
    try:  # imported in the worker process, inside the try: a failure is reported to the server
        handle = _TASKS[spec.task](spec)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which logs it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if spec.memory_bytes and hasattr(resource, "RLIMIT_AS"):
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = _vm_size() + spec.memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    conn.send(("ready", os.getpid()))

    def emit(*item) -> None:
        conn.send(("item", *item))

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = used.ru_utime + used.ru_stime
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = math.ceil(spent + spec.cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        try:
            out = handle(job, emit)
        except Exception as exc:  # noqa: BLE001 - a bug (500; the worker carries on) or out of memory
            out = ("oom",) if _out_of_memory(exc) else ("error", f"{type(exc).__name__}: {exc}")
        del job
        conn.send(out)
        if out[0] == "oom":
            return  # a fresh worker replaces this one


class _Worker:
    __slots__ = ("proc", "conn", "jobs")

    def __init__(self, proc, conn) -> None:
        self.proc, self.conn, self.jobs = proc, conn, 0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class ProcessLane(_Admission):
    """Worker processes with a bounded queue and per-job CPU/memory budgets.

    All waiting happens on this object's own I/O threads (never on the event loop, and with no
    asyncio object bound to one loop), one per pending job, so the number of threads is bounded
    by ``2 * workers + max_queue + 1``.

    Parameters
    ----------
    name : str
        Named in the 503 message.
    spec : WorkerSpec
        The workers' task and budgets.
    workers : int
        Worker processes.
    max_queue : int
        Jobs that may wait for a worker; one more raises :class:`QueueFull`.
    jobs_per_worker : int
        A worker is replaced after this many jobs.
    what : str, default="this job"
        What a job does, for the messages of :class:`JobFailed` (e.g. "screening this field").
    """

    def __init__(self, name: str, spec: WorkerSpec, workers: int, max_queue: int, jobs_per_worker: int, *,
                 what: str = "this job") -> None:
        self.name, self.spec, self.workers, self.max_queue = name, spec, workers, max_queue
        self.jobs_per_worker, self.what = jobs_per_worker, what
        self._ctx = mp.get_context("spawn")
        self._io = self._new_io()
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._pending = 0
        self._starting = 0
        self._started = False
        self._closed = False
        self._seconds = 2.0
        self.last_error: Optional[str] = None

    # -- life cycle -------------------------------------------------------------------------------
    def _new_io(self) -> ThreadPoolExecutor:
        # one thread per pending job, one per worker being started
        return ThreadPoolExecutor(2 * self.workers + self.max_queue + 1, thread_name_prefix=f"malaria-screen-{self.name}")

    def _spawn(self) -> None:
        """Start one worker and wait for it to be ready (blocking; on an I/O thread)."""
        try:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True,
                                     name=f"malaria-screen-{self.name}")
            proc.start()
            _renice(proc.pid, WORKER_NICE)  # now, while it still imports, not once it runs our code
            child.close()
            w = _Worker(proc, parent)
            try:
                msg = parent.recv() if parent.poll(300) else ("error", "the worker did not start in 300 s")
            except (EOFError, OSError):
                msg = ("error", f"the worker exited while starting (exit code {proc.exitcode})")
            if msg[0] != "ready":
                self.last_error = msg[1]
                log.error("%s worker failed to start: %s", self.name, msg[1])
                w.kill()
                return
            with self._lock:
                if self._closed:
                    w.kill()
                    return
                self._all.add(w)
            self._idle.put(w)
        finally:
            with self._lock:
                self._starting -= 1

    def _add_worker(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._starting += 1
        self._io.submit(self._spawn)

    def start(self) -> None:
        """Start the workers in the background (they set up in parallel); idempotent.
        After :meth:`close`, starts afresh (an app's lifespan may run more than once)."""
        with self._lock:
            if self._started and not self._closed:
                return
            if self._closed:
                self._closed, self._io = False, self._new_io()
                self._idle = queue.Queue()
            self._started = True
        for _ in range(self.workers):
            self._add_worker()

    def _retire(self, w: _Worker, kill: bool) -> None:
        self._add_worker()  # counted as starting before the old one leaves: no moment without either
        with self._lock:
            self._all.discard(w)
        if not kill:
            try:
                w.conn.send(None)
                w.proc.join(timeout=2)
            except OSError:
                pass
        w.kill()

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            w.kill()
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- state ------------------------------------------------------------------------------------
    @property
    def ready(self) -> int:
        """Workers up (idle or busy)."""
        with self._lock:
            return len(self._all)

    # -- jobs -------------------------------------------------------------------------------------
    def _job(self, cancel: threading.Event, job: Any, items: Optional[list]) -> tuple:
        """Wait for a worker, send it the job, collect its items and answer; on ``cancel`` or
        overrun, kill the worker. Runs on an I/O thread."""
        w = None
        while w is None:
            if cancel.is_set():
                return ("cancelled",)
            try:
                w = self._idle.get(timeout=0.1)
            except queue.Empty:
                with self._lock:
                    if not self._all and self._starting == 0:
                        return ("unavailable",)
                continue
            if not w.proc.is_alive():  # died while idle
                self._retire(w, kill=True)
                w = None
        wall = 4 * self.spec.cpu_s + 30  # the CPU budget, with room for a busy machine's waiting
        t_end = time.monotonic() + wall
        try:
            # send_bytes writes from a memoryview; Connection.send would copy the rest of a large
            # body at every partial pipe write (quadratic, holding the GIL)
            w.conn.send_bytes(ForkingPickler.dumps(job))
            del job
            while True:
                while not w.conn.poll(0.1):
                    if cancel.is_set():
                        self._retire(w, kill=True)
                        return ("cancelled",)
                    if time.monotonic() > t_end:
                        self._retire(w, kill=True)
                        return ("timeout", wall)
                msg = w.conn.recv()
                if msg[0] != "item":
                    break
                if items is not None:
                    items.append(msg[1:])
        except (EOFError, OSError):
            w.proc.join(timeout=5)
            code = w.proc.exitcode
            self._retire(w, kill=True)
            return ("died", code)
        w.jobs += 1
        if msg[0] == "oom":  # the worker has exited
            self._retire(w, kill=True)
        elif w.jobs >= self.jobs_per_worker:
            self._retire(w, kill=False)
        else:
            self._idle.put(w)
        return msg

    async def run(self, job: Any, *, receive: Optional[Callable] = None, items: Optional[list] = None) -> Any:
        """Run one job in a worker; its result.

        Parameters
        ----------
        job : picklable
            ``"field"``: ``(data, name, options, extra)``, ``options`` being keyword arguments of
            :func:`~malaria_screen.serve.fieldjob.screen_field_bytes` (e.g. ``{"overlay": True}``)
            and ``extra`` keys added to the field's JSON; the result is that JSON, encoded
            (bytes). ``"cells"``: a list of :data:`~malaria_screen.serve.celljob.Item`; the
            result is None, the cells come in ``items``.
        receive : ASGI receive callable, optional
            The request's: the job is dropped or its worker killed when the client leaves.
        items : list, optional
            Receives the ``(index, cell, error)`` items of a ``"cells"`` job as they arrive,
            also those before a failure.

        Raises
        ------
        QueueFull
            All workers busy and ``max_queue`` jobs waiting, or no worker could start.
        JobFailed
            The handler's refusal (413/422), 422 when the job ran out of its CPU or memory
            budget, 500 for a bug, 504 when it overran its wall-clock time.
        ClientGone
            The client left; its job was dropped or its worker killed (and replaced).
        """
        self.start()
        t0 = self._admit(self.name)
        cancel = threading.Event()
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._io, self._job, cancel, job, items)
            del job
            try:
                msg = await _race(fut, receive, None)
            except BaseException:
                cancel.set()
                raise
        finally:
            self._release(t0)
        kind = msg[0]
        if kind == "ok":
            return msg[1]
        if kind == "refused":
            raise JobFailed(msg[1], msg[2])
        if kind == "unavailable":
            raise QueueFull(f"{self.name} (no worker running: {self.last_error or 'not started'})", 10)
        if kind == "cancelled":
            raise ClientGone
        if kind == "timeout":
            raise JobFailed(504, f"{self.what} took more than {msg[1]:.0f} s of wall-clock time")
        if kind == "oom":
            raise JobFailed(422, f"{self.what} needs more memory than the per-request limit "
                                 f"({self.spec.memory_bytes:,} bytes of address space)")
        if kind == "died":
            if msg[1] == -getattr(signal, "SIGXCPU", 24):
                raise JobFailed(422, f"{self.what} needs more than the per-request CPU budget "
                                     f"({self.spec.cpu_s:g} CPU seconds)")
            crash = {-getattr(signal, n) for n in ("SIGSEGV", "SIGABRT", "SIGBUS") if hasattr(signal, n)}
            if msg[1] in crash and self.spec.memory_bytes:
                # native code (PyTorch, OpenCV) that cannot allocate under RLIMIT_AS may crash
                # instead of raising: measured with a 5000x5000 noise field (SIGSEGV)
                raise JobFailed(422, f"{self.what} ended its worker (signal {-msg[1]}), most likely at the "
                                     f"per-request memory limit ({self.spec.memory_bytes:,} bytes of address space)")
            raise JobFailed(500, f"the {self.name} worker ended unexpectedly (exit code {msg[1]})")
        log.error("%s job failed: %s", self.name, msg[1])
        raise JobFailed(500, f"{self.what} failed: {msg[1]}")
