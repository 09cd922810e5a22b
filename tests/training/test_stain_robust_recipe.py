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


def test_synthetic_positives_join_training_only_and_a_resume_rebuilds_them(data_dir, nih_dir, tmp_path, make_subset):
    """`--synthetic-positives`: parasites of training patients pasted into Chula cells, in the training
    split only, grouped with their host field, left out of the prior, and rebuilt the same on --resume."""
    import numpy as np

    from malaria_screen.evaluation.quantify import params_from_model
    from malaria_screen.inference import load_model
    from malaria_screen.training.run import train

    data = make_subset(nih_dir, tmp_path / "data", PATIENTS)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "64", "--val-fraction", "0.2",
        "--test-fraction", "0.3", "--color-augment", "hed", "--hed-sigma", "0.2",
        "--extra-negatives", str(data_dir / "chula_rbc"), "--extra-negative-fields", "1,2", "--synthetic-positives", "1.0",
        "--limit-train-batches", "3", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    man = json.loads((run / "split.json").read_text())
    check_leak_free(man)  # a synthetic cell's patient is its host field
    s = man["splits"]
    syn = [f for f in s["train"]["files"] if f.endswith("+parasite")]
    n_extra = man["extra_negatives"]["n_cells"]
    assert len(syn) == man["synthetic_positives"]["n_cells"] and 0.8 * n_extra <= len(syn) <= n_extra
    assert all(f.removesuffix("+parasite") in s["train"]["files"] for f in syn)  # the host stays, Uninfected
    for name in ("val", "test"):
        assert not any("#" in f for f in s[name]["files"])
    n = s["train"]["n_per_class"]
    prior = params_from_model(load_model(run)).train_prior
    assert prior == (n["Parasitized"] - len(syn)) / (n["Parasitized"] + n["Uninfected"] - len(syn) - n_extra)

    cfg = TrainConfig.from_json(run / "config.json")
    assert cfg.synthetic_positives == 1.0
    again = train(data, run, resume=True, progress=False, cache_dir=tmp_path / "cache")
    rel = again.cells.relpaths
    got = sorted(rel[i] for i in again.split.train if rel[i].endswith("+parasite"))
    assert got == sorted(syn)
    first = {f: i for i, f in enumerate(rel)}
    pos = again.cells.class_names.index("Parasitized")
    for f in syn[:20]:  # a parasite was added: the copy is darker than its host somewhere, never lighter
        a, b = again.cells.images[first[f]].astype(int), again.cells.images[first[f.removesuffix("+parasite")]].astype(int)
        assert again.cells.labels[first[f]] == pos and (a <= b).all() and (b - a).max() >= 20
    assert np.isin(np.asarray([first[f] for f in syn]), again.split.train).all()
