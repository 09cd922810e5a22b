"""Fixtures for the deployment tests: real NIH cells, a random-weight run folder, its ONNX exports.

A randomly initialised CellNet is enough for parity tests (torch vs ONNX Runtime); accuracy
tests use the bundled default model and skip when it is absent. Real cells come from
``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root); tests that need
them skip when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "src" / "malaria_screen" / "assets" / "samples"


def data_root() -> Path:
    env = os.environ.get("MALARIA_SCREEN_DATA")
    return Path(env) if env else REPO / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def nih_dir(missing) -> Path:
    d = data_root() / "nih_cell_images"
    if not (d / "Parasitized").is_dir():
        missing(f"NIH cells not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture(scope="session")
def sample_pngs(missing) -> list[Path]:
    """The 24 original NIH PNGs: bundled samples, else the data folder's copy."""
    for root in (SAMPLES, data_root() / "nih_samples_png"):
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
    from malaria_screen.training.run import save_weights

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
