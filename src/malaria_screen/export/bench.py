"""End-to-end inference throughput: image file to label, per back-end and batch size.

For each back-end (torch eager, ONNX fp32, ONNX int8) and batch size the benchmark measures, in
cells per second (cells/s):

- ``end_to_end``: :meth:`predict_files` over real files (decode in threads, letterbox, infer,
  threshold), the number a user sees;
- ``decode``: the same file loop with no inference (decoding + letterboxing only);
- ``infer``: ``predict_proba_prepared`` on already decoded cells (the model alone);

and the compute ceiling ratio ``MFLOPs/cell x infer cells/s / matmul GFLOP/s``, where the
ceiling is a float32 ``n x n`` numpy matrix product (``2 n^3`` FLOPs) timed in the same run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping, Sequence

import numpy as np

from malaria_screen.inference.base import iter_file_batches

__all__ = ["matmul_gflops", "bench_backends"]

log = logging.getLogger(__name__)


def matmul_gflops(n: int = 2048, *, min_seconds: float = 1.0) -> float:
    """Measured float32 matrix-multiply throughput of this machine, GFLOP/s.

    Parameters
    ----------
    n : int, default=2048
        Side of the square matrices (``2 n^3`` FLOPs per product).
    min_seconds : float, default=1.0
        Keep multiplying at least this long, seconds; the best product time is used.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool, pages)
    best, t_end = float("inf"), time.perf_counter() + min_seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_backends(
    models: Mapping[str, object],
    files: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 256),
    mflops_per_cell: float | None = None,
    workers: int | None = None,
    gflops: float | None = None,
) -> dict:
    """Throughput of several classifiers on the same files.

    Parameters
    ----------
    models : mapping of name to classifier
        :class:`~malaria_screen.inference.base.CellClassifierBase` instances.
    files : sequence of path
        Real cell images (each decoded once per measurement; the OS page cache holds them).
    batch_sizes : sequence of int, default=(1, 256)
    mflops_per_cell : float, optional
        Model MFLOPs per cell (:func:`malaria_screen.models.count_flops` / 1e6), for the
        ceiling ratio.
    workers : int, optional
        Decoding threads; default ``min(8, cpu_count + 2)`` as in ``predict_files``.
    gflops : float, optional
        Matrix-multiply ceiling, GFLOP/s; if None, measured before and after the run and the
        larger value used (other jobs on shared CPUs lower it while they run).

    Returns
    -------
    dict
        ``matmul_gflops``, ``cpu_count``, ``n_files``, ``mflops_per_cell`` and ``rows``: per
        (backend, batch) ``end_to_end``, ``decode`` and ``infer`` cells/s and ``ceiling_ratio``.
    """
    files = [str(f) for f in files]
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    measured = gflops is None
    gflops = gflops or matmul_gflops()
    any_model = next(iter(models.values()))
    # decoding alone (the same loop and threads as predict_files, no inference)
    decode = {}
    for bs in batch_sizes:
        t0 = time.perf_counter()
        n = sum(1 for _b, dec in iter_file_batches(files, any_model.prepare, chunk=bs, workers=workers) for _ in dec)
        decode[bs] = _rate(n, time.perf_counter() - t0)
    cells = np.stack([any_model.prepare(f) for f in files])
    rows = []
    for name, m in models.items():
        for bs in batch_sizes:
            old_bs = m.batch_size
            m.batch_size = bs
            try:
                m.predict_proba_prepared(cells[: max(bs, 8)])  # warm-up
                t0 = time.perf_counter()
                m.predict_proba_prepared(cells)
                infer = _rate(len(cells), time.perf_counter() - t0)
                t0 = time.perf_counter()
                n_ok = sum(r.error is None for r in m.predict_files(files, workers=workers, chunk=bs))
                e2e = _rate(len(files), time.perf_counter() - t0)
            finally:
                m.batch_size = old_bs
            if n_ok != len(files):
                log.warning("%s: %d of %d files failed", name, len(files) - n_ok, len(files))
            ratio = (mflops_per_cell * 1e6 * infer / (gflops * 1e9)) if mflops_per_cell else None
            rows.append({"backend": name, "batch": bs, "end_to_end": e2e, "decode": decode[bs], "infer": infer,
                         "ceiling_ratio": ratio, "ceiling_ratio_e2e": (mflops_per_cell * 1e6 * e2e / (gflops * 1e9)) if mflops_per_cell else None})
            log.info("%s batch %d: %.0f cells/s end to end", name, bs, e2e)
    if measured:  # the ceiling is the best the machine showed: measure again at the end (shared CPUs vary)
        best = max(gflops, matmul_gflops())
        for r in rows:
            for k in ("ceiling_ratio", "ceiling_ratio_e2e"):
                if r[k] is not None:
                    r[k] *= gflops / best
        gflops = best
    return {"matmul_gflops": gflops, "cpu_count": os.cpu_count(), "n_files": len(files), "workers": workers,
            "mflops_per_cell": mflops_per_cell, "rows": rows}
