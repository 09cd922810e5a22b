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


def _saturations(t, n: int = 200) -> torch.Tensor:
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[0], img[1], img[2] = 170, 120, 150
    out = torch.stack([t(img)[:, 16, 16] for _ in range(n)]) * 0.25 + 0.5  # back to [0, 1]
    return out.max(dim=1).values - out.min(dim=1).values  # chroma of the centre pixel


def test_stain_augment_desaturates_and_oversaturates():
    """The 'stain' recipe spans grey to deep-magenta cells; mild jitter stays near the input."""
    stats = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    orig = (170 - 120) / 255
    mild = _saturations(train_transform(32, *stats, color_jitter=0.1))
    stain = _saturations(train_transform(32, *stats, color_augment="stain"))
    assert (stain < 0.02).float().mean() >= 0.05  # grey cells (RandomGrayscale, strong desaturation)
    assert (stain > 1.5 * orig).float().mean() >= 0.1  # far more saturated than the input
    assert mild.min() > 0.5 * orig and mild.max() < 1.5 * orig


def test_random_saturation_is_log_uniform_both_ways():
    from malaria_screen.data.transforms import RandomSaturation

    torch.manual_seed(0)
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    img[0], img[1], img[2] = 150, 110, 130
    t = RandomSaturation(4.0)
    chroma = torch.stack([t(img)[:, 4, 4].float() for _ in range(400)])
    chroma = chroma.max(dim=1).values - chroma.min(dim=1).values
    below, above = (chroma < 40).float().mean(), (chroma > 40).float().mean()
    assert 0.35 < below < 0.65 and 0.35 < above < 0.65  # as likely to halve as to double
    with pytest.raises(ValueError, match="max_factor"):
        RandomSaturation(0.5)


def test_unknown_color_augment_raises():
    with pytest.raises(ValueError, match="color_augment"):
        train_transform(32, (0.5,) * 3, (0.25,) * 3, color_augment="hed")
