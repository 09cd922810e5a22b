"""Training augmentation: colour jitter strength."""

import pytest
import torch

from malaria_screen.data.transforms import train_transform


def _centre_values(color_jitter: float, n: int = 24) -> torch.Tensor:
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[0], img[1], img[2] = 170, 120, 150  # one pink-grey cell colour everywhere
    t = train_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), color_jitter=color_jitter)
    return torch.stack([t(img)[:, 16, 16] for _ in range(n)])


def test_no_colour_jitter_keeps_colour_strong_jitter_varies_it():
    still = _centre_values(0.0)
    assert torch.allclose(still, still[0].expand_as(still))  # flips/rotations/crop keep a uniform colour
    mild, strong = _centre_values(0.1), _centre_values(0.5)
    assert strong.std(dim=0).mean() > mild.std(dim=0).mean() > 0


def test_colour_jitter_out_of_range_raises():
    with pytest.raises(ValueError, match="color_jitter"):
        train_transform(32, (0.5,) * 3, (0.25,) * 3, color_jitter=-0.1)
