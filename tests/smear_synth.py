"""Synthetic smear fields and a fake cell model for the whole-smear tests."""

from __future__ import annotations

import numpy as np

BG = (226, 246, 236)  # pale green-grey glass, like the IML fields
RBC = (175, 125, 145)  # pink-grey red cell
WBC_NUCLEUS = (95, 40, 135)  # dark purple chromatin
WBC_CYTO = (200, 185, 215)



def disc(img: np.ndarray, cx: float, cy: float, r: float, color) -> None:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = color


def synthetic_field(seed: int = 0) -> tuple[np.ndarray, dict]:
    """300x300 field, cells of radius 20 px: two touching discs, three isolated discs, one WBC
    (dark nucleus), one disc slightly cut by the left border (95 % visible, counted) and a sliver of
    one mostly outside the bottom border (34 % visible, dropped). Returns the image and the centres."""
    rng = np.random.default_rng(seed)
    img = np.zeros((300, 300, 3), np.uint8)
    img[:] = BG
    centres = {
        "touching": [(80.0, 80.0), (117.0, 80.0)],
        "isolated": [(220.0, 70.0), (220.0, 230.0), (130.0, 230.0)],
        "border": [(16.0, 170.0)],
        "sliver": [(60.0, 305.0)],
        "wbc": [(150.0, 160.0)],
    }
    for key in ("touching", "isolated", "border", "sliver"):
        for cx, cy in centres[key]:
            disc(img, cx, cy, 20, RBC)
    cx, cy = centres["wbc"][0]
    disc(img, cx, cy, 23, WBC_CYTO)
    disc(img, cx - 4, cy, 15, WBC_NUCLEUS)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), centres


class FakeModel:
    """Duck-typed cell model: p_parasitized from the crop's darkest content.

    A crop containing a dark purple spot (a 'parasite') gets 0.9, others 0.1. Records the crops.
    """

    threshold = 0.5

    def __init__(self) -> None:
        self.calls: list[list[np.ndarray]] = []

    def predict(self, images):
        images = list(images)
        self.calls.append(images)
        out = []
        for im in images:
            im = np.asarray(im)
            fg = im.max(axis=2) > 0
            dark = (im[..., 1] < 70) & fg
            out.append(0.9 if dark.sum() >= 6 else 0.1)
        return np.asarray(out, np.float32)
