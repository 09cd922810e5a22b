"""Weight averaging (``train --weight-average-from``: SWA over the last steps) on real NIH cells."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from malaria_screen.cli import app
from malaria_screen.config import TrainConfig

PATIENTS = ["P1", "P3", "P4", "P5", "P6", "P7", "C1_thinF", "C3thin", "C4thin", "C2NThinF"]


def _train(data, run, cache, *extra):
    return CliRunner().invoke(app, [
        "train", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "64", "--val-fraction", "0.2",
        "--test-fraction", "0.3", "--limit-train-batches", "3", "--no-progress", "--cache-dir", str(cache), *extra])


@pytest.fixture(scope="module")
def runs(nih_dir, tmp_path_factory, make_subset):
    root = tmp_path_factory.mktemp("swa")
    data = make_subset(nih_dir, root / "data", PATIENTS)
    out = {}
    for name, extra in (("plain", ()), ("swa", ("--weight-average-from", "0.5"))):
        res = _train(data, root / name, root / "cache", *extra)
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


def test_the_run_keeps_the_average_of_the_steps_after_the_start(runs):
    run = runs["swa"]
    assert TrainConfig.from_json(run / "config.json").weight_average_from == 0.5
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 2 epochs x 3 batches: steps 3, 4 and 5 (0-based) are averaged, the first epoch's are not
    assert int(last["averaging_state"]["n_averaged"]) == 3
    avg, current = last["state_dict"], last["current_model_state"]
    assert avg.keys() == current.keys()
    assert any(not torch.equal(avg[k], current[k]) for k in avg if avg[k].is_floating_point())
    # the kept weights are the checkpoint the validation loss chose, and that is the average
    info = json.loads((run / "train_info.json").read_text())
    best = torch.load(run / "checkpoints" / info["best_checkpoint"], map_location="cpu", weights_only=True)
    kept = load_file(run / "weights.safetensors")
    for k, v in kept.items():
        assert torch.equal(v, best["state_dict"]["net." + k])
    if "current_model_state" in best:  # chosen after averaging started (else: the first epoch's own weights)
        assert all(torch.equal(kept[k], avg["net." + k]) for k in kept)


def test_averaging_changes_the_weights_of_the_same_seed(runs):
    plain = load_file(runs["plain"] / "weights.safetensors")
    swa = load_file(runs["swa"] / "weights.safetensors")
    assert plain.keys() == swa.keys()
    assert any(not torch.equal(plain[k], swa[k]) for k in plain if plain[k].is_floating_point())
    assert "averaging_state" not in torch.load(runs["plain"] / "checkpoints" / "last.ckpt", map_location="cpu",
                                               weights_only=True)


def test_weight_average_from_is_validated():
    with pytest.raises(ValueError, match="weight_average_from"):
        TrainConfig(weight_average_from=1.0)
    assert TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k != "weight_average_from"}
                                 ).weight_average_from is None  # configs saved before the option still load
