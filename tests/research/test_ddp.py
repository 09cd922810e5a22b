"""Two-process data-parallel training (Lightning DDP, gloo on CPU) on real cells; rank zero writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tiny_data import tiny_nih  # noqa: F401


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_nih, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, MALARIA_SCREEN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "malaria_screen.cli", "-v", "train", str(tiny_nih), "--out", str(run), "--model", "cellnet",
           "--input-size", "32", "--epochs", "1", "--batch-size", "32", "--devices", "2", "--strategy", "ddp",
           "--accelerator", "cpu", "--limit-train-batches", "4", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Starting with 2 processes" in out and "distributed_backend=gloo" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert out.count("trained cellnet in") == 1  # only rank zero evaluated and reported
    for name in ("weights.safetensors", "config.json", "split.json", "metrics.json", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert len(list((run / "tb").rglob("events.out.tfevents*"))) == 1
    assert json.loads((run / "train_info.json").read_text())["epochs_run"] == 1
    print(f"2-process DDP run: {seconds:.1f} s wall")
