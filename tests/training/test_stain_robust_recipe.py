"""The stain-robust recipe end to end on real cells: HED batches, Chula negatives in training only, forced test patients."""

import json

from typer.testing import CliRunner

from malaria_screen.cli import app
from malaria_screen.config import TrainConfig
from malaria_screen.data.split import check_leak_free

PATIENTS = ["P1", "P3", "P4", "P5", "P6", "P7", "C1_thinF", "C3thin", "C4thin", "C2NThinF"]


def test_hed_chula_and_forced_test_patients(data_dir, nih_dir, tmp_path, make_subset):
    data = make_subset(nih_dir, tmp_path / "data", PATIENTS)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "64", "--val-fraction", "0.2",
        "--test-fraction", "0.3", "--color-augment", "hed", "--hed-sigma", "0.2", "--test-patients", "P4,C3thin",
        "--extra-negatives", str(data_dir / "chula_rbc"), "--extra-negative-fields", "1,2", "--limit-train-batches", "3",
        "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    cfg = TrainConfig.from_json(run / "config.json")
    assert cfg.color_augment == "hed" and cfg.hed_sigma == 0.2 and cfg.test_patients == ("C3thin", "P4")
    assert cfg.extra_negative_fields == ("1", "2")
    man = json.loads((run / "split.json").read_text())
    check_leak_free(man)  # patients re-derived from file names, Chula cells grouped by field
    s = man["splits"]
    assert {"P4", "C3thin"} <= set(s["test"]["patients"]) and man["forced_test_patients"] == ["C3thin", "P4"]
    assert {"chula_rbc:1", "chula_rbc:2"} <= set(s["train"]["patients"])
    for name in ("val", "test"):
        assert not any(":" in p for p in s[name]["patients"]) and not any("#" in f for f in s[name]["files"])
    assert man["extra_negatives"]["n_fields"] == 2 and man["extra_negatives"]["n_cells"] > 100
    m = json.loads((run / "metrics.json").read_text())
    assert m["split"] == "test" and m["n_patients"] == len(s["test"]["patients"])
