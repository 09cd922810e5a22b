"""Any image folder with N >= 2 classes trains and evaluates: scikit-learn's digits (10 classes)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from malaria_screen.cli import app
from malaria_screen.research.multiclass import multiclass_metrics

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("deterministic_torch")  # fixed threads, deterministic algorithms


def write_digits(root):
    """``load_digits`` (1,797 8x8 images, 10 classes) as ``<d>/<digit>/<i>.png`` plus a groups CSV.

    The bundled set has no writer ids, so images are grouped in blocks of 60 consecutive images
    (30 groups); splits keep each block on one side.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for i, (img, t) in enumerate(zip(d.images, d.target)):
        (root / "data" / str(t)).mkdir(parents=True, exist_ok=True)
        rel = f"{t}/{i:04d}.png"
        Image.fromarray((img * (255 / 16)).astype(np.uint8), mode="L").save(root / "data" / rel)
        rows.append({"path": rel, "patient": f"block{i // 60:02d}"})
    with open(root / "groups.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "patient"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """:func:`write_digits` into a module temporary folder (also used by benchmarks/bench_test_bounds.py)."""
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.slow  # 14 s in the last full run (2 cores)
def test_digits_train_one_epoch_beats_chance_on_held_out_groups(digits_dir, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(digits_dir / "data"), "--out", str(run), "--groups", str(digits_dir / "groups.csv"),
                              "--model", "cellnet", "--input-size", "32", "--epochs", "1", "--batch-size", "32",
                              "--no-augment", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_names"] == [str(i) for i in range(10)]
    m = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())["splits"]
    assert m["n_cells"] == split["test"]["n_cells"] and m["n_groups"] == split["test"]["n_patients"] >= 4
    assert not set(split["test"]["patients"]) & set(split["train"]["patients"])
    # Chance is 10 %. Bound from 10 seeds (the split of seed 0, seeds 0-9 for initialisation and
    # order; fixed threads, deterministic algorithms): accuracy min 0.917, mean 0.950 (seed 0
    # 0.922); lower CI end min 0.883, mean 0.930 (record test_bounds). Bounds: each minimum less a
    # 0.05 margin, rounded down.
    assert m["accuracy"] > 0.86 and m["ci95"]["accuracy"][0] > 0.83
    assert len(m["confusion_matrix"]) == 10
    print(f"digits, 1 epoch: test accuracy {m['accuracy']:.4f} {m['ci95']['accuracy']} on {m['n_groups']} groups, {m['n_cells']} images")


def test_multiclass_metrics_on_literal_arrays():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.9 + 0.1 / 3
    m = multiclass_metrics(y, p, ["a", "a", "b", "b", "c", "c"], n_boot=50)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert m["n_groups"] == 3 and 0 <= m["ci95"]["accuracy"][0] <= m["accuracy"] <= m["ci95"]["accuracy"][1] <= 1
    with pytest.raises(ValueError, match="disagree"):
        multiclass_metrics(y, p[:5], ["a"] * 6)
