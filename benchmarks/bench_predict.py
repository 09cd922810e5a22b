"""Benchmark: ``predict`` end to end (cell file -> label), per stage, against the decode ceiling.

For each file set (the NIH cells as stored here, lossless WebP; and the same cells as PNG, as the
public NIH release and users have them, written losslessly to a temp folder: identical pixels):

- per-stage CPU cost per cell, one process, one thread: decode, cell-size + grayscale check,
  letterbox, inference (the one-thread session ``predict_files``' workers run, in their batches of
  ``CLASSIFY_CHUNK``; also timed on ONNX Runtime's default threads at batch 256, for reference);
- the decode ceiling: files decoded (and dropped) by ``--workers`` processes, cells/s wall;
- ``predict_files`` end to end (decode, check, letterbox and inference in worker processes),
  cells/s wall, and its ratio to the ceiling; the CPU-bound rate ``workers / sum(stage costs)``;
- the CPU time of that end-to-end run per cell, in this process and in the workers (read from the
  fork server, which reaps them), and the rate it allows on ``workers`` cores: steady on a shared
  machine, and it counts what the stages miss (transfer, batching, per-file overhead);
- the same with decoding in threads (the previous ``predict``), for reference;
- the labels of the two runs, which must agree file for file; with ``--before-src``, also those of
  the older code (same model, same files) and the largest difference in ``p_parasitized``;
- the whole ``malaria-screen predict`` command on the PNG folder (start-up, listing, the CSV,
  ``summary.json``, the printed table), and on one cell (the fixed cost); with ``--before-src``,
  the older code's command too.

Timings on a shared machine are noisy: the record states the load average seen during the run;
CPU times and per-stage ratios measured in one run are the steadier figures.

Usage::

    python benchmarks/bench_predict.py DATA_DIR/nih_cell_images [--model FILE.onnx] [--n 4096] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _stages(pred, files: list[str]) -> dict[str, float]:
    """Per-cell CPU milliseconds of each stage, one process, one thread."""
    from malaria_screen.data.io import check_cell_size, check_colour, decode_image
    from malaria_screen.data.parallel import CLASSIFY_CHUNK
    from malaria_screen.data.preprocess import letterbox

    t = time.process_time()
    rgbs = [decode_image(f) for f in files]
    dec = time.process_time() - t
    t = time.process_time()
    for r in rgbs:
        check_colour(check_cell_size(r))
    chk = time.process_time() - t
    t = time.process_time()
    cells = np.stack([letterbox(r, pred.input_size) for r in rgbs])
    lb = time.process_time() - t
    remote = pred.worker_classifier()
    if remote is not None:  # what predict_files' workers run: one thread, batches of CLASSIFY_CHUNK
        def infer(c):
            return np.concatenate([remote.predict_proba_prepared(c[i : i + CLASSIFY_CHUNK]) for i in range(0, len(c), CLASSIFY_CHUNK)])
    else:
        infer = pred.overlapped_inference()  # what predict_files runs beside its decoding workers
    infer(cells[:256])  # the one-thread session is loaded on first use
    t = time.process_time()
    infer(cells)
    inf = time.process_time() - t
    t = time.process_time()
    pred.predict_proba_prepared(cells)
    inf_default = time.process_time() - t
    n = len(files) / 1e3
    return {"decode_ms": dec / n, "check_ms": chk / n, "letterbox_ms": lb / n, "inference_ms": inf / n,
            "inference_default_threads_ms": inf_default / n}


def _ceiling(files: list[str], workers: int) -> float:
    """Cells/s decoding only, in ``workers`` processes (started before the clock)."""
    from malaria_screen.data.parallel import decode_files, init_worker, process_context

    chunks = [files[i : i + 32] for i in range(0, len(files), 32)]
    with ProcessPoolExecutor(workers, mp_context=process_context(), initializer=init_worker) as pool:
        list(pool.map(decode_files, [c[:1] for c in chunks[: 2 * workers]]))  # start the workers
        t = time.perf_counter()
        n = sum(s is not None for r in pool.map(decode_files, chunks) for s in r)
        dt = time.perf_counter() - t
    assert n == len(files)
    return len(files) / dt


def _end_to_end(pred, files: list[str], workers: int, processes: bool) -> tuple[float, list]:
    t = time.perf_counter()
    rows = list(pred.predict_files(files, workers=workers, processes=processes))
    return len(files) / (time.perf_counter() - t), rows


def _forkserver_children_cpu() -> float | None:
    """CPU seconds of the fork server's finished children (the decoding workers), or None.

    The workers are children of multiprocessing's fork server, which reaps them: their CPU time
    then adds to its ``cutime``/``cstime`` (``/proc/PID/stat``). Linux and CPython only."""
    import multiprocessing.forkserver as fs

    pid = getattr(getattr(fs, "_forkserver", None), "_forkserver_pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _end_to_end_cpu(pred, files: list[str], workers: int) -> tuple[float, float] | None:
    """CPU milliseconds per cell of ``predict_files`` in worker processes: (this process, the
    workers); steady on a shared machine, unlike wall time. None where it cannot be read."""
    before = _forkserver_children_cpu()
    t = time.process_time()
    list(pred.predict_files(files, workers=workers, processes=True))
    parent = time.process_time() - t
    time.sleep(0.5)  # let the fork server reap the workers
    after = _forkserver_children_cpu()
    if before is None or after is None:
        return None
    return 1e3 * parent / len(files), 1e3 * (after - before) / len(files)


_BEFORE = """
import sys, time
from malaria_screen.inference import load_model
pred = load_model(sys.argv[1], backend="onnx")
files = open(sys.argv[2]).read().split("\\n")
list(pred.predict_files(files[:600]))
t = time.perf_counter()
rows = list(pred.predict_files(files))
print(len(files) / (time.perf_counter() - t), sum(r.error is None for r in rows))
print(" ".join(f"{r.label}:{r.p_parasitized!r}" for r in rows))
"""


def _before(src: str, model: str, files: list[str], tmp: str) -> tuple[float, list[tuple[str, float]]]:
    """Cells/s of ``predict_files`` in the code at ``src`` (an older checkout's ``src/``), same files
    and model, and its ``(label, p_parasitized)`` per file."""
    import subprocess

    lst = Path(tmp) / "files.txt"
    lst.write_text("\n".join(files))
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", _BEFORE, model, str(lst)], env=env, capture_output=True, text=True,
                         check=True, timeout=1800).stdout.splitlines()
    rate, n_ok = out[0].split()
    assert int(n_ok) == len(files)
    rows = [(lab, float(p)) for lab, p in (item.split(":") for item in out[1].split())]
    return float(rate), rows


def _command(folder: str, model: str, out: Path, src: str | None = None) -> float:
    """Wall seconds of the whole ``malaria-screen predict FOLDER --model MODEL --out OUT`` command
    (interpreter start, imports, listing, classification, the CSV, ``summary.json`` and the printed
    table), the way a user runs it; with ``src``, the code of an older checkout's ``src/``."""
    import subprocess

    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "malaria_screen.cli", "predict", folder, "--model", model, "--out", str(out)],
                   env=env, capture_output=True, text=True, check=True, timeout=1800)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", help="NIH cell folder (Parasitized/, Uninfected/)")
    ap.add_argument("--model", default=None, help="default: the bundled model.int8.onnx")
    ap.add_argument("--n", type=int, default=4096, help="cells (every k-th file of the folder)")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes; default: usable cores")
    ap.add_argument("--record", default="bench_predict", help="record name (benchmarks/results/NAME.json)")
    ap.add_argument("--before-src", default=None,
                    help="src/ folder of an older checkout: its predict_files is timed on the same files")
    ap.add_argument("--notes", default="", help="added to the record's notes (machine state)")
    args = ap.parse_args()

    import cv2
    from PIL import Image

    from malaria_screen.data.dataset import list_image_files
    from malaria_screen.data.io import fast_decoders
    from malaria_screen.data.parallel import default_workers
    from malaria_screen.inference import load_model
    from malaria_screen.inference.base import default_model_dir
    from records import write_record

    cv2.setNumThreads(1)
    workers = args.workers or default_workers()
    model = args.model or str(default_model_dir() / "model.int8.onnx")
    pred = load_model(model, backend="onnx")
    allf = list_image_files([args.data_dir])
    webp = [str(f) for f in allf[:: max(1, len(allf) // args.n)][: args.n]]
    figures: dict[str, float | int | str] = {"n_cells": len(webp), "workers": workers}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_predict_png_") as tmp:
        png = []
        for f in webp:  # lossless: the pixels of the public release's PNGs
            out = Path(tmp) / Path(f).parent.name / (Path(f).stem + ".png")
            out.parent.mkdir(exist_ok=True)
            with Image.open(f) as im:
                im.convert("RGB").save(out, compress_level=6)
            png.append(str(out))
        list(pred.predict_files(webp[:600] + png[:600], workers=workers))  # warm-up: page cache, forkserver
        for name, files in (("webp", webp), ("png", png)):
            st = _stages(pred, files)
            inf_default = st.pop("inference_default_threads_ms")
            ceiling = _ceiling(files, workers)
            load.append(os.getloadavg()[0])
            e2e, rows = _end_to_end(pred, files, workers, processes=True)
            cpu = _end_to_end_cpu(pred, files, workers)
            if cpu is not None:
                figures[f"{name}.e2e_parent_cpu_ms_per_cell"] = round(cpu[0], 4)
                figures[f"{name}.e2e_workers_cpu_ms_per_cell"] = round(cpu[1], 4)
                figures[f"{name}.e2e_cpu_ms_per_cell"] = round(sum(cpu), 4)
                figures[f"{name}.e2e_cpu_bound_cells_per_s"] = round(workers * 1e3 / sum(cpu))
            thr, rows_thr = _end_to_end(pred, files, workers + 2, processes=False)
            if args.before_src:
                rate, old_rows = _before(args.before_src, model, files, tmp)
                figures[f"{name}.before_cells_per_s"] = round(rate)
                figures[f"{name}.same_labels_as_before_frac"] = sum(
                    r.label == lab for r, (lab, _) in zip(rows, old_rows)) / len(files)
                figures[f"{name}.max_abs_p_diff_vs_before"] = max(abs(r.p_parasitized - p) for r, (_, p) in zip(rows, old_rows))
                print(f"{name}: labels as the code at {args.before_src}: {figures[f'{name}.same_labels_as_before_frac']:.4f}; "
                      f"largest p_parasitized difference {figures[f'{name}.max_abs_p_diff_vs_before']:.2g}")
            load.append(os.getloadavg()[0])
            assert all(r.error is None for r in rows), [r.error for r in rows if r.error][:3]
            same = sum(a.label == b.label for a, b in zip(rows, rows_thr))
            figures.update({f"{name}.{k}": round(v, 4) for k, v in st.items()})
            figures[f"{name}.inference_default_threads_ms"] = round(inf_default, 4)
            figures.update({
                f"{name}.stages_cpu_ms_per_cell": round(sum(st.values()), 4),
                f"{name}.cpu_bound_cells_per_s": round(workers * 1e3 / sum(st.values())),
                f"{name}.letterbox_over_decode": round(st["letterbox_ms"] / st["decode_ms"], 3),
                f"{name}.decode_ceiling_cells_per_s": round(ceiling),
                f"{name}.cells_per_s": round(e2e),
                f"{name}.ratio_to_ceiling": round(e2e / ceiling, 3),
                f"{name}.threads_cells_per_s": round(thr),
                f"{name}.same_labels_frac": same / len(files),
            })
            print(f"{name}: {len(files)} cells, {workers} processes | per cell, 1 core: decode {st['decode_ms']:.3f} ms, "
                  f"check {st['check_ms']:.3f}, letterbox {st['letterbox_ms']:.3f}, inference {st['inference_ms']:.3f} "
                  f"(one thread; {inf_default:.3f} on ONNX Runtime's default threads) | "
                  f"decode ceiling {ceiling:,.0f} cells/s | predict {e2e:,.0f} cells/s ({e2e / ceiling:.0%} of ceiling; "
                  f"CPU-bound at {workers * 1e3 / sum(st.values()):,.0f}) | threads {thr:,.0f} cells/s | same labels {same}/{len(files)}"
                  + (f" | before: {figures[f'{name}.before_cells_per_s']:,} cells/s" if args.before_src else ""))
            if cpu is not None:
                print(f"{name}: predict_files CPU per cell, all processes: {sum(cpu):.3f} ms (here {cpu[0]:.3f}, workers "
                      f"{cpu[1]:.3f}): CPU-bound at {workers * 1e3 / sum(cpu):,.0f} cells/s on {workers} cores")
        # The whole command on the PNG folder, as the issue measures it (best of 2: page cache warm).
        cmd = min(_command(tmp, model, Path(tmp) / "cmd" / "r.csv") for _ in range(2))
        one = min(_command(png[0], model, Path(tmp) / "cmd" / "one.csv") for _ in range(2))
        figures.update({"png.command_seconds": round(cmd, 3), "png.command_cells_per_s": round(len(png) / cmd),
                        "command_one_cell_seconds": round(one, 3)})
        line = (f"png: the whole `malaria-screen predict` command on {len(png)} cells: {cmd:.2f} s, "
                f"{len(png) / cmd:,.0f} cells/s (one cell: {one:.2f} s)")
        if args.before_src:
            old = min(_command(tmp, model, Path(tmp) / "cmd" / "old.csv", args.before_src) for _ in range(2))
            figures.update({"png.before_command_seconds": round(old, 3), "png.before_command_cells_per_s": round(len(png) / old)})
            line += f" | before: {old:.2f} s, {len(png) / old:,.0f} cells/s"
        print(line)
        load.append(os.getloadavg()[0])
    figures["load_avg_start"], figures["load_avg_max"] = round(load[0], 2), round(max(load), 2)
    figures["decoders"] = ", ".join(f"{k}: {v}" for k, v in fast_decoders().items())
    shared = load[0] > 0.5  # during the runs the load counts this benchmark's own workers; before them, other jobs'
    notes = (f"{len(webp)} NIH cells (every k-th file of {args.data_dir}; patients seen in training included: "
             f"speed only, labels compared between runs), model {Path(model).name}. Per-stage costs are CPU time in one "
             f"process; e2e_*cpu* are CPU time of the end-to-end run (this process + the workers that decode and classify); cells/s are wall time. Load average {load[0]:.1f} before the runs, up to {max(load):.1f} "
             f"during them on {workers} cores (this benchmark's own workers included): "
             + ("machine SHARED with other jobs, wall-time figures are pessimistic. " if shared else "no other jobs. ")
             + args.notes)
    write_record(args.record, figures, notes=notes, uses_bundled_model=args.model is None)
    print(f"load average up to {max(load):.1f}; record {args.record}")


if __name__ == "__main__":
    main()
