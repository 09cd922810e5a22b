"""MixStyle: mix the feature statistics of training instances (a domain-generalisation regulariser).

Zhou, Yang, Qiao & Xiang 2021, "Domain generalization with MixStyle" (ICLR): the channel-wise
mean and standard deviation of an early feature map carry an image's *style* (here: stain,
illumination, optics); replacing them, during training only, by a random convex mix of its own
and another instance's statistics synthesises new styles while the content (the parasite) stays,
so the network learns to ignore them. At evaluation it is the identity, so a model trained with
it has the same architecture, weights file and ONNX graph as one trained without.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["MIXSTYLE_ALPHA", "attach_mixstyle", "mixstyle", "mixstyle_layers"]

#: Beta(α, α) of the mixing weight: the paper's value (0.1: mostly close to one of the two styles).
MIXSTYLE_ALPHA: float = 0.1


def mixstyle(x: Tensor, *, alpha: float = MIXSTYLE_ALPHA, eps: float = 1e-6) -> Tensor:
    """Mix each instance's channel statistics with those of a random other instance of the batch.

    ``(x - μ) / σ · σ_mix + μ_mix`` with ``μ_mix = λ μ + (1 - λ) μ[perm]`` (and σ alike),
    ``λ ~ Beta(alpha, alpha)`` per instance, ``perm`` a random permutation of the batch; μ and
    σ are computed over the spatial dimensions and not back-propagated through (as in the paper).
    Draws from torch's global generator (seeded runs repeat).

    Parameters
    ----------
    x : (B, C, H, W) float tensor
        A feature map; ``B < 2`` or ``H * W < 2`` returns it unchanged.
    alpha : float, default=MIXSTYLE_ALPHA
    eps : float, default=1e-6
        Added to the variance.

    Returns
    -------
    (B, C, H, W) tensor, same dtype and device.
    """
    b, _, h, w = x.shape
    if b < 2 or h * w < 2:
        return x
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((b, 1, 1, 1)).to(device=x.device, dtype=x.dtype)
    perm = torch.randperm(b, device=x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (x - mu) / sig * sig_mix + mu_mix


def attach_mixstyle(net: nn.Module, layers: Sequence[str], *, p: float,
                    alpha: float = MIXSTYLE_ALPHA) -> list[RemovableHandle]:
    """Apply :func:`mixstyle` to the outputs of ``net``'s sub-modules ``layers`` while training.

    Each named module gets a forward hook that, when the module is in training mode, mixes its
    output's styles with probability ``p`` per batch (the paper inserts it after the first
    stages of a ResNet; for ``cellnet`` the stem and the first stage: ``features.0`` and
    ``features.2``). In eval mode the hook returns the output unchanged.

    Parameters
    ----------
    net : nn.Module
    layers : sequence of str
        Names as in ``net.named_modules()``.
    p : float
        Probability in ``(0, 1]`` of mixing a batch at each layer.
    alpha : float, default=MIXSTYLE_ALPHA

    Returns
    -------
    list of RemovableHandle
        One per layer (``handle.remove()`` detaches it).

    Raises
    ------
    ValueError
        If ``p`` is not in ``(0, 1]``, ``layers`` is empty, or a name is not a sub-module of ``net``.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    modules = mixstyle_layers(net, layers)

    def hook(module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        if module.training and torch.rand(()) < p:
            return mixstyle(output, alpha=alpha)
        return output

    return [m.register_forward_hook(hook) for m in modules]


def mixstyle_layers(net: nn.Module, layers: Sequence[str]) -> list[nn.Module]:
    """The sub-modules of ``net`` named ``layers`` (``named_modules`` names), in that order.

    Raises
    ------
    ValueError
        If ``layers`` is empty or a name is not a sub-module of ``net`` (the message lists some that are).
    """
    modules = dict(net.named_modules())
    missing = [name for name in layers if name not in modules or name == ""]
    if not layers or missing:
        options = ", ".join(n for n in list(modules)[1:13])
        raise ValueError(f"MixStyle layers {missing or '(none)'} are not sub-modules of {type(net).__name__} "
                         f"(some that are: {options})")
    return [modules[name] for name in layers]
