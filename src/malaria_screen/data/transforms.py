"""Train and eval transforms (torchvision ``transforms.v2``) on ``(3, S, S) uint8`` cell tensors.

Augmentation follows seed 002/003 (flips, padded random crop) plus 90-degree rotations, which
are label-preserving for a round cell seen from above, and colour jitter (mild by default) for stain
variation; ``color_augment="stain"`` swaps the jitter for a strong stain augmentation meant for
training across microscopes and stains (strong HSV augmentation, Tellez et al. 2019, "Quantifying
the effects of data augmentation and stain color normalization in convolutional neural networks
for computational pathology", Medical Image Analysis 58). ``color_augment="hed"`` is Tellez et
al.'s HED augmentation proper, done on whole uint8 batches by :class:`BatchAugment` (one
vectorised pass per batch instead of a chain of per-cell transforms).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2

from malaria_screen.config import COLOR_AUGMENTS
from malaria_screen.data.normalize import NormalizePixels, normalize_pixels

__all__ = ["COLOR_AUGMENTS", "BatchAugment", "hed_augment", "RandomRot90", "RandomSaturation", "train_transform", "eval_transform"]


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
        (``"hed"`` is batched: :class:`BatchAugment`.) ``"jitter"``: the colour jitter above. ``"stain"``: strong stain augmentation for a model
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
    if color_augment == "hed":
        raise ValueError("color_augment='hed' augments whole batches: use BatchAugment, not a per-cell transform")
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
            NormalizePixels(mean, std),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalise without augmentation: ``(3, S, S)`` or ``(B, 3, S, S)`` uint8 in, float32 out
    (:func:`~malaria_screen.data.normalize.normalize_pixels`, as at inference)."""
    return v2.Compose([NormalizePixels(mean, std)])


# Ruifrok & Johnston (2001) stain vectors as scikit-image ships them (skimage.color.rgb_from_hed):
# rows are the optical densities (R, G, B) of haematoxylin, eosin and DAB.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
# Optical density of each uint8 value, -ln(max(v, 1) / 255): a 256-entry table instead of a log per pixel.
_OD_LUT = -torch.log(torch.clamp(torch.arange(256, dtype=torch.float64), min=1.0) / 255.0)


def hed_augment(rgb_uint8: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb the stains of a batch in HED optical-density space (Tellez et al. 2019).

    Each pixel's optical density ``-ln(I / 255)`` is unmixed into haematoxylin, eosin and DAB
    with Ruifrok & Johnston's stain matrix (the one of ``skimage.color.rgb2hed``), each stain
    ``s`` becomes ``alpha * s + beta`` and the result is mixed back to RGB. Pure-black pixels
    (the letterbox and mask background of the cell crops) stay black.

    Parameters
    ----------
    rgb_uint8 : torch.Tensor
        ``(B, 3, H, W)`` uint8 RGB.
    alpha, beta : torch.Tensor
        ``(B, 3)`` float scale and shift per cell and stain (H, E, D).

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` float32 RGB in [0, 1].

    Raises
    ------
    ValueError
        If the input is not a ``(B, 3, H, W)`` uint8 tensor or ``alpha``/``beta`` are not ``(B, 3)``.
    """
    if rgb_uint8.dtype != torch.uint8 or rgb_uint8.ndim != 4 or rgb_uint8.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) uint8 tensor, got {tuple(rgb_uint8.shape)} {rgb_uint8.dtype}")
    b = rgb_uint8.shape[0]
    if alpha.shape != (b, 3) or beta.shape != (b, 3):
        raise ValueError(f"alpha and beta must be ({b}, 3), got {tuple(alpha.shape)} and {tuple(beta.shape)}")
    dev = rgb_uint8.device
    od = _OD_LUT.to(device=dev, dtype=torch.float32)[rgb_uint8.long()]  # (B, 3, H, W)
    # Per cell: od' = ((od^T M_hed) * alpha + beta) M_rgb, folded into one 3x3 matrix and one offset.
    m_hed, m_rgb = _HED_FROM_RGB.to(device=dev, dtype=torch.float32), _RGB_FROM_HED.to(device=dev, dtype=torch.float32)
    mix = torch.einsum("cd,bd,de->bce", m_hed, alpha.to(dev).float(), m_rgb)  # (B, 3 in, 3 out)
    off = torch.einsum("bd,de->be", beta.to(dev).float(), m_rgb)  # (B, 3 out)
    od2 = torch.einsum("bchw,bce->behw", od, mix) + off[:, :, None, None]
    out = torch.exp(-od2).clamp_(0.0, 1.0)
    black = (rgb_uint8 == 0).all(dim=1, keepdim=True)
    return out.masked_fill_(black, 0.0)


class BatchAugment:
    """Augment and normalise whole batches of cells: ``(B, 3, S, S) uint8`` in, float32 out.

    Per cell, independently: one of the 8 flips/90-degree rotations (label-preserving for a
    cell seen from above), a random crop of the black-padded cell (padding ``S // 16``), HED
    stain augmentation (:func:`hed_augment`, strength ``hed_sigma``), optionally a Gaussian blur
    of the cell (:meth:`blur`, ``blur_sigma``), brightness and contrast jitter ± ``jitter``, then
    normalisation by ``mean``/``std``. Everything is one vectorised
    pass over the batch (no per-cell Python), drawn from the module's own seeded generator.
    It runs on the batch's device (a batch on a GPU is augmented there); the random draws come
    from a CPU generator and are moved to that device, so a seed gives the same cells on any device.

    Parameters
    ----------
    size_px : int
        Cell side, pixels.
    mean, std : sequence of 3 floats
        Normalisation, [0, 1] units.
    hed_sigma : float, default=0.05
        α ~ U(1 - σ, 1 + σ), β ~ U(-σ, σ) per stain channel; 0 disables.
    jitter : float, default=0.1
        Brightness and contrast factors ~ U(1 - j, 1 + j); 0 disables.
    blur_sigma : float, default=0.0
        Per cell, a Gaussian blur of standard deviation ~ U(0, ``blur_sigma``) px; 0 disables
        and draws nothing (the random stream, hence the cells, stay those of a run without it).
    seed : int, default=0

    Raises
    ------
    ValueError
        If ``hed_sigma`` or ``jitter`` is outside [0, 1), or ``blur_sigma`` outside [0, 4].
    """

    def __init__(self, size_px: int, mean: Sequence[float], std: Sequence[float], *, hed_sigma: float = 0.05,
                 jitter: float = 0.1, blur_sigma: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= hed_sigma < 1.0 or not 0.0 <= jitter < 1.0:
            raise ValueError(f"hed_sigma and jitter must be in [0, 1), got {hed_sigma} and {jitter}")
        if not 0.0 <= blur_sigma <= 4.0:
            raise ValueError(f"blur_sigma must be in [0, 4] px, got {blur_sigma}")
        self.blur_sigma = blur_sigma
        self.size_px, self.pad = size_px, max(1, size_px // 16)
        self.hed_sigma, self.jitter = hed_sigma, jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.gen = torch.Generator().manual_seed(seed)

    def _u(self, *shape: int, lo: float, hi: float, device: torch.device | str = "cpu") -> torch.Tensor:
        return (torch.rand(*shape, generator=self.gen) * (hi - lo) + lo).to(device)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """Random dihedral transform and padded random crop of a ``(B, 3, S, S)`` uint8 batch."""
        b, _, s, _ = x.shape
        dev = x.device
        flips = (torch.rand(b, 3, generator=self.gen) < 0.5).to(dev)
        x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
        x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
        x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
        p = self.pad
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=self.gen).to(dev)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=self.gen).to(dev)
        ar = torch.arange(s, device=dev)
        rows, cols = (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]
        return xp.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()

    def blur(self, out: torch.Tensor, black: torch.Tensor) -> torch.Tensor:
        """Blur each cell of a ``(B, 3, S, S)`` float batch by a Gaussian of its own standard
        deviation ~ U(0, ``blur_sigma``) px, inside the cell only: a normalised convolution
        (the blurred image over the blurred mask), so the black letterbox or mask around a cell
        neither darkens its rim nor spreads; ``black`` ``(B, 1, S, S)`` bool marks it."""
        b, c, s, _ = out.shape
        r = max(1, math.ceil(3 * self.blur_sigma))
        sigma = self._u(b, lo=0.0, hi=self.blur_sigma).clamp_min(1e-3)  # drawn on the CPU: same on any device
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).to(out.device)  # (B, 2r + 1); a tiny sigma is the identity
        keep = (~black).to(out.dtype)

        def conv(x: torch.Tensor) -> torch.Tensor:  # separable, one kernel per cell (grouped)
            ch = x.shape[1]
            kk = k.repeat_interleave(ch, 0)
            x = x.reshape(1, b * ch, s, s)
            x = torch.nn.functional.conv2d(x, kk[:, None, None, :], padding=(0, r), groups=b * ch)
            x = torch.nn.functional.conv2d(x, kk[:, None, :, None], padding=(r, 0), groups=b * ch)
            return x.reshape(b, ch, s, s)

        num, den = conv(out * keep), conv(keep)
        return torch.where(black, torch.zeros_like(out), num / den.clamp_min(1e-6)).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S) uint8`` → augmented, normalised ``(B, 3, S, S) float32``."""
        b = x.shape[0]
        x = self.geometric(x)
        sg = self.hed_sigma
        alpha, beta = self._u(b, 3, lo=1 - sg, hi=1 + sg), self._u(b, 3, lo=-sg, hi=sg)  # drawn on the CPU: same on any device
        black = (x == 0).all(dim=1, keepdim=True)
        out = hed_augment(x, alpha, beta) if sg > 0 else x.float() / 255.0
        if self.blur_sigma > 0:
            out = self.blur(out, black)
        if self.jitter > 0:
            j = self.jitter
            bright = self._u(b, 1, 1, 1, lo=1 - j, hi=1 + j, device=x.device)
            contrast = self._u(b, 1, 1, 1, lo=1 - j, hi=1 + j, device=x.device)
            grey = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).mean(dim=(1, 2))[:, None, None, None]
            out = ((out * bright - grey * bright) * contrast + grey * bright).clamp_(0.0, 1.0).masked_fill_(black, 0.0)
        return normalize_pixels(out.mul_(255.0), self.mean, self.std)
