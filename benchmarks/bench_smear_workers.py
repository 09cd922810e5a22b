"""Benchmark: ``smear`` seconds per field with 1 and N worker processes, with and without overlays.

Screens the same IML fields (every k-th of ``iml_malaria_dev/images``) with the bundled model:
one worker, ``--workers`` workers, and ``--workers`` workers without overlay PNGs; checks that
the outputs equal the one-worker run's (timings aside); prints seconds per field (wall), the
process CPU seconds per field of the one-worker run (steady on a shared machine), the whole
``malaria-screen smear`` command's wall time per field (start-up included, as issue 24 timed it), the CPU seconds
of ``segment_field`` alone, and the per-stage seconds of a field (segmentation, crops,
classification, wall, from the per-field JSON); optionally runs the same fields through an older
checkout's ``run_smear`` with this checkout's bundled model (``--before-src``: wall with its
default workers, CPU with one).

Usage::

    python benchmarks/bench_smear_workers.py DATA_DIR [--n 120] [--workers N] [--before-src OLD/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_BEFORE = """
import inspect, sys, time
import malaria_screen
from malaria_screen.smear.report import run_smear
files = sys.argv[3:]
m = malaria_screen.load_model(sys.argv[2])  # this checkout's bundled model, not the older one's
run_smear(files[:1], sys.argv[1] + "/warm", m)
t = time.perf_counter()
s = run_smear(files, sys.argv[1] + "/run", m)
wall = (time.perf_counter() - t) / len(files)
one = {"workers": 1} if "workers" in inspect.signature(run_smear).parameters else {}
c = time.process_time()
run_smear(files, sys.argv[1] + "/cpu", m, **one)
print(wall, s["n_rbc"], s["n_infected"], (time.process_time() - c) / len(files))
"""


def _segment_cpu(files: list[str]) -> float:
    """CPU seconds of ``segment_field`` per field, in this process (decoding not counted)."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.segment import segment_field

    rgbs = [decode_image(f) for f in files]
    segment_field(rgbs[0])
    t = time.process_time()
    for rgb in rgbs:
        segment_field(rgb)
    return (time.process_time() - t) / len(rgbs)


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not k.startswith("seconds")}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", help="the shared data folder (iml_malaria_dev/ inside)")
    ap.add_argument("--n", type=int, default=120, help="fields (default: all 120 dev fields; a run of a few fields is dominated by start-up)")
    ap.add_argument("--workers", type=int, default=None, help="default: usable cores")
    ap.add_argument("--before-src", default=None, help="src/ of an older checkout, timed on the same fields")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"],
                    help="back-end of the in-process runs (default: onnx, what `smear` runs the bundled model on)")
    ap.add_argument("--notes", default="")
    ap.add_argument("--record", default="bench_smear_workers", help="record name (benchmarks/results/NAME.json)")
    args = ap.parse_args()

    import malaria_screen
    from malaria_screen.data.parallel import default_workers
    from malaria_screen.inference.base import default_model_dir
    from malaria_screen.smear.report import run_smear
    from records import write_record

    workers = args.workers or default_workers()
    imgs = sorted((Path(args.data_dir) / "iml_malaria_dev" / "images").iterdir())
    files = [str(p) for p in imgs[:: max(1, len(imgs) // args.n)][: args.n]]
    from malaria_screen.smear.domain import load_reference

    model = malaria_screen.load_model(backend=args.backend)  # as `smear` loads the bundled model by default (onnx)
    domain_ref = load_reference(model)  # the self-check, as `smear` runs it by default
    figures: dict[str, float | int | str] = {"n_fields": len(files), "workers": workers}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_smear_") as tmp:
        run_smear(files[:1], Path(tmp) / "warm", model, workers=1, domain_reference=domain_ref)
        # start the fork server (it imports torch once, seconds of CPU, paid once per smear command) before timing,
        # as bench_predict does: the timed runs measure the steady state of a long run
        run_smear(files[:2], Path(tmp) / "warm_pool", model, workers=workers, domain_reference=domain_ref)
        runs = {}
        for name, kw in (("w1", {"workers": 1}), (f"w{workers}", {"workers": workers}),
                         (f"w{workers}_no_overlays", {"workers": workers, "overlays": False})):
            t, c = time.perf_counter(), time.process_time()
            s = run_smear(files, Path(tmp) / name, model, domain_reference=domain_ref, **kw)
            figures[f"{name}.s_per_field"] = round((time.perf_counter() - t) / len(files), 4)
            if name == "w1":  # one worker runs here: its process CPU time is the whole job's
                figures["w1.cpu_s_per_field"] = round((time.process_time() - c) / len(files), 4)
                print(f"w1: {figures['w1.cpu_s_per_field']:.3f} s CPU per field")
            load.append(os.getloadavg()[0])
            runs[name] = s
            print(f"{name}: {figures[f'{name}.s_per_field']:.3f} s per field (wall)")
        # the whole command, as a user runs it (issue 24 timed it so): interpreter start, imports, model load, fork
        # server and workers started inside the timing
        exe = Path(sys.executable).with_name("malaria-screen")
        cmd = [str(exe) if exe.is_file() else sys.executable, *([] if exe.is_file() else ["-m", "malaria_screen.cli"]),
               "smear", *files, "--out", str(Path(tmp) / "cli"), "--workers", str(workers), "--quiet"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
        figures[f"cli_w{workers}.s_per_field"] = round((time.perf_counter() - t) / len(files), 4)
        load.append(os.getloadavg()[0])
        t = time.perf_counter()  # the same command on the PyTorch back-end (`smear`'s default before ONNX Runtime)
        subprocess.run([*cmd[:cmd.index("--out") + 1], str(Path(tmp) / "cli_torch"), *cmd[cmd.index("--out") + 2:],
                        "--backend", "torch"], check=True, capture_output=True, timeout=3600)
        figures[f"cli_w{workers}_torch.s_per_field"] = round((time.perf_counter() - t) / len(files), 4)
        load.append(os.getloadavg()[0])
        print(f"malaria-screen smear, whole command, {workers} workers: {figures[f'cli_w{workers}.s_per_field']:.3f} s per field "
              f"(wall; --backend torch: {figures[f'cli_w{workers}_torch.s_per_field']:.3f})")
        ref = _untimed(runs["w1"])
        same = _untimed(runs[f"w{workers}"]) == ref
        figures["same_outputs"] = int(same)
        stages: dict[str, float] = {}
        for f in runs["w1"]["fields"]:
            for k, v in json.loads((Path(tmp) / "w1" / f["json"]).read_text()).get("seconds", {}).items():
                stages[k] = stages.get(k, 0.0) + v / len(runs["w1"]["fields"])
        figures.update({f"w1.stage_{k}_s": round(v, 4) for k, v in stages.items()})
        figures["segment_cpu_s_per_field"] = round(_segment_cpu(files), 4)
        print(f"segment_field alone: {figures['segment_cpu_s_per_field']:.3f} s CPU per field")
        figures["speedup"] = round(figures["w1.s_per_field"] / figures[f"w{workers}.s_per_field"], 2)
        figures["n_rbc"], figures["n_infected"] = runs["w1"]["n_rbc"], runs["w1"]["n_infected"]
        if args.before_src:
            out = subprocess.run([sys.executable, "-c", _BEFORE, tmp + "/before", str(default_model_dir()), *files], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": args.before_src}, check=True, timeout=3600).stdout.split()
            figures["before.s_per_field"] = round(float(out[0]), 4)
            figures["before.w1.cpu_s_per_field"] = round(float(out[3]), 4)
            load.append(os.getloadavg()[0])
            print(f"before ({args.before_src}): {float(out[0]):.3f} s per field, {float(out[3]):.3f} s CPU per field with "
                  f"one worker; {out[1]} RBC, {out[2]} infected")
    figures["load_avg_start"], figures["load_avg_max"] = round(load[0], 2), round(max(load), 2)
    print(f"stages of one field, 1 worker: {', '.join(f'{k} {v:.3f} s' for k, v in stages.items())}; "
          f"speed-up {figures['speedup']}x; outputs equal: {same}; load average up to {max(load):.1f}")
    # the load during the runs counts this benchmark's own workers (about `workers`); before them it is other jobs'
    shared = load[0] > 0.5
    write_record(args.record, figures, uses_bundled_model=True, notes=(
        f"{len(files)} IML dev fields (every k-th of 120, 1280x960; speed only, no accuracy claimed), bundled model "
        f"({args.backend}), the self-check on (as smear runs by default), {workers} worker processes (fork server started before timing). Seconds per field are wall time of run_smear (decode, segment, classify, "
        f"JSON, overlay, report); cli_w{workers}.s_per_field is the whole `malaria-screen smear` command's wall time (interpreter "
        f"start, imports, model load and workers' start included) over the same fields (default back-end: ONNX Runtime; "
        f"cli_w{workers}_torch: --backend torch); w1.cpu_s_per_field is process CPU of the one-worker run, segment_cpu_s_per_field that of "
        f"segment_field alone; stage seconds are per field from the one-worker run. Load average {load[0]:.1f} before the "
        f"runs, up to {max(load):.1f} during them (this benchmark's own workers included): "
        + ("machine SHARED with other jobs, wall times pessimistic. " if shared else "no other jobs. ") + args.notes))


if __name__ == "__main__":
    main()
