"""Integration: train a tiny run on real cells of a few patients, resume it, evaluate, predict."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from malaria_screen.cli import app
from malaria_screen.data.split import check_leak_free

PATIENTS = ["P1", "P3", "P4", "P5", "P6", "P7", "C1_thinF", "C3thin", "C4thin", "C2NThinF"]

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("deterministic_torch")  # fixed threads, deterministic algorithms


@pytest.fixture(scope="module")
def tiny_run(nih_dir, tmp_path_factory, make_subset):
    tmp = tmp_path_factory.mktemp("tiny")
    data = make_subset(nih_dir, tmp / "data", PATIENTS)
    run = tmp / "run"
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--epochs", "4", "--batch-size", "32",
                              "--val-fraction", "0.2", "--test-fraction", "0.3", "--no-progress",
                              "--cache-dir", str(tmp / "cache")])
    assert res.exit_code == 0, res.output
    return data, run, res.output


def test_run_folder_is_complete(tiny_run):
    _, run, output = tiny_run
    for name in ("weights.safetensors", "config.json", "split.json", "metrics.json", "per_patient.csv", "predictions.csv",
                 "samples_grid.png", "training_curves.png", "confusion_matrix.png", "roc_curve.png", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert any((run / "tb").rglob("events.out.tfevents*"))
    assert (run / "csv" / "version_0" / "metrics.csv").exists()
    assert "Tip" not in output and "GPU available" not in output  # Lightning's chatter stays quiet
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "cellnet" and cfg["class_names"] == ["Parasitized", "Uninfected"]
    assert all(0 < m < 1 for m in cfg["mean"]) and all(0 < s < 1 for s in cfg["std"])
    manifest = json.loads((run / "split.json").read_text())
    check_leak_free(manifest)
    assert sum(v["n_patients"] for v in manifest["splits"].values()) == len(PATIENTS)
    m = json.loads((run / "metrics.json").read_text())
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert m[k] is not None and 0.0 <= m[k] <= 1.0, k
        lo, hi = m["ci95"][k]
        assert lo <= hi
    assert m["n_patients"] == manifest["splits"]["test"]["n_patients"]
    assert m["n_cells"] == manifest["splits"]["test"]["n_cells"]
    # Four epochs on 447 training cells (5 patients, 3 of them uninfected controls) separate the
    # classes on the 3 test patients (P1, P4, P5; 865 cells). Seed 0 gives the same ROC-AUC every run on a machine
    # (threads and algorithms fixed: conftest's deterministic_torch), but a thread count, a CPU or
    # a library version moves the weights as another seed would, so the bound comes from the seeds:
    # bound from 10 seeds (split of seed 0, seeds 0-9 for initialisation and order): min 0.673,
    # mean 0.782, seed 0 0.847 (record test_bounds); bound 0.62 = min less a 0.05 margin. With
    # --epochs 2, as before, the same 10 seeds gave 0.303 to 0.815 (3 of them under the old 0.70):
    # no bound above chance would hold, hence 4 epochs.
    assert m["roc_auc"] > 0.62
    assert "test:" in output and "accuracy" in output


def test_resume_continues_from_last_checkpoint(tiny_run):
    data, run, _ = tiny_run
    weights, metrics = (run / "weights.safetensors").read_bytes(), json.loads((run / "metrics.json").read_text())
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--epochs", "4", "--resume", "--no-progress"])
    # --resume reads the saved config (epochs=4): training is already complete, nothing to redo
    assert res.exit_code == 0, res.output
    info = json.loads((run / "train_info.json").read_text())
    assert info["epochs_run"] == 4
    # last.ckpt is the final epoch's, so nothing was retrained: the same weights and test metrics.
    # (It once was the best-val-loss epoch's, 2 of 0-3 here: the resume redid epoch 3.)
    assert (run / "weights.safetensors").read_bytes() == weights
    assert json.loads((run / "metrics.json").read_text())["roc_auc"] == metrics["roc_auc"]


def test_evaluate_leaves_out_training_patients(tiny_run, tmp_path):
    data, run, _ = tiny_run
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(data), "--model", str(run), "--out", str(out), "--n-boot", "200", "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    test_patients = json.loads((run / "split.json").read_text())["splits"]["test"]["patients"]
    assert m["n_patients"] == len(test_patients) and m["leaky"] is False
    with open(out / "per_patient.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["patient"] for r in rows) == sorted(test_patients)
    assert all(0 <= float(r["fraction_predicted_parasitized"]) <= 1 for r in rows)
    res = runner.invoke(app, ["evaluate", str(data), "--model", str(run), "--out", str(out), "--n-boot", "50",
                              "--include-train-patients", "--no-progress"])
    assert res.exit_code == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["leaky"] is True and m2["n_patients"] == len(PATIENTS)


def test_predict_with_bad_files(tiny_run, tmp_path):
    data, run, _ = tiny_run
    files = sorted((data / "Parasitized").iterdir())[:5]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.bin").write_bytes(b"not an image at all")
    out = tmp_path / "pred.json"
    res = runner.invoke(app, ["predict", *map(str, files), str(tmp_path / "empty.png"), str(tmp_path / "notes.bin"),
                              "--model", str(run), "--out", str(out)])
    assert res.exit_code == 1  # some files failed
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 7
    good, bad = rows[:5], rows[5:]
    assert all(r["error"] is None and 0 <= r["p_parasitized"] <= 1 and r["label"] in ("Parasitized", "Uninfected") for r in good)
    assert "empty" in bad[0]["error"] and "not a recognised image" in bad[1]["error"]
    assert all(r["label"] is None for r in bad)
    from malaria_screen import load_model

    p = load_model(run).predict(files)
    np.testing.assert_allclose(p, [r["p_parasitized"] for r in good], atol=1e-6)


@pytest.mark.slow
def test_init_from_fine_tunes_the_default_model(nih_dir, tmp_path, make_subset):
    """--init-from default: training starts from the bundled model's weights and normalisation."""
    import torch
    from safetensors.torch import load_file

    from malaria_screen.config import TrainConfig
    from malaria_screen.inference.base import default_model_dir

    data = make_subset(nih_dir, tmp_path / "data", PATIENTS)
    run = tmp_path / "ft"
    # One batch at a vanishing learning rate: the parameters stay the default model's.
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "16",
                              "--lr", "1e-12", "--limit-train-batches", "1", "--val-fraction", "0.2",
                              "--test-fraction", "0.3", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                              "--init-from", "default", "--threshold-rule", "val-count", "--color-augment", "stain"])
    assert res.exit_code == 0, res.output
    base = TrainConfig.from_json(default_model_dir() / "config.json")
    cfg = TrainConfig.from_json(run / "config.json")
    assert cfg.mean == base.mean and cfg.std == base.std and cfg.init_from == str(default_model_dir())
    assert cfg.color_augment == "stain"
    # val-count threshold: as many validation cells called Parasitized as are (ties aside)
    import re

    called, total, truth = map(int, re.search(r"(\d+) of (\d+) validation cells called Parasitized \((\d+) are\)",
                                              res.output).groups())
    assert called == truth > 0 and cfg.threshold != 0.5
    w0 = load_file(str(default_model_dir() / "weights.safetensors"))
    w1 = load_file(str(run / "weights.safetensors"))
    params = [k for k in w0 if k.endswith(".weight") and w0[k].ndim > 1]
    assert params and all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in params)
    # Another architecture cannot start from it.
    bad = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "bad"), "--model", "bn_cnn", "--epochs", "1",
                              "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--init-from", "default"])
    assert bad.exit_code != 0 and "model" in bad.output


@pytest.mark.slow
def test_adaptation_path_nih_plus_field_crops(data_dir, nih_dir, tmp_path, make_subset):
    """crops --source detections + NIH cells in one folder, --init-from default, val-count threshold
    calibrated on the listed (field) crops only."""
    import re

    from malaria_screen.data.patients import read_groups_csv
    from malaria_screen.smear.crop_export import export_detection_crops
    from malaria_screen.smear.labels import load_iml_annotations

    iml = data_dir / "iml_malaria_dev"
    ann = load_iml_annotations(iml / "annotations.json")
    with_inf = [n for n in sorted(ann) if any(b.infected for b in ann[n])][:8]
    data = make_subset(nih_dir, tmp_path / "mix", PATIENTS[:6])
    s = export_detection_crops(iml / "images", {n: ann[n] for n in with_inf}, data)
    assert s.n_parasitized >= 8
    listed = read_groups_csv(data / "groups.csv")
    res = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "64",
                              "--limit-train-batches", "3", "--val-fraction", "0.25", "--test-fraction", "0.25",
                              "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--groups", str(data / "groups.csv"),
                              "--init-from", "default", "--threshold-rule", "val-count"])
    assert res.exit_code == 0, res.output
    called, total, truth = map(int, re.search(r"(\d+) of (\d+) validation cells called Parasitized \((\d+) are\)",
                                              res.output).groups())
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    val_files = split["splits"]["val"]["files"]
    assert total == sum(f in listed for f in val_files) < len(val_files)  # field crops only, not the NIH cells
    print(f"adaptation path: {called} of {total} validation field crops called Parasitized ({truth} are)")
    # The val-count threshold is the truth-th largest probability of these crops, so the count is
    # matched by construction: measured here 4 of 263 called, 4 are (2026-12-02, this commit's
    # bundled model and segmentation). Only tied probabilities (e.g. saturated at 1.0, where the
    # threshold is clamped to 1 - 1e-6) could call more: margin one tied crop, none below.
    assert truth > 0 and truth <= called <= truth + 1
