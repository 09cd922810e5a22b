"""Predictor: a trained cell model plus its preprocessing, read from a run folder.

A run folder (or the bundled default model) holds ``config.json`` and ``weights.safetensors``;
everything the predictor does (input size, mean/std, class names, threshold) comes from there.
Images are decoded by content, letterboxed to the model's input size (aspect kept, black
padding, as the NIH crops), normalised with the training patients' mean/std and classified in
batches. File decoding runs in a thread pool that overlaps inference
(:class:`~malaria_screen.inference.base.CellClassifierBase`, shared with the ONNX back-end).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from malaria_screen.config import TrainConfig
from malaria_screen.data.normalize import normalize_pixels
from malaria_screen.inference.base import CellClassifierBase, FileResult, default_model_dir
from malaria_screen.models.registry import build_model
from malaria_screen.models.weights import load_weights

__all__ = ["Predictor", "FileResult", "default_model_dir"]

log = logging.getLogger(__name__)


class Predictor(CellClassifierBase):
    """Classify cell images with a trained network.

    Parameters
    ----------
    net : torch.nn.Module
        Maps ``(B, 3, S, S) float32`` to logits ``(B, num_classes)``.
    config : TrainConfig
    metrics : dict, optional
        Test-patient metrics shipped with the model (``metrics.json``), for display.
    batch_size : int, default=256
    device : str, default="cpu"
        A torch device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    precision : {"32", "16-mixed", "bf16-mixed"}, default="32"
        Inference precision; the mixed ones run the network under ``torch.autocast`` (float16 or
        bfloat16 matrix products, float32 probabilities). They are for GPUs: a few cells near
        the threshold may change label.

    Raises
    ------
    ValueError
        If ``device`` is not a torch device, or a CUDA device where PyTorch sees no CUDA GPU, or
        ``precision`` is unknown.
    """

    backend = "torch"

    #: Inference precisions and the autocast dtype each runs the network in (None: float32).
    PRECISIONS = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

    def __init__(self, net: torch.nn.Module, config: TrainConfig, *, metrics: dict | None = None,
                 batch_size: int = 256, device: str = "cpu", precision: str = "32", source: str | None = None) -> None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {device!r} ({exc})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here (torch {torch.__version__})")
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(self.PRECISIONS)}, got {precision!r}")
        super().__init__(config, metrics=metrics, batch_size=batch_size, source=source)
        self.net = net.to(device).eval()
        self.device, self.precision = device, precision
        self._autocast = (kind, self.PRECISIONS[precision])  # torch.autocast's device type and dtype (None: off)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, run_dir: str | Path, **kwargs) -> "Predictor":
        """Load ``config.json`` + ``weights.safetensors`` (+ optional ``metrics.json``) from a folder.

        Raises
        ------
        FileNotFoundError
            If the folder lacks ``config.json`` or ``weights.safetensors``.
        ValueError
            If the folder is an ensemble (``ensemble.json``).
        """
        run_dir = Path(run_dir)
        if (run_dir / "ensemble.json").is_file():
            raise ValueError(f"{run_dir} is a model ensemble: load it with malaria_screen.load_model, or use one of "
                             "its members/ (export and Grad-CAM work on single models)")
        cfg_path, w_path = run_dir / "config.json", run_dir / "weights.safetensors"
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"not a model folder: {p} is missing")
        cfg = TrainConfig.from_json(cfg_path)
        net = build_model(cfg.model, num_classes=cfg.num_classes, input_size=cfg.input_size, in_chans=cfg.channels)
        load_weights(net, w_path)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else None
        return cls(net, cfg, metrics=metrics, source=str(run_dir), **kwargs)

    # -- core (decoding, batching and labelling: CellClassifierBase) ---------------------------
    @torch.inference_mode()
    def predict_proba_prepared(self, cells: np.ndarray) -> np.ndarray:
        """Class probabilities of letterboxed cells.

        Parameters
        ----------
        cells : (N, S, S, 3) ndarray of uint8
            Already at the model's input size.

        Returns
        -------
        probs : (N, num_classes) ndarray of float32
        """
        self._check_cells(cells)
        out = np.empty((len(cells), len(self.class_names)), dtype=np.float32)
        for s in range(0, len(cells), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(cells[s : s + self.batch_size])).to(self.device)
            x = normalize_pixels(x.permute(0, 3, 1, 2), self.config.mean, self.config.std)
            kind, dtype = self._autocast
            with torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
                logits = self.net(x)
            out[s : s + len(x)] = logits.float().softmax(-1).cpu().numpy()
        return out

    @torch.inference_mode()
    def predict_with_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Probability of Parasitized and the penultimate features of each image, in one pass.

        The features are the input of the network's last ``nn.Linear`` (the classifier head:
        pooled features after the backbone), captured with a forward pre-hook; the self-check
        (:mod:`malaria_screen.smear.domain`) measures distances to the training cells there.

        Parameters
        ----------
        images : one image, or a sequence of images
            As :meth:`predict` reads them.

        Returns
        -------
        p_parasitized : (N,) ndarray of float32
        features : (N, D) ndarray of float32

        Raises
        ------
        ValueError
            As :meth:`predict`; also if the network has no ``nn.Linear`` layer.
        """
        if self.positive_index is None:
            raise ValueError(f"model classes {self.class_names} have no {self.config.positive_class!r}")
        heads = [m for m in self.net.modules() if isinstance(m, torch.nn.Linear)]
        if not heads:
            raise ValueError(f"{type(self.net).__name__} has no nn.Linear head to read features from")
        captured: list[np.ndarray] = []
        hook = heads[-1].register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].float().cpu().numpy()))
        try:
            p = self.predict(images)
        finally:
            hook.remove()
        feats = np.concatenate(captured).astype(np.float32) if captured else np.zeros((0, heads[-1].in_features), np.float32)
        return p, feats.reshape(len(p), -1)
