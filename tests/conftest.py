"""Shared fixtures: the real data folder (``$MALARIA_SCREEN_DATA``, default ``../shared/data``)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
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

# -- whole-smear data (IML_Malaria dev fields, Chula-RBC-12) -------------------------------------

@pytest.fixture(scope="session")
def iml_dir(missing) -> Path:
    d = data_root() / "iml_malaria_dev"
    if not (d / "annotations.json").is_file():
        missing(f"IML data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture(scope="session")
def chula_dir(missing) -> Path:
    d = data_root() / "chula_rbc"
    if not (d / "images").is_dir():
        missing(f"Chula data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture
def iml_with_tiny_field(tmp_path, iml_dir) -> tuple[Path, Path]:
    """``(field folder, annotations.json)``: two real IML fields and a readable 1x1 PNG (too small
    to segment), all three annotated."""
    from PIL import Image

    names = ["PA171926.JPG", "PA171966.JPG"]  # annotated parasitemia 0.9 % and 0 %
    d = tmp_path / "fields"
    d.mkdir()
    for n in names:
        shutil.copy(iml_dir / "images" / n, d / n)
    Image.new("RGB", (1, 1), (200, 150, 160)).save(d / "tiny.png")
    ann = [a for a in json.loads((iml_dir / "annotations.json").read_text()) if a["image_name"] in names]
    ann.append({"image_name": "tiny.png", "objects": [{"type": "red blood cell", "bbox": {"x": 0, "y": 0, "w": 1, "h": 1}}]})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return d, tmp_path / "ann.json"


# -- models for the inference, export, serve, app and CLI tests ------------------------------------
# A randomly initialised CellNet is enough for parity tests (torch vs ONNX Runtime); accuracy tests
# use the bundled default model and skip (fail under CI=true) when it is absent.

@pytest.fixture(scope="session")
def sample_pngs(missing) -> list[Path]:
    """The 24 original NIH PNGs: bundled samples, else the data folder's copy."""
    for root in (REPO / "src" / "malaria_screen" / "assets" / "samples", data_root() / "nih_samples_png"):
        files = sorted(root.glob("*/*.png"))
        if files:
            return files
    missing("no sample PNGs (bundled or in MALARIA_SCREEN_DATA)")


def _patient_files(nih: Path, n_patients: int, per_patient: int, skip: int = 0) -> list[str]:
    """Files of ``n_patients`` infected patients (both classes), relative to ``nih``."""
    from malaria_screen.data.patients import parse_nih_patient_id

    by_p: dict[str, list[str]] = {}
    for cls in ("Parasitized", "Uninfected"):
        for f in sorted((nih / cls).iterdir())[:4000]:
            try:
                by_p.setdefault(parse_nih_patient_id(f.name), []).append(f"{cls}/{f.name}")
            except ValueError:
                continue
    mixed = sorted(p for p, fs in by_p.items() if len({f.split("/")[0] for f in fs}) == 2 and len(fs) >= per_patient)
    out = []
    for p in mixed[skip : skip + n_patients]:
        fs = by_p[p]
        par = [f for f in fs if f.startswith("Parasitized")][: per_patient // 2]
        uni = [f for f in fs if f.startswith("Uninfected")][: per_patient - len(par)]
        out += par + uni
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory, nih_dir) -> Path:
    """Run folder of a randomly initialised CellNet with a real (small) patient split."""
    import torch

    from malaria_screen.config import TrainConfig
    from malaria_screen.data.patients import patient_ids_from_names
    from malaria_screen.models import build_model
    from malaria_screen.models.weights import save_weights

    d = tmp_path_factory.mktemp("random_run")
    cfg = TrainConfig(model="cellnet", input_size=64, mean=(0.475, 0.383, 0.407), std=(0.352, 0.284, 0.301))
    torch.manual_seed(0)
    net = build_model("cellnet", num_classes=2, input_size=64)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so BN folding is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # spread the outputs over (0, 1) on real cells: logit difference ~ N(0, 1.5^2)
        from malaria_screen.data.io import decode_image
        from malaria_screen.data.preprocess import letterbox

        files = sorted((nih_dir / "Parasitized").iterdir())[:32] + sorted((nih_dir / "Uninfected").iterdir())[:32]
        x = torch.from_numpy(np.stack([letterbox(decode_image(f), 64) for f in files])).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
        net.eval()
        f = net.forward_head(net.forward_features(x), pre_logits=True)
        w = torch.randn(f.shape[1])
        z = f @ w
        w = w * 1.5 / z.std()
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.weight[0] = w
        net.classifier.bias[0] = -(f @ w).mean()
    save_weights(net, d / "weights.safetensors")
    cfg.to_json(d / "config.json")
    train = _patient_files(nih_dir, 6, 24)
    test = _patient_files(nih_dir, 3, 24, skip=6)
    splits = {}
    for name, files in (("train", train), ("val", []), ("test", test)):
        splits[name] = {"files": files, "patients": sorted(set(patient_ids_from_names(files))) if files else [],
                        "n_cells": len(files)}
    (d / "split.json").write_text(json.dumps({"seed": 0, "class_names": list(cfg.class_names), "splits": splits}))
    return d


@pytest.fixture(scope="session")
def onnx_fp32(random_run, tmp_path_factory) -> Path:
    from malaria_screen.export import export_onnx
    from malaria_screen.inference import Predictor

    return export_onnx(Predictor.from_dir(random_run), tmp_path_factory.mktemp("onnx") / "random.onnx")


@pytest.fixture(scope="session")
def onnx_int8(random_run, onnx_fp32, nih_dir) -> Path:
    from malaria_screen.export import load_split_cells, quantize_int8

    cal = load_split_cells(random_run / "split.json", nih_dir, "train", 64, n=96)
    return quantize_int8(onnx_fp32, onnx_fp32.with_name("random.int8.onnx"), cal.cells, calibration_info={"n_patients": cal.n_patients})


@pytest.fixture(scope="session")
def default_model_dir(missing) -> Path:
    from malaria_screen.inference import default_model_dir as dmd

    d = dmd()
    if not ((d / "config.json").is_file() and (d / "weights.safetensors").is_file()):
        missing(f"bundled default model not present at {d}")
    return d


@pytest.fixture(scope="session")
def real_cells(nih_dir) -> np.ndarray:
    """200 letterboxed real cells (64 px), both classes, for parity checks."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.data.preprocess import letterbox

    files = sorted((nih_dir / "Parasitized").iterdir())[:100] + sorted((nih_dir / "Uninfected").iterdir())[:100]
    return np.stack([letterbox(decode_image(f), 64) for f in files])


@pytest.fixture(scope="session")
def demo_field(missing) -> Path:
    """The bundled MIT-licensed thin-smear field (Chula-RBC-12), no malaria."""
    f = REPO / "src" / "malaria_screen" / "assets" / "demo_field" / "chula_rbc_1.jpg"
    if not f.is_file():
        missing("demo field not bundled")
    return f
