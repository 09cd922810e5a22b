"""The torch back-end's device and precision options (issue 24 item 5), checked where CI runs: on the CPU."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from malaria_screen.cli import app
from malaria_screen.data.dataset import list_image_files
from malaria_screen.inference import load_model
from malaria_screen.inference.base import default_model_dir


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, samples_dir):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        load_model(backend="torch", device="cuda")
    res = CliRunner().invoke(app, ["predict", str(samples_dir), "--out", str(tmp_path / "r.csv"), "--backend", "torch",
                                   "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.output and not (tmp_path / "r.csv").exists()


def test_device_and_precision_need_the_torch_backend(tmp_path, samples_dir):
    res = CliRunner().invoke(app, ["predict", str(samples_dir), "--out", str(tmp_path / "r.csv"), "--precision", "16-mixed"])
    assert res.exit_code == 2 and "--backend torch" in res.output
    with pytest.raises(ValueError, match="precision must be one of"):
        load_model(backend="torch", precision="8")
    with pytest.raises(ValueError, match="not a torch device"):
        load_model(backend="torch", device="gpu:zero")


def test_mixed_precision_keeps_the_calls_of_float32(samples_dir):
    """bfloat16 autocast (the mixed precision a CPU has) on the bundled samples: same labels, close probabilities."""
    files = [str(f) for f in list_image_files([samples_dir])]
    p32 = load_model(default_model_dir(), backend="torch").predict(files)
    p16 = load_model(default_model_dir(), backend="torch", precision="bf16-mixed").predict(files)
    assert p32.dtype == p16.dtype == np.float32 and len(p32) == len(files) == 24
    assert np.abs(p32 - p16).max() < 0.05 and not np.array_equal(p32, p16)  # really ran in bfloat16
    assert ((p32 >= 0.5) == (p16 >= 0.5)).all()
