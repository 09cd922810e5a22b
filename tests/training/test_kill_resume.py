"""A real SIGKILL of `malaria-screen train` mid-run, then `--resume` in a new process: the run
finishes on the same patient split, continuing from the last checkpoint instead of restarting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer_text import flat
import torch

# 6 patients, 568 cells (3 infected patients with cells of both classes, 3 uninfected controls)
PATIENTS = ["P1", "P6", "P7", "C1_thinF", "C3thin", "C4thin"]

pytestmark = pytest.mark.slow


def _train(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # torch's intra-op threads: fixed, as in the in-process tests
    return subprocess.Popen([sys.executable, "-m", "malaria_screen.cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(ckpt, proc, timeout_s=600.0):
    """Block until ``ckpt`` exists and its size has stopped changing (written whole)."""
    t0, size = time.monotonic(), -1
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            pytest.fail(f"train ended (exit {proc.returncode}) before the first checkpoint:\n{proc.stdout.read()}")
        if ckpt.is_file():
            now = ckpt.stat().st_size
            if now == size and now > 0:
                return
            size = now
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no checkpoint at {ckpt} after {timeout_s} s")


def test_sigkill_mid_run_then_resume_finishes_on_the_same_split(nih_dir, tmp_path, make_subset):
    data = make_subset(nih_dir, tmp_path / "data", PATIENTS)
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--no-progress", "--cache-dir", str(cache)]
    proc = _train([str(data), "--out", str(run), "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.2",
                   "--test-fraction", "0.3", *common], tmp_path)
    _wait_for_checkpoint(run / "checkpoints" / "last.ckpt", proc)  # epoch 1 done: epoch 2 is running
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out  # killed, not finished
    assert not (run / "weights.safetensors").exists() and not (run / "train_info.json").exists()
    killed_at = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 2  # the last epoch never completed
    split_before = (run / "split.json").read_bytes()

    fresh = _train([str(data), "--out", str(run), *common], tmp_path)  # a new run into it would mix with this one
    out, _ = fresh.communicate(timeout=300)
    assert fresh.returncode == 2 and "already holds a training run" in flat(out), out
    res = _train([str(data), "--out", str(run), "--resume", "--lr", "0.5", *common], tmp_path)
    out, _ = res.communicate(timeout=900)
    assert res.returncode == 0, out
    assert "ignored: --lr" in flat(out)  # the run continues as its config.json says
    assert (run / "split.json").read_bytes() == split_before
    info = json.loads((run / "train_info.json").read_text())
    assert info["epochs_run"] == 3
    # The resumed process logged only the epochs after the checkpoint (a restart would log epoch 0 again).
    versions = sorted((run / "csv").glob("version_*/metrics.csv"))
    assert len(versions) == 2
    epochs_col = versions[1].read_text().splitlines()[0].split(",").index("epoch")
    resumed_epochs = {int(float(r.split(",")[epochs_col])) for r in versions[1].read_text().splitlines()[1:]
                      if r.split(",")[epochs_col]}
    assert resumed_epochs and min(resumed_epochs) == killed_at + 1, resumed_epochs
    m = json.loads((run / "metrics.json").read_text())
    test = json.loads(split_before)["splits"]["test"]
    assert m["n_patients"] == test["n_patients"] and m["n_cells"] == test["n_cells"]
    print(f"killed after epoch {killed_at}; resumed: ROC-AUC {m['roc_auc']:.4f} on {m['n_patients']} test patients")
    # Bound from 10 seeds of this run uninterrupted (split of seed 0, seeds 0-9 for initialisation
    # and order): min 0.805, mean 0.903 (record test_bounds, kill_resume). Killed after epoch 0
    # and resumed, seed 0 gave 0.787 here (2026-12-02): the resumed epochs draw their data order
    # afresh, as another seed would. Bound: the lower of the two less a 0.05 margin.
    assert m["roc_auc"] > 0.73
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the resumed process saved its own checkpoints past the killed one (Lightning's last save after
    # the final epoch stores the epoch counter already advanced: 3 here, measured)
    assert ckpt["epoch"] >= 2 > killed_at


def test_weight_averaging_survives_a_sigkill_and_resume(nih_dir, tmp_path, make_subset):
    """``--weight-average-from 0``: every step is averaged; after a SIGKILL and ``--resume`` the
    average holds every step of both processes (restarted, it would count only the resumed ones)."""
    data = make_subset(nih_dir, tmp_path / "data", PATIENTS)
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--no-progress", "--cache-dir", str(cache)]
    proc = _train([str(data), "--out", str(run), "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.2",
                   "--test-fraction", "0.3", "--weight-average-from", "0", *common], tmp_path)
    _wait_for_checkpoint(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    killed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert killed["epoch"] < 2 and int(killed["averaging_state"]["n_averaged"]) == killed["global_step"] > 0

    res = _train([str(data), "--out", str(run), "--resume", *common], tmp_path)
    out, _ = res.communicate(timeout=900)
    assert res.returncode == 0, out
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] > killed["global_step"]
    assert int(final["averaging_state"]["n_averaged"]) == final["global_step"]
    # the kept weights are a checkpoint's average (every checkpoint of this run holds one)
    from safetensors.torch import load_file

    info = json.loads((run / "train_info.json").read_text())
    best = torch.load(run / "checkpoints" / info["best_checkpoint"], map_location="cpu", weights_only=True)
    assert "current_model_state" in best
    kept = load_file(run / "weights.safetensors")
    assert all(torch.equal(v, best["state_dict"]["net." + k]) for k, v in kept.items())
