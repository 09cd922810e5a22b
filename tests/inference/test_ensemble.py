"""Model averaging (``malaria-screen ensemble``): real shipped models on the bundled NIH samples."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import malaria_screen
from malaria_screen.cli import app
from malaria_screen.data.patients import parse_nih_patient_id
from malaria_screen.inference import EnsemblePredictor, Predictor, default_model_dir, load_model
from malaria_screen.inference.ensemble import write_ensemble

REPO = Path(__file__).resolve().parents[2]
DEMO_FIELD = REPO / "src" / "malaria_screen" / "assets" / "demo_field" / "chula_rbc_1.jpg"


def _sample_files(samples_dir: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted((samples_dir / "Parasitized").glob("*.png")) + sorted((samples_dir / "Uninfected").glob("*.png"))
    y = np.asarray([f.parent.name == "Parasitized" for f in files])
    return files, y


@pytest.fixture()
def members(tmp_path) -> list[Path]:
    """The bundled PyTorch model and its bundled int8 ONNX export: two real, slightly different models."""
    int8 = tmp_path / "int8.onnx"
    shutil.copy2(default_model_dir() / "model.int8.onnx", int8)
    return [default_model_dir(), int8]


def test_ensemble_averages_its_members_and_travels_as_one_folder(tmp_path, members, samples_dir):
    files, _ = _sample_files(samples_dir)
    a, b = (load_model(m) for m in members)
    pa, pb = a.predict(files), b.predict(files)
    assert np.abs(pa - pb).max() > 1e-4  # int8 differs from fp32: the average is not trivially either
    ens = write_ensemble(tmp_path / "ens", members)
    assert isinstance(ens, EnsemblePredictor) and ens.backend == "ensemble:onnx+torch"
    np.testing.assert_allclose(ens.predict(files), (pa + pb) / 2, atol=1e-6)
    assert ens.threshold == pytest.approx((a.threshold + b.threshold) / 2)
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["threshold_rule"] == "mean of members" and len(spec["members"]) == 2
    # self-contained: moved elsewhere, it loads the same through the public entry point
    moved = tmp_path / "elsewhere" / "ens"
    moved.parent.mkdir()
    (tmp_path / "ens").rename(moved)
    again = malaria_screen.load_model(moved)
    np.testing.assert_allclose(again.predict(files), (pa + pb) / 2, atol=1e-6)
    # leak guard: every patient a member trained on is a seen patient of the ensemble
    man = json.loads((default_model_dir() / "split.json").read_text())
    assert set(man["splits"]["train"]["patients"]) <= set(again.seen_patients["train"])
    # per-file errors still work through the ensemble
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = list(again.predict_files([files[0], bad]))
    assert res[0].error is None and res[0].label in ("Parasitized", "Uninfected") and res[1].error


def test_calibrated_threshold_calls_as_many_cells_as_are_parasitized(tmp_path, members, samples_dir):
    files, y = _sample_files(samples_dir)
    probe = load_model(members[0])
    cells = np.stack([probe.prepare(f) for f in files])
    ens = write_ensemble(tmp_path / "ens", members, calibration=(cells, y))
    assert int((ens.predict(files) >= ens.threshold).sum()) == int(y.sum()) == 12
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["threshold_rule"] == "val-count" and spec["calibration"] == {"n_cells": 24, "n_parasitized": 12}


def test_ensemble_refuses_bad_members(tmp_path, members):
    with pytest.raises(ValueError, match="at least 2"):
        write_ensemble(tmp_path / "one", members[:1])
    with pytest.raises(FileNotFoundError):
        write_ensemble(tmp_path / "missing", [members[0], tmp_path / "nope"])
    other = tmp_path / "big"
    shutil.copytree(default_model_dir(), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"input_size": 96}))
    with pytest.raises(ValueError, match="members differ"):
        write_ensemble(tmp_path / "mixed", [members[0], other])
    assert not (tmp_path / "mixed").exists() or not any((tmp_path / "mixed").iterdir())
    write_ensemble(tmp_path / "ok", members)
    with pytest.raises(FileExistsError):
        write_ensemble(tmp_path / "ok", members)
    with pytest.raises(ValueError, match="ensemble"):
        Predictor.from_dir(tmp_path / "ok")
    with pytest.raises(ValueError, match="threshold"):
        write_ensemble(tmp_path / "thr", members, threshold=1.5)


def test_cli_ensemble_then_smear_uses_the_averaged_probabilities(tmp_path, members, samples_dir, nih_dir):
    runner = CliRunner()
    ens_dir = tmp_path / "ens"
    # calibration cells: the 24 samples (all of the bundled model's test patients) and 3 cells of
    # each class of one of its training patients, which must be left out
    calib = tmp_path / "calib"
    shutil.copytree(samples_dir, calib)
    train_patient = sorted(json.loads((default_model_dir() / "split.json").read_text())["splits"]["train"]["patients"])[0]
    for cls in ("Parasitized", "Uninfected"):
        seen = sorted(p for p in (nih_dir / cls).iterdir() if parse_nih_patient_id(p.name) == train_patient)
        for p in seen[:3]:
            shutil.copy2(p, calib / cls / p.name)
    r = runner.invoke(app, ["ensemble", *map(str, members), "--out", str(ens_dir), "--calibrate", str(calib)])
    assert r.exit_code == 0, r.output
    assert "count-matched on 24 cells" in r.output and "left out" in r.output, r.output
    r = runner.invoke(app, ["smear", str(DEMO_FIELD), "--model", str(ens_dir), "--out", str(tmp_path / "sm"), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "sm" / "chula_rbc_1.json").read_text())
    p = np.asarray([c["p_parasitized"] for c in doc["cells"]])
    assert doc["n_rbc"] > 50 and p.shape == (len(doc["cells"]),)
    # same cells screened by each member alone: the ensemble's probabilities are their mean
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.screen import screen_field

    rgb = decode_image(DEMO_FIELD)
    pm = [np.asarray([c.p_parasitized for c in screen_field(rgb, load_model(m)).cells]) for m in members]
    np.testing.assert_allclose(p, (pm[0] + pm[1]) / 2, atol=1e-5)
    thr = json.loads((ens_dir / "ensemble.json").read_text())["threshold"]
    assert doc["n_infected"] == int((p >= thr).sum())
    r = runner.invoke(app, ["ensemble", str(members[0]), "--out", str(tmp_path / "e1")])
    assert r.exit_code != 0 and "at least 2" in r.output


def test_rest_api_serves_an_ensemble(tmp_path, members, samples_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from malaria_screen.serve import create_app

    files, _ = _sample_files(samples_dir)
    ens = write_ensemble(tmp_path / "ens", members)
    c = TestClient(create_app(ens), base_url="http://localhost")  # the Host allow-list admits loopback names
    info = c.get("/v1/model").json()
    assert info["backend"] == "ensemble:onnx+torch" and info["config"]["threshold"] == pytest.approx(ens.threshold)
    r = c.post("/v1/classify", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files[:4]])
    assert r.status_code == 200, r.text
    got = [x["p_parasitized"] for x in r.json()["results"]]
    np.testing.assert_allclose(got, ens.predict(files[:4]), atol=1e-5)
