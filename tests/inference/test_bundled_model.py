"""The bundled default model loads and labels the bundled NIH sample PNGs."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

import malaria_screen
from malaria_screen.inference import default_model_dir

REPO = Path(__file__).resolve().parents[2]


def _samples(samples_dir: Path):
    files, truth = [], []
    for cls in ("Parasitized", "Uninfected"):
        for f in sorted((samples_dir / cls).glob("*.png")):
            files.append(f)
            truth.append(cls)
    return files, truth


def test_bundled_model_folder_is_complete():
    d = default_model_dir()
    for name in ("config.json", "weights.safetensors", "metrics.json", "split.json"):
        assert (d / name).exists(), name
    m = json.loads((d / "metrics.json").read_text())
    test = json.loads((d / "split.json").read_text())["splits"]["test"]
    assert m["split"] == "test" and m["n_patients"] == len(test["patients"]) and m["n_cells"] == test["n_cells"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"] == "cellnet"
    assert (d / "weights.safetensors").stat().st_size < 400_000


def _model_card_record() -> dict:
    """The bundled model's benchmark record (benchmarks/bench_model_card.py), checked to be made with these weights."""
    import hashlib

    rec = json.loads((REPO / "benchmarks" / "results" / "model_card.json").read_text())
    sha = hashlib.sha256((default_model_dir() / "weights.safetensors").read_bytes()).hexdigest()
    assert rec["bundled_model_sha256"] == sha, "model_card.json was made with other weights: rerun bench_model_card.py"
    return rec["figures"]


def _held_out(files) -> np.ndarray:
    from malaria_screen.data.patients import parse_nih_patient_id

    split = json.loads((default_model_dir() / "split.json").read_text())["splits"]
    seen = set(split["train"]["patients"]) | set(split["val"]["patients"])
    return np.asarray([parse_nih_patient_id(f.name) not in seen for f in files])


def test_samples_are_the_original_pngs_and_the_held_out_ones_span_both_classes(samples_dir, data_dir):
    # Only the 24 original PNGs may be bundled (../shared/data/README.md): byte-identical copies.
    files, truth = _samples(samples_dir)
    assert len(files) == 24
    for f in files:
        assert f.read_bytes() == (data_dir / "nih_samples_png" / f.parent.name / f.name).read_bytes(), f.name
    held = _held_out(files)
    rec = _model_card_record()
    assert int(held.sum()) == rec["samples.n_held_out"] and {t for t, h in zip(truth, held) if h} == {"Parasitized", "Uninfected"}


def test_bundled_model_labels_the_held_out_samples_as_recorded(samples_dir):
    files, truth = _samples(samples_dir)
    model = malaria_screen.load_model()
    p = model.predict(files)
    assert p.shape == (24,) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    pred = np.where(p >= model.threshold, "Parasitized", "Uninfected")
    held = _held_out(files)
    correct = int((pred == np.asarray(truth))[held].sum())
    assert correct == _model_card_record()["samples.k_right_held_out"], list(zip([f.name for f in files], p.round(3), truth))


def test_demo_table_shows_truth_and_scores_only_held_out_samples(samples_dir, tmp_path):
    from typer.testing import CliRunner

    from malaria_screen.cli import app

    res = CliRunner().invoke(app, ["predict", str(samples_dir), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert "true (folder)" in res.output
    rec = _model_card_record()
    k, h = rec["samples.k_right_held_out"], rec["samples.n_held_out"]
    # issue 21: every bundled sample comes from the bundled model's test patients (>= 8, both classes)
    assert h == 24 and rec["samples.n_held_out_patients"] >= 8
    assert res.output.rstrip().splitlines()[-1] == f"{k} of 24 right, held-out patients"


def test_api_accepts_paths_pil_and_arrays(samples_dir):
    files, _ = _samples(samples_dir)
    model = malaria_screen.load_model()
    p_path = model.predict(files[:3])
    p_pil = model.predict([Image.open(f) for f in files[:3]])
    p_arr = model.predict([np.asarray(Image.open(f).convert("RGB")) for f in files[:3]])
    p_bytes = model.predict([f.read_bytes() for f in files[:3]])
    np.testing.assert_allclose(p_path, p_pil, atol=1e-6)
    np.testing.assert_allclose(p_path, p_arr, atol=1e-6)
    np.testing.assert_allclose(p_path, p_bytes, atol=1e-6)
    assert model.predict(files[0]).shape == (1,)
