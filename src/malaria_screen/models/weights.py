"""A network's weights on disk: safetensors (no pickle), written atomically.

Used by training (``weights.safetensors`` of a run folder) and by inference
(:meth:`malaria_screen.inference.Predictor.from_dir`); kept beside the architectures so that
loading a model imports neither Lightning nor scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from malaria_screen.fileio import atomic_write_bytes

__all__ = ["save_weights", "load_weights"]


def save_weights(net: torch.nn.Module, path: str | Path) -> Path:
    """Save a network's ``state_dict`` as safetensors (atomic; tensors made contiguous)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return atomic_write_bytes(path, save(state))


def load_weights(net: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load safetensors weights into ``net`` (strict) and return it in eval mode.

    Raises
    ------
    ValueError
        If the file is not a safetensors file (truncated, another format), or its keys or shapes do
        not match the architecture (e.g. a ``config.json`` naming another model): the file named.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path}: not readable as safetensors weights ({exc})") from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: the weights do not fit the {type(net).__name__} architecture "
                         f"({first[1].strip() if len(first) > 1 else first[0]})") from exc
    return net.eval()
