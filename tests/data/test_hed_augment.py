"""HED stain augmentation (Tellez et al. 2019) on uint8 batches, checked against scikit-image."""

import numpy as np
import pytest
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

from malaria_screen.data.transforms import BatchAugment, hed_augment


def _cells(n: int = 6, s: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 250, (n, 3, s, s), generator=g, dtype=torch.uint8)
    x[:, :, :4, :] = 0  # black letterbox rows
    return x


def test_identity_stain_change_gives_the_input_back():
    x = _cells()
    out = hed_augment(x, torch.ones(6, 3), torch.zeros(6, 3))
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy() * 255, x.numpy().astype(np.float32), atol=0.05)


def test_matches_the_ruifrok_transform_with_scikit_image_matrices():
    # rgb2hed in scikit-image clips negative stain amounts (not invertible); the transform itself is
    # od = -ln(I); stains = od @ hed_from_rgb; od' = (alpha * stains + beta) @ rgb_from_hed; I' = exp(-od')
    x = _cells(2)
    alpha = torch.tensor([[1.1, 0.9, 1.0], [0.8, 1.2, 1.05]])
    beta = torch.tensor([[0.05, -0.05, 0.0], [-0.1, 0.1, 0.02]])
    ours = hed_augment(x, alpha, beta).numpy()
    for b in range(2):
        rgb = x[b].permute(1, 2, 0).numpy().astype(np.float64)
        stains = -np.log(np.maximum(rgb, 1) / 255.0) @ hed_from_rgb
        ref = np.clip(np.exp(-((stains * alpha[b].numpy() + beta[b].numpy()) @ rgb_from_hed)), 0, 1)
        ref[(rgb == 0).all(-1)] = 0
        np.testing.assert_allclose(ours[b].transpose(1, 2, 0), ref, atol=1e-4)


def test_more_haematoxylin_darkens_and_black_stays_black():
    x = _cells()
    base = hed_augment(x, torch.ones(6, 3), torch.zeros(6, 3))
    dark = hed_augment(x, torch.ones(6, 3), torch.tensor([[0.2, 0.0, 0.0]] * 6))
    assert (dark[:, :, 4:] <= base[:, :, 4:] + 1e-6).all() and dark[:, :, 4:].mean() < base[:, :, 4:].mean() - 0.02
    assert (dark[:, :, :4] == 0).all()


def test_batch_augment_is_seeded_varies_per_cell_and_keeps_a_uniform_cell_uniform():
    img = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    img[:, 0], img[:, 1], img[:, 2] = 170, 120, 150
    a = BatchAugment(32, (0.5,) * 3, (0.25,) * 3, hed_sigma=0.2, jitter=0.1, seed=3)(img)
    b = BatchAugment(32, (0.5,) * 3, (0.25,) * 3, hed_sigma=0.2, jitter=0.1, seed=3)(img)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    centre = a[:, :, 16, 16]
    assert centre.std(0).min() > 0.01  # every channel varies across cells
    none = BatchAugment(32, (0.5,) * 3, (0.25,) * 3, hed_sigma=0.0, jitter=0.0, seed=3)(img)
    assert torch.allclose(none[:, :, 16, 16], ((torch.tensor([170, 120, 150]) / 255 - 0.5) / 0.25).expand(8, 3), atol=1e-5)


def test_batch_augment_geometry_is_a_dihedral_map_plus_shift():
    x = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    x[:, :, 2, 3] = 255  # one bright pixel
    aug = BatchAugment(16, (0.0,) * 3, (1.0,) * 3, hed_sigma=0.0, jitter=0.0, seed=0)
    y = aug.geometric(x)
    assert y.shape == x.shape
    assert ((y > 0).sum(dim=(1, 2, 3)) <= 3).all()  # the pixel moves or is cropped off, never copied
    moved = {tuple(torch.nonzero(y[i, 0])[0].tolist()) for i in range(64) if y[i].any()}
    assert len(moved) > 4


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        hed_augment(torch.zeros(2, 3, 4, 4), torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        hed_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        BatchAugment(16, (0.5,) * 3, (0.25,) * 3, hed_sigma=1.5)


def test_training_batches_are_augmented_after_the_transfer_to_the_device(samples_dir):
    """Batched (HED) training: the loader serves uint8 batches and the DataModule's
    ``on_after_batch_transfer`` augments them where they are (on a GPU, on the GPU); on the CPU
    that is exactly BatchAugment on the loader's batch, and validation batches pass through."""
    from types import SimpleNamespace

    from malaria_screen.data.datamodule import CellDataModule
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.data.split import SplitIndices

    cells = load_cell_set(samples_dir, size_px=32)
    n = len(cells)
    split = SplitIndices(train=np.arange(n - 4), val=np.arange(n - 4, n), test=np.arange(n - 4, n))
    mean, std = (0.5,) * 3, (0.25,) * 3
    dm = CellDataModule(cells, split, mean, std, batch_size=8, color_augment="hed", hed_sigma=0.3, seed=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    dm.trainer = SimpleNamespace(training=True)
    got, y2 = dm.on_after_batch_transfer((x, y), 0)
    want = BatchAugment(32, mean, std, hed_sigma=0.3, jitter=0.1, seed=5)(x)
    assert torch.equal(got, want) and torch.equal(y, y2) and got.dtype == torch.float32
    dm.trainer = SimpleNamespace(training=False)
    v, _ = next(iter(dm.val_dataloader()))
    assert v.dtype == torch.float32 and dm.on_after_batch_transfer((v, y), 0)[0] is v


def test_blur_smooths_real_cells_inside_their_mask_only(samples_dir):
    """``blur_sigma``: the bundled sample cells lose high-frequency energy (a Laplacian's mean
    inside the cell), keep their mean colour and their black surround; the other draws (flips,
    crop, stain) are the same as without blur, and ``blur_sigma=0`` draws nothing."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.data.preprocess import letterbox

    files = sorted(samples_dir.glob("*/*.png"))
    x = torch.from_numpy(np.stack([letterbox(decode_image(f), 64) for f in files])).permute(0, 3, 1, 2).contiguous()
    unit = ((0.0,) * 3, (1 / 255,) * 3)  # outputs on the 0-255 scale
    plain = BatchAugment(64, *unit, hed_sigma=0.0, jitter=0.0, seed=3)(x)
    blurred = BatchAugment(64, *unit, hed_sigma=0.0, jitter=0.0, blur_sigma=2.0, seed=3)(x)
    black = (plain == 0).all(1)
    assert torch.equal((blurred == 0).all(1), black)
    inside = torch.nn.functional.max_pool2d(black[:, None].float(), 5, 1, 2)[:, 0] == 0  # away from the rim
    lap = torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]])

    def hf(t):
        return torch.nn.functional.conv2d(t.mean(1, keepdim=True), lap, padding=1).abs()[:, 0][inside].mean()

    assert hf(blurred) < 0.85 * hf(plain)
    assert abs(float(blurred.mean(1)[~black].mean() - plain.mean(1)[~black].mean())) < 2.0  # grey levels of 0-255
    zero = BatchAugment(64, *unit, hed_sigma=0.3, jitter=0.1, blur_sigma=0.0, seed=3)
    same = BatchAugment(64, *unit, hed_sigma=0.3, jitter=0.1, seed=3)
    assert torch.equal(zero(x), same(x))
    with pytest.raises(ValueError):
        BatchAugment(16, (0.5,) * 3, (0.25,) * 3, blur_sigma=5.0)
