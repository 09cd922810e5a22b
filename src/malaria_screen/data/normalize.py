"""The network's input normalisation: one definition for training, inference, Grad-CAM and ONNX.

A cell reaches the network as pixel values ``v`` in 0..255 (uint8, or float after augmentation)
and is normalised per channel with the training patients' ``mean`` and ``std`` (in [0, 1] units,
:class:`~malaria_screen.config.TrainConfig`) as one affine map,

    ``x = (v - offset) * scale``,  ``offset = 255 mean``,  ``scale = 1 / (255 std)``,

with both constants float32 and computed as :func:`pixel_affine` does, subtraction first. This
equals ``(v / 255 - mean) / std`` up to float32 rounding, without a division per pixel. Every
path uses these constants in this order (:func:`normalize_pixels`; the ONNX graph tiles the same
constants along its rows, :mod:`malaria_screen.export.onnx`), so they give the same floats bit for
bit. Needs PyTorch only (no torchvision), so the torch inference path imports it cheaply.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pixel_affine", "normalize_pixels", "NormalizePixels"]


def pixel_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset and scale of the input normalisation, in pixel-value (0..255) units.

    Parameters
    ----------
    mean, std : sequence of C floats
        Per-channel statistics in [0, 1] units.

    Returns
    -------
    offset : (C,) float32 tensor
        ``255 * mean``.
    scale : (C,) float32 tensor
        ``1 / (255 * std)``.

    Raises
    ------
    ValueError
        If ``mean`` and ``std`` differ in length or a ``std`` is not positive.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean and std need the same number of channels, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {tuple(std)}")
    offset = torch.tensor(list(mean), dtype=torch.float32) * 255.0
    scale = 1.0 / (torch.tensor(list(std), dtype=torch.float32) * 255.0)
    return offset, scale


def normalize_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise channel-first pixel values for the network: ``(x - 255 mean) / (255 std)``.

    Parameters
    ----------
    x : (..., C, H, W) tensor
        Pixel values in 0..255: uint8, or float (e.g. augmented colours scaled back to 0..255).
    mean, std : sequence of C floats
        Per-channel statistics in [0, 1] units.

    Returns
    -------
    (..., C, H, W) float32 tensor
        On ``x``'s device; computed as ``(x.float() - offset) * scale`` (:func:`pixel_affine`).

    Raises
    ------
    ValueError
        If ``x`` has fewer than 3 dimensions or not ``C`` channels at dimension ``-3``.
    """
    if x.ndim < 3 or x.shape[-3] != len(mean):
        raise ValueError(f"expected (..., {len(mean)}, H, W) pixels, got shape {tuple(x.shape)}")
    offset, scale = pixel_affine(mean, std)
    return (x.float() - offset.to(x.device)[:, None, None]) * scale.to(x.device)[:, None, None]


class NormalizePixels(torch.nn.Module):
    """:func:`normalize_pixels` as the last step of a transform pipeline (``(3, S, S)`` uint8 in)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        pixel_affine(mean, std)  # check the statistics now, not at the first cell
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(x, self.mean, self.std)
