"""Train and eval transforms (torchvision ``transforms.v2``) on ``(3, S, S) uint8`` cell tensors.

Augmentation follows seed 002/003 (flips, padded random crop) plus 90-degree rotations, which
are label-preserving for a round cell seen from above, and colour jitter (mild by default) for stain
variation; ``color_augment="stain"`` swaps the jitter for a strong stain augmentation meant for
training across microscopes and stains (strong HSV augmentation, Tellez et al. 2019, "Quantifying
the effects of data augmentation and stain color normalization in convolutional neural networks
for computational pathology", Medical Image Analysis 58).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2

from malaria_screen.config import COLOR_AUGMENTS

__all__ = ["COLOR_AUGMENTS", "RandomRot90", "RandomSaturation", "train_transform", "eval_transform", "normalize_batch"]


class RandomRot90(torch.nn.Module):
    """Rotate a ``(..., H, W)`` tensor by k x 90 degrees, k uniform in {0, 1, 2, 3}."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class RandomSaturation(torch.nn.Module):
    """Scale the saturation of a ``(3, H, W)`` uint8 image by a factor drawn log-uniformly from
    ``[1 / max_factor, max_factor]``: as likely to halve as to double it (torchvision's
    ``ColorJitter`` draws the factor uniformly, so a wide range would mostly saturate).

    Raises
    ------
    ValueError
        If ``max_factor`` < 1.
    """

    def __init__(self, max_factor: float) -> None:
        super().__init__()
        if max_factor < 1.0:
            raise ValueError(f"max_factor must be >= 1, got {max_factor}")
        self.log_max = math.log(max_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = math.exp(float(torch.empty(()).uniform_(-self.log_max, self.log_max)))
        return v2.functional.adjust_saturation(x, f)


def train_transform(
    size_px: int, mean: Sequence[float], std: Sequence[float], *, augment: bool = True, color_jitter: float = 0.1,
    color_augment: str = "jitter",
) -> v2.Compose:
    """Augment and normalise one cell: ``(3, S, S) uint8`` in, ``(3, S, S) float32`` out.

    Parameters
    ----------
    size_px : int
        Cell side in pixels; the padded random crop pads by ``size_px // 16`` with black.
    mean, std : sequence of 3 floats
        Per-channel statistics in [0, 1] units, computed on training patients.
    augment : bool, default=True
        False gives :func:`eval_transform`.
    color_jitter : float, default=0.1
        Brightness, contrast and saturation jitter ± this factor, hue ± a fifth of it; 0 disables
        (``color_augment="jitter"`` only).
    color_augment : {"jitter", "stain"}, default="jitter"
        ``"jitter"``: the colour jitter above. ``"stain"``: strong stain augmentation for a model
        that must work on other microscopes and stains (grey, pink and deep-magenta Giemsa fields
        of IML_Malaria): brightness ± 0.3, contrast ± 0.4, hue ± 0.08, saturation x [1/5, 5]
        log-uniform (:class:`RandomSaturation`), and 10 % of cells in grey.

    Raises
    ------
    ValueError
        If ``color_jitter`` is negative or ≥ 1 (hue jitter must stay ≤ 0.5), or ``color_augment``
        is unknown.
    """
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    if color_augment not in COLOR_AUGMENTS:
        raise ValueError(f"color_augment must be one of {COLOR_AUGMENTS}, got {color_augment!r}")
    if not augment:
        return eval_transform(mean, std)
    if color_augment == "stain":
        colour = [v2.ColorJitter(brightness=0.3, contrast=0.4, hue=0.08), RandomSaturation(5.0), v2.RandomGrayscale(p=0.1)]
    else:
        colour = [v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=color_jitter / 5)]
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
            v2.RandomCrop(size_px, padding=max(1, size_px // 16), fill=0),
            *colour,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalise without augmentation: ``(3, S, S)`` or ``(B, 3, S, S)`` uint8 in, float32 out."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def normalize_batch(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` (NHWC, as stored) to normalised ``(B, 3, H, W) float32``."""
    x = images_uint8.permute(0, 3, 1, 2)
    return eval_transform(mean, std)(x)
