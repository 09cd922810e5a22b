"""The bundled default model loads and labels the bundled NIH sample PNGs."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

import malaria_screen
from malaria_screen.inference import default_model_dir


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
    assert m["split"] == "test" and m["n_patients"] >= 20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"] == "cellnet"
    assert (d / "weights.safetensors").stat().st_size < 400_000


def test_bundled_model_labels_the_samples(samples_dir):
    files, truth = _samples(samples_dir)
    assert len(files) == 24
    model = malaria_screen.load_model()
    p = model.predict(files)
    assert p.shape == (24,) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    pred = np.where(p >= model.threshold, "Parasitized", "Uninfected")
    correct = (pred == np.asarray(truth)).sum()
    assert correct >= 21, list(zip([f.name for f in files], p.round(3), truth))


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
