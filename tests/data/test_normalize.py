"""One input normalisation: every path (training transforms, batched augmentation, Predictor,
Grad-CAM, ONNX export, feature sweeps) gives the network the same floats."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from malaria_screen.data.normalize import normalize_pixels, pixel_affine  # noqa: E402

MEAN, STD = (0.5294, 0.4236, 0.4530), (0.3313, 0.2680, 0.2823)  # NIH-like statistics


def _all_values() -> torch.Tensor:
    """(2, 3, 16, 16) uint8 holding every value 0..255 in every channel."""
    v = torch.arange(256, dtype=torch.uint8).view(16, 16)
    return torch.stack([v, v.flip(0), v.T]).expand(2, 3, 16, 16).contiguous()


def test_the_affine_is_the_textbook_normalisation_to_float32_rounding():
    x = _all_values()
    got = normalize_pixels(x, MEAN, STD).double()
    exact = (x.double() / 255.0 - torch.tensor(MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(
        STD, dtype=torch.float64)[:, None, None]
    assert got.dtype == torch.float64 and (got - exact).abs().max() < 2e-6
    assert normalize_pixels(x, MEAN, STD).dtype == torch.float32
    assert torch.equal(normalize_pixels(x.float(), MEAN, STD), normalize_pixels(x, MEAN, STD))


def test_training_inference_and_onnx_use_the_same_floats(tmp_path):
    from malaria_screen.config import TrainConfig
    from malaria_screen.data.transforms import BatchAugment, eval_transform, train_transform
    onnx = pytest.importorskip("onnx")

    from malaria_screen.export.onnx import export_onnx
    from malaria_screen.inference.predictor import Predictor
    from malaria_screen.models import build_model

    x = _all_values()
    ref = normalize_pixels(x, MEAN, STD)
    assert torch.equal(eval_transform(MEAN, STD)(x), ref)
    assert torch.equal(train_transform(16, MEAN, STD, augment=False)(x[0]), ref[0])
    # BatchAugment without colour augmentation: its float colours go back to 0..255 first
    moved = BatchAugment(16, MEAN, STD, hed_sigma=0.0, jitter=0.0, seed=0).geometric(x)
    batch = BatchAugment(16, MEAN, STD, hed_sigma=0.0, jitter=0.0, seed=0)(x)
    assert torch.allclose(batch, normalize_pixels(moved, MEAN, STD), rtol=0, atol=1e-5)
    # Predictor: the network sees exactly normalize_pixels of the NCHW cells
    cfg = TrainConfig(model="cellnet", input_size=16, mean=MEAN, std=STD, class_names=("Parasitized", "Uninfected"))
    net = build_model(cfg.model, num_classes=2, input_size=16)
    seen = []
    net.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].clone()))
    Predictor(net, cfg).predict_proba_prepared(x.permute(0, 2, 3, 1).numpy())
    assert torch.equal(seen[0], ref)
    # ONNX: the same float32 constants, tiled along each row of S pixels
    model = onnx.load(export_onnx(Predictor(net, cfg), tmp_path / "m.onnx"))
    rows = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.dims == [48]]
    offset, scale = pixel_affine(MEAN, STD)
    assert len(rows) == 2
    assert {r.tobytes() for r in rows} == {offset.repeat(16).numpy().tobytes(), scale.repeat(16).numpy().tobytes()}


def test_bad_statistics_or_shapes_raise():
    with pytest.raises(ValueError):
        pixel_affine((0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError):
        pixel_affine((0.5,) * 3, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError):
        normalize_pixels(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), MEAN, STD)  # channels last
    assert np.isfinite(normalize_pixels(torch.zeros(3, 4, 4), MEAN, STD).numpy()).all()
