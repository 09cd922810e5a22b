"""Grad-CAM heat maps: where in a cell the network found the evidence for a class.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017, arXiv:1610.02391) weights each channel ``k`` of the last
convolutional feature map ``A^k`` by the spatial mean of the gradient of the class score ``y^c``
(the logit, before softmax) with respect to it, ``alpha_k = mean_ij dy^c / dA^k_ij``, and keeps
the positive part of the weighted sum, ``ReLU(sum_k alpha_k A^k)``. The coarse map (8 x 8 for
CellNet at 64 px) is upsampled bilinearly to the input and scaled to [0, 1] per cell.

Every malaria-screen model splits ``forward_features`` (to the last feature map) from
``forward_head`` (pooling and classifier), so no hooks are needed. Needs the PyTorch back-end.
The CLI ``explain`` command and the web app both call :func:`explain`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from malaria_screen.data.io import ImageSource, check_cell_size, decode_image
from malaria_screen.data.normalize import normalize_pixels
from malaria_screen.data.preprocess import letterbox

__all__ = ["Explanation", "gradcam", "overlay_heatmap", "explain"]

log = logging.getLogger(__name__)


def gradcam(predictor, cells: np.ndarray, *, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of letterboxed cells.

    Parameters
    ----------
    predictor : Predictor
        PyTorch back-end; its ``net`` must have ``forward_features`` and ``forward_head``.
    cells : (N, S, S, 3) ndarray of uint8
        Letterboxed cells at the model's input size ``S``.
    class_index : int, optional
        Class to explain; default: each cell's predicted class (``predictor.label_of``).

    Returns
    -------
    cams : (N, S, S) ndarray of float32
        Heat maps in [0, 1] (each scaled by its own maximum; all zero where no positive evidence).
    probs : (N, num_classes) ndarray of float32
        Softmax probabilities of the same forward pass.

    Raises
    ------
    TypeError
        If the predictor has no PyTorch ``net`` with ``forward_features``/``forward_head``
        (e.g. an ONNX model).
    ValueError
        If ``cells`` is not ``(N, S, S, 3)`` or ``class_index`` is out of range.
    """
    net = getattr(predictor, "net", None)
    if net is None or not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
        raise TypeError("Grad-CAM needs a PyTorch model with forward_features/forward_head (load a run folder, not .onnx)")
    predictor._check_cells(cells)
    n_cls = len(predictor.class_names)
    if class_index is not None and not 0 <= class_index < n_cls:
        raise ValueError(f"class_index must be in [0, {n_cls}), got {class_index}")
    s = predictor.input_size
    cams = np.zeros((len(cells), s, s), dtype=np.float32)
    probs = np.zeros((len(cells), n_cls), dtype=np.float32)
    net.eval()
    for b in range(0, len(cells), predictor.batch_size):
        x = torch.from_numpy(np.ascontiguousarray(cells[b : b + predictor.batch_size])).to(predictor.device)
        x = normalize_pixels(x.permute(0, 3, 1, 2), predictor.config.mean, predictor.config.std)
        with torch.enable_grad():
            feats = net.forward_features(x).detach().requires_grad_(True)
            logits = net.forward_head(feats)
            p = logits.softmax(-1).detach()
            if class_index is None:
                names = predictor.label_of(p.cpu().numpy())
                idx = torch.tensor([predictor.class_names.index(nm) for nm in names], device=logits.device)
            else:
                idx = torch.full((len(x),), class_index, device=logits.device)
            score = logits.gather(1, idx[:, None]).sum()
            (grads,) = torch.autograd.grad(score, feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
        cams[b : b + len(x)] = cam.cpu().numpy()
        probs[b : b + len(x)] = p.cpu().numpy()
    return cams, probs


def _unletterbox(cam: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Crop a letterboxed ``(S, S)`` map to the image region and resize it to ``(H, W)``."""
    s = cam.shape[0]
    h, w = hw
    scale = s / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (s - nh) // 2, (s - nw) // 2
    crop = np.ascontiguousarray(cam[top : top + nh, left : left + nw], dtype=np.float32)
    return np.asarray(Image.fromarray(crop, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_heatmap(rgb: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45,
                    max_side: int | None = 2048) -> np.ndarray:
    """Blend a Grad-CAM map over the original image.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray of uint8
        The original (not letterboxed) image. One whose longer side exceeds ``max_side`` is
        first shrunk (box filter) so that it is ``max_side`` px: the map has
        ``S`` x ``S`` values (e.g. 96 x 96), and blending it at 9000 x 9000 px would take
        gigabytes (about 70 bytes per pixel) for no visible detail.
    cam : (S, S) ndarray of float
        Map of the letterboxed image, values in [0, 1]; mapped back to ``(H, W)`` by undoing
        the letterbox (crop the padding, resize).
    alpha : float, default=0.45
        Opacity of the colour map where the map is 1; it fades with the map value. The colour
        map is matplotlib's "jet" (blue, cyan, yellow, red).
    max_side : int or None, default=2048
        Longest side of the overlay, px; None keeps the image size whatever it is.

    Returns
    -------
    overlay : (H', W', 3) ndarray of uint8
        ``(H, W)`` unless the image was shrunk to ``max_side`` (aspect ratio kept).

    Raises
    ------
    ValueError
        If shapes are wrong, ``alpha`` is outside [0, 1] or ``max_side`` < 1.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or cam.ndim != 2 or cam.shape[0] != cam.shape[1]:
        raise ValueError(f"need (H, W, 3) image and (S, S) map, got {rgb.shape} and {cam.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        f = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(size, Image.Resampling.BOX))
    import matplotlib  # heavy (~0.2 s); only when an overlay is drawn

    m = np.clip(_unletterbox(cam, rgb.shape[:2]), 0.0, 1.0)
    a = (alpha * (0.25 + 0.75 * m))[..., None]
    heat = matplotlib.colormaps["jet"](m, bytes=True)[..., :3]
    out = rgb.astype(np.float32) * (1.0 - a) + heat.astype(np.float32) * a
    return (out + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM explanation of one image.

    Attributes
    ----------
    rgb : (H, W, 3) ndarray of uint8
        The decoded image.
    cam : (S, S) ndarray of float32
        Grad-CAM map of the letterboxed cell, in [0, 1].
    overlay : (H', W', 3) ndarray of uint8
        ``cam`` over ``rgb``; ``(H, W)`` unless the longer side exceeds 2048 px, when it is
        shrunk to that (:func:`overlay_heatmap`).
    label : str
    p_parasitized : float or None
    explained_class : str
    """

    rgb: np.ndarray
    cam: np.ndarray
    overlay: np.ndarray
    label: str
    p_parasitized: float | None
    explained_class: str


def explain(predictor, images: Sequence[ImageSource], *, class_index: int | None = None, alpha: float = 0.45) -> list[Explanation]:
    """Classify images and explain each with a Grad-CAM overlay.

    Parameters
    ----------
    predictor : Predictor
        PyTorch back-end.
    images : sequence of (path | bytes | PIL.Image | (H, W, 3) uint8 ndarray)
    class_index : int, optional
        Class to explain; default each image's predicted class.
    alpha : float, default=0.45

    Returns
    -------
    list of Explanation
        In input order.

    Raises
    ------
    ImageDecodeError
        If an image cannot be decoded or is under 8 px on a side (:func:`check_cell_size`); callers
        that batch user files catch it per image.
    TypeError
        If the predictor is not a PyTorch one.
    """
    rgbs = [check_cell_size(decode_image(im)) for im in images]
    if not rgbs:
        return []
    cells = np.stack([letterbox(r, predictor.input_size) for r in rgbs])
    cams, probs = gradcam(predictor, cells, class_index=class_index)
    labels = predictor.label_of(probs)
    pi = predictor.positive_index
    out = []
    for k, rgb in enumerate(rgbs):
        cls = predictor.class_names[class_index] if class_index is not None else labels[k]
        out.append(Explanation(rgb=rgb, cam=cams[k], overlay=overlay_heatmap(rgb, cams[k], alpha=alpha), label=labels[k],
                               p_parasitized=None if pi is None else float(probs[k, pi]), explained_class=cls))
    return out
