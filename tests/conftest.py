"""Shared fixtures: the real data folder (``$MALARIA_SCREEN_DATA``, default ``../shared/data``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MALARIA_SCREEN_DATA", REPO.parent / "shared" / "data")).resolve()


IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    """Skip a test whose data or browser is missing; under ``CI=true`` fail instead, so that a
    broken CI set-up (no data, no Chromium) cannot pass green on skipped tests."""
    if IN_CI:
        pytest.fail(f"{reason} [CI=true: missing data or browser fails instead of skipping]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing():
    """``missing(reason)``: skip locally, fail under ``CI=true`` (missing data, browser)."""
    return _missing


@pytest.fixture(scope="session")
def data_dir(missing) -> Path:
    root = data_root()
    if not (root / "nih_cell_images").is_dir():
        missing(f"real data not found at {root} (set MALARIA_SCREEN_DATA)")
    return root


@pytest.fixture(scope="session")
def nih_dir(data_dir: Path) -> Path:
    return data_dir / "nih_cell_images"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return REPO / "src" / "malaria_screen" / "assets" / "samples"


TORCH_THREADS = 2


@pytest.fixture(scope="module")
def deterministic_torch():
    """Fixed intra-op threads (2) and deterministic algorithms for a module's training tests.

    With the seed fixing split, initialisation and data order (``CellDataModule`` shuffles with a
    seeded generator), a run is then reproducible: the tiny training run of tests/training gave
    the same ROC-AUC to the last digit twice. A different thread count changes the order of
    floating-point reductions, hence the weights after an epoch (torch's default is one thread
    per core, and an in-process ``serve``/``bench`` call sets it to its ``--threads``)."""
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Cell stores go to a per-session temp folder, never the user's cache."""
    monkeypatch.setenv("MALARIA_SCREEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _make_subset(nih_dir: Path, dest: Path, patients: list[str]) -> Path:
    from malaria_screen.data.patients import parse_nih_patient_id

    for cls in ("Parasitized", "Uninfected"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((nih_dir / cls).iterdir()):
            if parse_nih_patient_id(f.name) in patients:
                (dest / cls / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="session")
def make_subset():
    """``make_subset(nih_dir, dest, patients)``: symlink the cells of ``patients`` into
    ``dest/<Class>/`` (a real NIH subset); returns ``dest``."""
    return _make_subset


@pytest.fixture(scope="session")
def limit_pngs(tmp_path_factory):
    """Constant-colour 8-bit RGB PNGs (small files; OpenCV's fast path and Pillow's) just under
    and just over ``MAX_PIXELS`` = 100 Mpx: 10,000 x 9,500 and 10,001 x 10,000 px.

    95 Mpx is over Pillow's own warning limit (89.5 Mpx), which must not decide."""
    from PIL import Image

    d = tmp_path_factory.mktemp("limit")
    under, over = d / "under.png", d / "over.png"
    Image.new("RGB", (10_000, 9_500), (200, 120, 60)).save(under, compress_level=1)
    Image.new("RGB", (10_001, 10_000), (200, 120, 60)).save(over, compress_level=1)
    return under, over


@pytest.fixture
def call_releasing_fifo():
    """``call(fn, fifo)``: run ``fn()`` but fail, instead of hanging, if it blocks on the named pipe."""
    return _call_releasing_fifo


def _call_releasing_fifo(fn, fifo, timeout_s=10.0):
    """``fn()`` in a daemon thread; if it is still blocked after ``timeout_s`` (a reader waiting
    on the pipe), open the write end to let it go, then fail. Re-raises what ``fn`` raised."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader now sees EOF
        t.join(timeout_s)
        pytest.fail(f"blocked on the named pipe {fifo} for more than {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
