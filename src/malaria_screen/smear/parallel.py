"""Screen fields in parallel: worker processes on this machine, or Ray actors on a cluster.

A field's screening (decode, segment, classify, write its JSON and overlay) does not depend on
any other field, so ``smear --workers N`` hands whole fields to ``N`` worker processes and
``smear --ray ADDRESS`` to Ray actors (:mod:`malaria_screen.data.ray_map`); the driver gets the
results back in input order and writes ``summary.json`` and ``report.html`` as a one-worker run
does, so the outputs are the same (tested). Each worker receives the cell model and rescorer once
(pickled: an ONNX model travels as its file's bytes, so a Ray node needs no copy of the file), runs torch,
ONNX Runtime and OpenCV on one thread, and
ignores SIGINT (Ctrl-C stops the driver, which shuts the workers down). A worker's log records
(WARNING and up) travel back with its result and are emitted by the driver's loggers, so
``--quiet`` and log levels act on them as on a one-worker run.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

from malaria_screen.data.parallel import init_worker, process_context
from malaria_screen.data.ray_map import ray_map

__all__ = ["map_fields"]

#: ``(item, model, rescorer) -> result``: the per-field job, a module-level function.
FieldJob = Callable[[Any, Any, Any], Any]

_STATE: dict[str, Any] = {}


def _one_thread(model: Any) -> Any:
    """Torch on one thread in this worker, and the model on one thread (an ONNX Runtime model's
    ``single_threaded()``): the workers share the cores."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    single = getattr(model, "single_threaded", None)
    return single() if callable(single) else model


def _init(model: Any, rescorer: Any) -> None:
    init_worker()
    _STATE["model"], _STATE["rescorer"] = _one_thread(model), rescorer


class _Collect(logging.Handler):
    """Keeps a worker's log records (WARNING and up) so the driver can emit them as its own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # picklable: the message, formatted
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _logged(job: FieldJob, item: Any, model: Any, rescorer: Any) -> tuple[Any, list[logging.LogRecord]]:
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return job(item, model, rescorer), handler.records
    finally:
        root.removeHandler(handler)


def _replay(records: list[logging.LogRecord]) -> None:
    """Emit a worker's records through this process's loggers (their levels and handlers: ``-q`` holds)."""
    for record in records:
        log = logging.getLogger(record.name)
        if log.isEnabledFor(record.levelno):
            log.handle(record)


def _run(job: FieldJob, item: Any) -> tuple[Any, list[logging.LogRecord]]:
    return _logged(job, item, _STATE["model"], _STATE["rescorer"])


def _actor_setup(model: Any, rescorer: Any) -> tuple[Any, Any]:
    return _one_thread(model), rescorer


def _actor_run(state: tuple[Any, Any], chunk: tuple[FieldJob, list]) -> list:
    job, items = chunk
    return [_logged(job, item, *state) for item in items]


def map_fields(job: FieldJob, items: Sequence[Any], *, model: Any, rescorer: Any = None, workers: int = 1,
               ray: Optional[str] = None, ray_chunk: int = 4, preload: Sequence[str] = ()) -> Iterator[Any]:
    """``job(item, model, rescorer)`` for every field, in order: here, in processes, or on Ray.

    Parameters
    ----------
    job : callable
        Module-level function (worker processes import it by name); it should catch a field's
        errors and return them as its result, so that one field never stops the others.
    items : sequence
        One picklable item per field.
    model, rescorer : objects, optional
        Passed to every call; pickled once per worker.
    workers : int, default=1
        1: run here, one field after another. More: that many worker processes.
    ray : str, optional
        A Ray address (:func:`malaria_screen.data.ray_map.connect`, called by the caller): run on
        Ray actors (one CPU each), ``ray_chunk`` fields per task; ``workers`` is then ignored.
    ray_chunk : int, default=4
    preload : sequence of str, optional
        Modules ``job`` imports lazily (inside functions): imported once by the fork server
        before it forks the workers, instead of by each worker on its first field (scikit-image
        and SciPy cost smear's field job about 1 s on its first field; with them preloaded, 0.1 s).

    Yields
    ------
    result
        ``job``'s result for each item, in order.

    Raises
    ------
    ValueError
        If ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if ray is not None:
        chunks = [(job, list(items[i : i + ray_chunk])) for i in range(0, len(items), ray_chunk)]
        for results in ray_map(_actor_run, chunks, setup=_actor_setup, setup_args=(model, rescorer)):
            for result, records in results:
                _replay(records)
                yield result
        return
    if workers == 1 or len(items) <= 1:
        for item in items:
            yield job(item, model, rescorer)
        return
    # the fork server imports the model's and the job's modules once (torch: ~1.5 s of CPU), not every worker
    modules = [*preload, job.__module__] + ([type(model).__module__] if model is not None else [])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=process_context(modules),
                               initializer=_init, initargs=(model, rescorer))
    finished = False
    try:
        ahead = 2 * workers
        futures: dict[int, Future] = {i: pool.submit(_run, job, items[i]) for i in range(min(ahead, len(items)))}
        for i in range(len(items)):
            result, records = futures.pop(i).result()
            if i + ahead < len(items):
                futures[i + ahead] = pool.submit(_run, job, items[i + ahead])
            _replay(records)
            yield result
        finished = True
    finally:
        if not finished:  # interrupted, or the caller stopped early: fields in progress are abandoned
            _kill_workers(pool)
        pool.shutdown(wait=finished, cancel_futures=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's worker processes now (they ignore SIGINT, and a field takes seconds)."""
    kill = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if kill is not None:
        kill()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
