"""Grad-CAM: maps have the right geometry, follow the definition, and point at the parasite."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_maps_match_the_definition_and_overlay_geometry(random_run, sample_pngs):
    from malaria_screen.data.io import decode_image
    from malaria_screen.data.preprocess import letterbox
    from malaria_screen.inference import Predictor
    from malaria_screen.inference.gradcam import explain, gradcam

    pt = Predictor.from_dir(random_run)
    rgbs = [decode_image(p) for p in sample_pngs[:4]]
    cells = np.stack([letterbox(r, 64) for r in rgbs])
    cams, probs = gradcam(pt, cells, class_index=0)
    assert cams.shape == (4, 64, 64) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    np.testing.assert_allclose(probs, pt.predict_proba_prepared(cells), atol=1e-5)
    # by hand for cell 0: alpha_k = mean grad of logit 0 wrt A^k, cam = relu(sum_k alpha_k A^k)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (pt.config.mean, pt.config.std))
    x = (torch.from_numpy(cells[:1]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    a = pt.net.forward_features(x).detach().requires_grad_(True)
    pt.net.forward_head(a)[0, 0].backward()
    coarse = torch.relu((a.grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    up = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    expected = (up / up.max()).detach().numpy() if up.max() > 0 else np.zeros((64, 64), np.float32)
    np.testing.assert_allclose(cams[0], expected, atol=1e-5)
    ex = explain(pt, sample_pngs[:4])
    for e, rgb in zip(ex, rgbs):
        assert e.overlay.shape == rgb.shape and e.overlay.dtype == np.uint8
        assert e.label in pt.class_names and 0.0 <= e.p_parasitized <= 1.0


def test_overlay_of_a_huge_image_is_shrunk_not_blended_at_full_size(sample_pngs):
    """A 6000 x 3000 px 'cell' (a field or a scan passed by mistake): the overlay is bounded by
    ``max_side`` with the aspect ratio kept, and equals the full-size overlay shrunk alike
    (so nothing but the size changes); small images keep their size."""
    from PIL import Image

    from malaria_screen.data.io import decode_image
    from malaria_screen.inference.gradcam import overlay_heatmap

    cell = decode_image(sample_pngs[0])
    big = np.asarray(Image.fromarray(cell).resize((6000, 3000), Image.Resampling.NEAREST))
    cam = np.linspace(0, 1, 96 * 96, dtype=np.float32).reshape(96, 96)
    small = overlay_heatmap(big, cam, max_side=512)
    assert small.shape == (256, 512, 3) and small.dtype == np.uint8
    full = overlay_heatmap(big, cam, max_side=None)
    assert full.shape == big.shape
    ref = np.asarray(Image.fromarray(full).resize((512, 256), Image.Resampling.BOX)).astype(int)
    assert np.abs(small.astype(int) - ref).mean() < 3.0
    assert overlay_heatmap(cell, cam).shape == cell.shape
    with pytest.raises(ValueError):
        overlay_heatmap(cell, cam, max_side=0)


def test_onnx_model_cannot_explain(onnx_fp32):
    from malaria_screen.inference import OnnxPredictor
    from malaria_screen.inference.gradcam import gradcam

    with pytest.raises(TypeError, match="PyTorch"):
        gradcam(OnnxPredictor.from_file(onnx_fp32), np.zeros((1, 64, 64, 3), np.uint8))


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        m = mask.copy()
        m[1:] &= mask[:-1]
        m[:-1] &= mask[1:]
        m[:, 1:] &= mask[:, :-1]
        m[:, :-1] &= mask[:, 1:]
        mask = m
    return mask


def test_trained_model_looks_at_the_stained_parasite(default_model_dir, sample_pngs):
    """On the Parasitized samples the model calls Parasitized, Grad-CAM concentrates on the
    Giemsa-stained chromatin: the most purple 3 % of the cell's interior ((R + B) / 2 - G)."""
    from malaria_screen.data.preprocess import letterbox
    from malaria_screen.inference import Predictor
    from malaria_screen.inference.gradcam import explain

    pt = Predictor.from_dir(default_model_dir)
    par = [p for p in sample_pngs if p.parent.name == "Parasitized"]
    ratios, near = [], []
    for e in explain(pt, par):
        if e.label != "Parasitized":
            continue
        c = letterbox(e.rgb, pt.input_size).astype(np.float32)
        cell = c.mean(-1) > 20  # not the black padding
        inner = _erode(cell, 3)  # away from the dark rim against the padding
        purple = (c[..., 0] + c[..., 2]) / 2 - c[..., 1]
        stain = inner & (purple >= np.percentile(purple[inner], 97))
        ratios.append(e.cam[stain].mean() / e.cam[cell].mean())
        py, px = np.unravel_index(e.cam.argmax(), e.cam.shape)
        sy, sx = np.nonzero(stain)
        near.append(np.hypot(sy - py, sx - px).min() <= 5.0)  # peak within 5 px (of 64) of stain
    assert len(ratios) >= 9
    assert np.median(ratios) > 3.0, ratios
    assert np.mean(near) >= 0.75, near


def test_overlay_colours_are_matplotlibs_jet():
    """Where the map is 1 and ``alpha`` is 1 the overlay is jet's top colour (dark red); where it
    is 0 it is a quarter of jet's bottom colour (dark blue) over the image."""
    import matplotlib

    from malaria_screen.inference.gradcam import overlay_heatmap

    grey = np.full((32, 32, 3), 200, np.uint8)
    top = overlay_heatmap(grey, np.ones((16, 16), np.float32), alpha=1.0)
    jet = matplotlib.colormaps["jet"]
    np.testing.assert_array_equal(top[5, 5], jet(1.0, bytes=True)[:3])
    bottom = overlay_heatmap(grey, np.zeros((16, 16), np.float32), alpha=1.0).astype(int)
    expected = (200 * 0.75 + 0.25 * np.array(jet(0.0, bytes=True)[:3]) + 0.5).astype(int)
    np.testing.assert_array_equal(bottom[5, 5], expected)
