"""Model registry: every architecture is built by name (after timm's ``create_model``).

Builders are keyword-only functions ``fn(*, num_classes=2, input_size=..., in_chans=3, **kw)``
registered with :func:`register_model`; :func:`build_model` drops ``None`` keyword arguments so
builder defaults survive.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["register_model", "build_model", "list_models", "count_parameters", "count_flops", "default_input_size"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUT: dict[str, int] = {}


def register_model(*, default_input_size: int) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under its function name.

    Raises
    ------
    ValueError
        If the name is already registered.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} already registered")
        _MODELS[name] = fn
        _DEFAULT_INPUT[name] = default_input_size
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the families fills the registry; they import this module (register_model), so a
    # top-level import would be circular.
    from malaria_screen.models import backbones, cnn, cellnet, efficientnet_lite, resnet9  # noqa: F401


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    _ensure_loaded()
    return sorted(_MODELS)


def default_input_size(name: str) -> int:
    """The input side (pixels) a model was designed for."""
    _ensure_loaded()
    if name not in _DEFAULT_INPUT:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(_MODELS)}")
    return _DEFAULT_INPUT[name]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    **kwargs
        Passed to the builder (``num_classes``, ``input_size``, ...); ``None`` values dropped.

    Returns
    -------
    nn.Module
        Maps ``(B, 3, S, S) float32`` to logits ``(B, num_classes)``.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the registered names).
    """
    _ensure_loaded()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(_MODELS)}")
    return _MODELS[name](**{k: v for k, v in kwargs.items() if v is not None})


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: int, *, in_chans: int = 3) -> int:
    """Forward FLOPs for one ``(1, in_chans, input_size, input_size)`` input.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix
    products; one multiply-add = 2 FLOPs; pooling, activations and BatchNorm not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        model.train(was_training)
    return int(fc.get_total_flops())
