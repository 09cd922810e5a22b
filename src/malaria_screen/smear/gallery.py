"""A gallery of the cells to confirm by eye: those called Parasitized, and the least certain ones.

A microscopist confirms a slide's positive calls in a minute by looking at them side by side,
rather than field by field on the overlays. Per slide: every cell called Parasitized (highest
probability first, up to ``max_parasitized``) and the ``n_uncertain`` cells whose probability
is nearest the decision threshold on either side, each as a small crop of the field (the cell's
box plus a margin, unmasked: the context helps the eye) with its probability and field name.
Used by ``report.html`` (:func:`gallery_html`) and the web app's whole-field tab.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

__all__ = ["GalleryCell", "cell_thumbnail", "gallery_cells", "gallery_html", "select_gallery"]

#: Side of a gallery thumbnail, px.
THUMB_PX = 96


@dataclass(frozen=True)
class GalleryCell:
    """One gallery entry: ``field`` name, cell ``id``, ``p_parasitized``, ``label``, ``kind``
    ("parasitized" or "uncertain") and ``thumb``, a ``(THUMB_PX, THUMB_PX, 3)`` uint8 crop."""

    field: str
    id: int
    p_parasitized: float
    label: str
    kind: str
    thumb: np.ndarray

    def caption(self) -> str:
        """``"<field> #<id>: p=0.97"``."""
        return f"{self.field} #{self.id}: p={self.p_parasitized:.2f}"


def cell_thumbnail(rgb: np.ndarray, bbox: Iterable[int], *, size: int = THUMB_PX, margin: float = 0.25) -> np.ndarray:
    """Square crop around ``bbox`` ``(x, y, w, h)`` px (grown by ``margin`` of its side, clipped to
    the field, padded white), resized to ``size`` px: ``(size, size, 3)`` uint8."""
    import cv2

    x, y, w, h = (int(v) for v in bbox)
    side = int(round(max(w, h) * (1 + 2 * margin))) or 1
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = np.full((side, side, 3), 255, np.uint8)
    H, W = rgb.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(W, x0 + side), min(H, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)


def gallery_cells(rgb: np.ndarray, result: Any, *, threshold: float, max_parasitized: int = 60,
                  n_uncertain: int = 12) -> list[GalleryCell]:
    """A field's candidates for the slide gallery (thumbnails cut now, while the field is in memory).

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 field.
    result : FieldResult
        Its screening result (cells with ``bbox``, ``p_parasitized``, ``label``).
    threshold : float
        The decision threshold the labels were made with.
    max_parasitized, n_uncertain : int
        At most this many of each kind are kept per field (the slide keeps its own best, see
        :func:`select_gallery`).

    Returns
    -------
    list of GalleryCell
    """
    cells = [c for c in result.cells if c.p_parasitized is not None]
    pos = sorted((c for c in cells if c.label == "Parasitized"), key=lambda c: -c.p_parasitized)[:max_parasitized]
    taken = {c.id for c in pos}
    unc = sorted((c for c in cells if c.id not in taken), key=lambda c: abs(c.p_parasitized - threshold))[:n_uncertain]
    return [GalleryCell(result.image, c.id, float(c.p_parasitized), c.label, kind, cell_thumbnail(rgb, c.bbox))
            for kind, group in (("parasitized", pos), ("uncertain", unc)) for c in group]


def select_gallery(cells: Iterable[GalleryCell], *, threshold: float, max_parasitized: int = 60,
                   n_uncertain: int = 12) -> tuple[list[GalleryCell], list[GalleryCell], int]:
    """The slide's gallery from all fields' candidates.

    Returns
    -------
    parasitized : list of GalleryCell
        Highest probability first, at most ``max_parasitized``.
    uncertain : list of GalleryCell
        Nearest the threshold first (cells not called Parasitized, or called with p just above
        the threshold and beyond ``max_parasitized``), at most ``n_uncertain``.
    n_parasitized : int
        All cells called Parasitized among the candidates (the gallery may show fewer).
    """
    cells = list(cells)
    pos = sorted((c for c in cells if c.kind == "parasitized"), key=lambda c: -c.p_parasitized)
    unc = sorted((c for c in cells if c.kind == "uncertain"), key=lambda c: abs(c.p_parasitized - threshold))
    return pos[:max_parasitized], unc[:n_uncertain], len(pos)


def _jpeg_b64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=88)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(parasitized: list[GalleryCell], uncertain: list[GalleryCell], n_parasitized: int) -> str:
    """HTML section (``<h2>`` + figures with inline JPEG thumbnails) for ``report.html``."""
    e = html.escape

    def figs(cells: list[GalleryCell]) -> str:
        return "".join(
            f'<figure class="cell"><img alt="cell {c.id} of {e(c.field)}" width="{THUMB_PX}" height="{THUMB_PX}" '
            f'src="data:image/jpeg;base64,{_jpeg_b64(c.thumb)}"><figcaption>p={c.p_parasitized:.2f}<br>'
            f'{e(c.field)} #{c.id}</figcaption></figure>' for c in cells)

    shown = (f"all {n_parasitized}" if len(parasitized) == n_parasitized
             else f"the {len(parasitized)} most probable of {n_parasitized}")
    return (
        '<section id="gallery"><h2>Cells to confirm by eye</h2>'
        '<style>.cells{display:flex;flex-wrap:wrap;gap:6px}.cell{margin:0;text-align:center;font-size:0.75em}'
        '.cell img{display:inline;max-width:none}</style>'
        f"<h3>Called Parasitized ({shown})</h3>"
        + (f'<div class="cells">{figs(parasitized)}</div>' if parasitized else "<p>None.</p>")
        + "<h3>Least certain (probability nearest the threshold)</h3>"
        + (f'<div class="cells">{figs(uncertain)}</div>' if uncertain else "<p>None.</p>")
        + "<p>Crops of the field around each cell, with the classifier's probability of Parasitized and the field "
        "name and cell number of the overlay. A microscopist confirms or rejects each call.</p></section>"
    )
