"""Box geometry: IoU, one-to-one matching, cover and scaling of ``(x, y, w, h)`` px boxes.

All boxes here are ``(x, y, w, h)`` in pixels, top-left origin (the format of the per-field
JSON, the IML_Malaria annotation and :class:`~malaria_screen.smear.segment.CellProps`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_cover", "box_iou", "match_boxes", "scale_boxes", "touches_border"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(x, y, w, h)`` boxes (``torchvision.ops.box_iou``).

    Parameters
    ----------
    a : (N, 4) array-like
        Boxes, px.
    b : (M, 4) array-like
        Boxes, px.

    Returns
    -------
    (N, M) float64 ndarray
        IoU in [0, 1] (0 where the union is empty).
    """
    import torch
    from torchvision.ops import box_convert
    from torchvision.ops import box_iou as torch_box_iou

    a = torch.as_tensor(np.asarray(a, np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(b, np.float64).reshape(-1, 4))
    iou = torch_box_iou(box_convert(a, "xywh", "xyxy"), box_convert(b, "xywh", "xyxy")).numpy()
    return np.nan_to_num(iou, nan=0.0)  # two empty boxes: no overlap


def match_boxes(pred: np.ndarray, gt: np.ndarray, *, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one matching maximising total IoU among pairs with IoU ≥ ``iou_threshold``.

    The Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on ``-IoU``, pairs
    below the threshold costing 0.

    Parameters
    ----------
    pred : (N, 4) array-like
        Predicted ``(x, y, w, h)`` boxes, px.
    gt : (M, 4) array-like
        Annotated boxes, px.
    iou_threshold : float, default=0.5
        Minimum IoU of a match.

    Returns
    -------
    list of (int, int)
        ``(pred_index, gt_index)`` pairs.
    """
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    if len(pred) == 0 or len(gt) == 0:
        return []
    iou = box_iou(pred, gt)
    cost = np.where(iou >= iou_threshold, -iou, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]


def box_cover(pred: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Largest fraction of each box in ``pred`` covered by one box of ``boxes``.

    Parameters
    ----------
    pred : (N, 4) float ndarray
        ``(x, y, w, h)`` boxes, px.
    boxes : (M, 4) float ndarray
        ``(x, y, w, h)`` boxes, px.

    Returns
    -------
    (N,) float64 ndarray
        Intersection area / area of the ``pred`` box, maximised over ``boxes`` (0 if there are none).
    """
    if len(pred) == 0 or len(boxes) == 0:
        return np.zeros(len(pred))
    x0 = np.maximum(pred[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(pred[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(pred[:, None, 0] + pred[:, None, 2], boxes[None, :, 0] + boxes[None, :, 2])
    y1 = np.minimum(pred[:, None, 1] + pred[:, None, 3], boxes[None, :, 1] + boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return (inter / np.maximum(pred[:, 2] * pred[:, 3], 1e-9)[:, None]).max(axis=1)


def scale_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Boxes scaled by ``factor`` about their centres (width and height).

    Parameters
    ----------
    boxes : (N, 4) float ndarray
        ``(x, y, w, h)`` boxes, px.
    factor : float
        Linear scale, > 0; 1 returns ``boxes`` itself.

    Returns
    -------
    (N, 4) float64 ndarray

    Raises
    ------
    ValueError
        If ``factor`` is not > 0.
    """
    if not factor > 0:
        raise ValueError(f"box_scale must be > 0, got {factor}")
    if factor == 1.0:
        return boxes
    c = boxes[:, :2] + boxes[:, 2:] / 2
    return np.concatenate([c - boxes[:, 2:] * factor / 2, boxes[:, 2:] * factor], axis=1)


def touches_border(boxes: np.ndarray, image_shape: tuple[int, int], margin_px: float) -> np.ndarray:
    """Which boxes come within ``margin_px`` of the image edge.

    Parameters
    ----------
    boxes : (N, 4) float ndarray
        ``(x, y, w, h)`` boxes, px.
    image_shape : (int, int)
        ``(H, W)`` of the image, px.
    margin_px : float
        Distance to the edge, px.

    Returns
    -------
    (N,) bool ndarray
    """
    h, w = image_shape
    b = boxes.reshape(-1, 4)
    return (b[:, 0] <= margin_px) | (b[:, 1] <= margin_px) | (b[:, 0] + b[:, 2] >= w - margin_px) | (
        b[:, 1] + b[:, 3] >= h - margin_px)
