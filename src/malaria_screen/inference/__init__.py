"""Inference: :func:`load_model` gives a cell classifier, PyTorch or ONNX Runtime.

- :class:`Predictor` (PyTorch) loads a run folder (``config.json`` + ``weights.safetensors``).
- :class:`OnnxPredictor` (ONNX Runtime, no torch) loads an ``.onnx`` file written by
  ``malaria-screen export``.
- :class:`EnsemblePredictor` averages several of them; it loads an ensemble folder written by
  ``malaria-screen ensemble`` (:func:`~malaria_screen.inference.ensemble.write_ensemble`).

Both share :class:`~malaria_screen.inference.base.CellClassifierBase` (decoding, batching,
labelling). Attributes are imported lazily, so importing this package imports no torch, and
loading an ``.onnx`` model never does.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["EnsemblePredictor", "FileResult", "OnnxPredictor", "Predictor", "default_model_dir", "load_model", "BACKENDS"]

#: Accepted values of ``backend``.
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")

_LAZY = {
    "FileResult": "malaria_screen.inference.base",
    "default_model_dir": "malaria_screen.inference.base",
    "Predictor": "malaria_screen.inference.predictor",
    "OnnxPredictor": "malaria_screen.inference.onnx_predictor",
    "EnsemblePredictor": "malaria_screen.inference.ensemble",
    "SitePredictor": "malaria_screen.inference.site",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


def _torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def load_model(path: str | Path | None = None, *, backend: str = "auto", **kwargs):
    """Load a cell model: the bundled default (``path=None``), a run folder, an ``.onnx`` file or
    an ensemble folder.

    Parameters
    ----------
    path : path, optional
        A run folder written by ``malaria-screen train``, an ``.onnx`` file written by
        ``malaria-screen export``, an ensemble folder written by ``malaria-screen ensemble``
        (its members load with ``backend``), a site folder written by ``malaria-screen adapt``
        (:class:`~malaria_screen.inference.site.SitePredictor`), or None for the bundled default model.
    backend : {"auto", "torch", "onnx"}, default="auto"
        ``"auto"``: ONNX Runtime for ``.onnx`` files; PyTorch for folders, or ONNX Runtime
        (``model.onnx`` / ``model.int8.onnx`` in the folder) when torch is not installed.
        ``"onnx"`` with a folder loads the first of those files found in it.
    **kwargs
        Passed to the back-end: ``batch_size`` (both), ``device`` (torch), ``num_threads`` and
        ``providers`` (ONNX).

    Returns
    -------
    Predictor, OnnxPredictor or EnsemblePredictor
        ``predict(images)`` gives p_parasitized per image; all have the same interface.

    Raises
    ------
    FileNotFoundError
        If the path is not a model folder or file.
    ValueError
        If ``backend`` is unknown, or ``"torch"`` is asked for an ``.onnx`` file.

    Examples
    --------
    >>> import malaria_screen
    >>> model = malaria_screen.load_model()                      # doctest: +SKIP
    >>> edge = malaria_screen.load_model("cellnet.int8.onnx")    # doctest: +SKIP
    >>> edge.predict(["cell.png"])                               # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from malaria_screen.inference.base import default_model_dir

    p = default_model_dir() if path is None else Path(path)
    from malaria_screen.inference.ensemble import EnsemblePredictor, is_ensemble_dir

    if is_ensemble_dir(p):
        return EnsemblePredictor.from_dir(p, backend=backend, **kwargs)
    from malaria_screen.inference.site import SitePredictor, is_site_dir

    if is_site_dir(p):
        return SitePredictor.from_dir(p, backend=backend, **kwargs)
    is_onnx_file = p.suffix.lower() == ".onnx"
    if backend == "torch" and is_onnx_file:
        raise ValueError(f"{p} is an ONNX model: use backend='onnx' (or 'auto')")
    use_onnx = backend == "onnx" or is_onnx_file or (backend == "auto" and not _torch_available())
    if use_onnx:
        from malaria_screen.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor.from_file(p, **kwargs)
    from malaria_screen.inference.predictor import Predictor

    return Predictor.from_dir(p, **kwargs)
