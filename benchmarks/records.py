"""Benchmark records: every figure quoted in the README or docs comes from one of these files.

A benchmark calls :func:`write_record` once at its end; the record lands in
``benchmarks/results/<name>.json`` (atomic write) with the command, commit, date, machine and
library versions next to a flat ``figures`` mapping::

    from records import write_record          # benchmarks/ is on sys.path when run as a script
    write_record("bench_train", {"test.accuracy": 0.9632, "fit_seconds": 588.1},
                 notes="split: 32 test patients, 4,152 cells; seed 0")

Quoting a figure in Markdown: put the number, then an HTML comment naming the record and key::

    accuracy 0.9632<!--fig bench_train:test.accuracy-->

The comment is invisible on GitHub and in MkDocs; ``tests/test_figures.py`` finds every such pair
in ``README.md`` and ``docs/**/*.md`` and checks that the quoted number equals the record's value
rounded to the quoted number of decimals (thousands separators and a trailing ``%``, ``s`` or
``x`` are allowed; a ``%`` figure is compared with ``100 * value`` when the key ends in
``_frac``). A stale number therefore fails the test suite, and so does a quoted record made with
``uses_bundled_model=True`` whose weights hash is not the bundled model's any more (re-run
``make bench-records``, or the record's own ``command``).

The same test fails on *unmarked* figures (README and docs/, except the lab notebook in
docs/experiments/): outside code, a decimal number, a percentage, a number
with a thousands separator or in scientific notation needs a marker. Settings belong in code
spans (``--threshold 0.5``); a setting or target that must stand in prose takes
``<!--nofig: REASON-->`` right after it. Versions, DOI/arXiv ids, lengths in µm or px and the
level of a confidence interval ("95 % CI") are exempt.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Libraries whose versions are stored with every record (those installed).
VERSIONED = ("malaria-screen", "numpy", "torch", "torchvision", "lightning", "scikit-learn", "scikit-image",
             "opencv-python-headless", "onnxruntime", "pillow", "scipy", "quapy", "ray")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        # Records themselves are tracked: one benchmark's fresh record must not mark the next as dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"],
                               cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_probe_ms(repeats: int = 5) -> float:
    """Speed of one core now: the median time of a fixed pure-Python loop (1,000,000 steps), in ms.

    Virtual machines sold as the same CPU model differ (the same training ran 272 s on one and
    496 s on the next); this figure, stored with every record, tells two records' machines apart.
    Lower is faster. It is measured when the record is written, so a busy machine reads slower.
    """
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        acc = 0
        for i in range(1_000_000):
            acc += i & 7
        times.append(time.perf_counter() - t)
    return round(1000 * sorted(times)[len(times) // 2], 1)


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: cores usable by this process, CPU model, memory, speed.

    Returns:
        ``{"cores": int, "cpu": str, "memory_gib": float | None, "platform": str, "gpu": str | None,
        "cpu_probe_ms": float}``; ``gpu`` is the CUDA device name when torch sees one, else None;
        ``cpu_probe_ms`` is :func:`cpu_probe_ms`.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    mem = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return {"cores": cores, "cpu": _cpu_model(), "memory_gib": mem, "platform": platform.platform(), "gpu": gpu,
            "cpu_probe_ms": cpu_probe_ms()}


def versions() -> dict[str, str]:
    """Installed versions of Python and the libraries in :data:`VERSIONED` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


BUNDLED_WEIGHTS = Path(__file__).resolve().parents[1] / "src/malaria_screen/assets/default_model/weights.safetensors"


def bundled_model_sha256() -> str | None:
    """SHA-256 of the bundled default model's ``weights.safetensors`` (None when absent)."""
    import hashlib

    try:
        return hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest()
    except OSError:
        return None


def write_record(name: str, figures: Mapping[str, float | int | str | None], *, notes: str = "",
                 uses_bundled_model: bool = False, command: list[str] | None = None,
                 results_dir: str | Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically and return its path.

    Args:
        name: record name, ``[A-Za-z0-9_-]+`` (the part before ``:`` in a figure marker).
        figures: flat mapping from a dotted key (``"test.accuracy"``) to a number (or a short
            string); NaN is stored as null.
        notes: what the figures are measured on: split, patient/field counts, whether the data
            helped choose the method.
        uses_bundled_model: the figures depend on the bundled default model; its weights' SHA-256
            is stored as ``bundled_model_sha256``, so a test can tell a record made with an older
            bundled model (stale) from a current one.
        command: the command line; default ``sys.argv`` with the interpreter.
        results_dir: where to write (tests); default :data:`RESULTS_DIR`.

    Raises:
        ValueError: a bad name, or a figure that is not a number, string or None.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"record name must be [A-Za-z0-9_-]+, got {name!r}")
    clean: dict[str, Any] = {}
    for key, value in figures.items():
        if hasattr(value, "item"):  # numpy scalar
            value = value.item()
        if isinstance(value, float) and value != value:
            value = None
        if value is not None and not isinstance(value, (int, float, str)):
            raise ValueError(f"figure {key!r} must be a number, a string or None, got {type(value).__name__}")
        clean[str(key)] = value
    record = {
        "name": name,
        "command": command if command is not None else [Path(sys.executable).name, *sys.argv],
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "notes": notes,
        "bundled_model_sha256": bundled_model_sha256() if uses_bundled_model else None,
        "figures": clean,
    }
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a record is meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
