"""Synthetic Parasitized cells of another microscope: NIH parasites pasted into other sites' red cells.

Extra negatives from another microscope (:mod:`malaria_screen.data.extra_negatives`) are all
Uninfected, so in the training set "looks like the other microscope" predicts "Uninfected": a
shortcut a network can take instead of looking for the parasite. Pasting parasites into a share
of those cells breaks the shortcut: the other site's cells then come in both classes, told apart
only by the parasite.

A parasite is cut from an NIH Parasitized training cell as its **excess optical density**: the
Giemsa-stained chromatin absorbs more than the cell around it, so per pixel
``OD = -ln((I + 1) / 256)`` minus the median OD of the cell, summed over the RGB channels, is high
on the parasite and about zero elsewhere: at 64 px it exceeds :data:`EXCESS_OD_THRESHOLD` on the parasite of most
NIH Parasitized cells and almost never in Uninfected ones (``tests/data/test_synthetic.py``
checks 40 of each). Absorbance adds
(Beer-Lambert), so the parasite is pasted by adding its excess OD to the host cell's OD at a random
place inside the host, after a random 90° rotation and flip. This is copy-paste augmentation
(Ghiasi et al. 2021, "Simple Copy-Paste is a Strong Data Augmentation Method") done in optical
density, as stain augmentation in HED space is (Tellez et al. 2019).

Pure array functions; the training run (:func:`malaria_screen.training.run.train`) calls
:func:`synthetic_positives` with its training split's Parasitized cells as donors, so no parasite
of a validation or test patient is ever pasted.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["EXCESS_OD_THRESHOLD", "optical_density", "parasite_patch", "paste_parasite", "synthetic_positives"]

#: Summed excess optical density (RGB, natural log) above which a pixel is parasite chromatin.
EXCESS_OD_THRESHOLD: float = 0.6

#: A pixel of a letterboxed cell is cell (not the black padding) when its brightest channel exceeds this.
_FOREGROUND_MIN: int = 10


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``-ln((I + 1) / 256)`` per channel: ``(H, W, 3)`` uint8 -> ``(H, W, 3)`` float32, in [0, 5.55]."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def _foreground(rgb: np.ndarray, erode: int) -> np.ndarray:
    from scipy import ndimage as ndi

    fg = rgb.max(axis=-1) > _FOREGROUND_MIN
    return ndi.binary_erosion(fg, iterations=erode) if erode > 0 else fg


def _erosion(size_px: int) -> int:
    return max(1, round(size_px / 32))


def parasite_patch(cell: np.ndarray) -> Optional[np.ndarray]:
    """The parasite of a Parasitized cell as excess optical density, or None when none is seen.

    Parameters
    ----------
    cell : (S, S, 3) ndarray of uint8
        A letterboxed cell (black padding), e.g. an NIH Parasitized training crop.

    Returns
    -------
    patch : (h, w, 3) ndarray of float32, or None
        Excess OD per channel (>= 0) in the bounding box of the pixels whose summed excess exceeds
        :data:`EXCESS_OD_THRESHOLD` (dilated by one pixel, edges softened by a Gaussian of
        sigma 0.7 px), zero elsewhere. None when fewer than 4 pixels qualify (many NIH
        "Parasitized" crops show no parasite: label noise), or when the parasite spans more than
        5/8 of the cell's side (a stain blotch rather than a parasite).
    """
    from scipy import ndimage as ndi

    size = cell.shape[0]
    fg = _foreground(cell, _erosion(size))
    if fg.sum() < 16:
        return None
    od = optical_density(cell)
    excess = np.clip(od - np.median(od[fg], axis=0), 0.0, None)
    core = (excess.sum(axis=-1) > EXCESS_OD_THRESHOLD) & fg
    if core.sum() < 4:
        return None
    region = ndi.binary_dilation(core, iterations=1)
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if max(y1 - y0, x1 - x0) > size * 5 // 8:
        return None
    alpha = np.clip(ndi.gaussian_filter(region[y0:y1, x0:x1].astype(np.float32), 0.7), 0.0, 1.0)
    return (excess[y0:y1, x0:x1] * alpha[..., None]).astype(np.float32)


def paste_parasite(host: np.ndarray, patch: np.ndarray, rng: np.random.Generator, *,
                   tries: int = 50) -> Optional[np.ndarray]:
    """``host`` with ``patch``'s excess optical density added at a random place inside the cell.

    Parameters
    ----------
    host : (S, S, 3) ndarray of uint8
        A letterboxed Uninfected cell (black padding).
    patch : (h, w, 3) ndarray of float32
        From :func:`parasite_patch`.
    rng : numpy.random.Generator
        Draws the rotation (multiple of 90°), the flip and the place.
    tries : int, default=50
        Places drawn until the parasite's pixels all fall inside the host cell (eroded by
        ``S / 32`` px).

    Returns
    -------
    (S, S, 3) ndarray of uint8, or None
        None when no place was found (a host smaller than the parasite).
    """
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    fg = _foreground(host, _erosion(host.shape[0]))
    h, w = patch.shape[:2]
    big, big_w = fg.shape
    if h > big or w > big_w:
        return None
    visible = patch.sum(axis=-1) > 0.3 * EXCESS_OD_THRESHOLD
    for _ in range(tries):
        y, x = int(rng.integers(0, big - h + 1)), int(rng.integers(0, big_w - w + 1))
        if fg[y : y + h, x : x + w][visible].all():
            od = optical_density(host)
            od[y : y + h, x : x + w] += patch
            return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    return None


def synthetic_positives(hosts: np.ndarray, donors: np.ndarray, *, fraction: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic Parasitized cells: NIH parasites pasted into a share of another site's cells.

    Parameters
    ----------
    hosts : (N, S, S, 3) ndarray of uint8
        Uninfected cells of another microscope (the extra negatives).
    donors : (M, S, S, 3) ndarray of uint8
        Parasitized cells of the training split only (never validation or test patients).
    fraction : float
        Share of ``hosts`` that get a parasite, in (0, 1]; each chosen host gives one new cell
        (the host itself stays, Uninfected).
    seed : int
        Makes the choice of hosts, donors, rotations and places reproducible (a resumed run
        rebuilds the same cells).

    Returns
    -------
    images : (K, S, S, 3) ndarray of uint8
        The synthetic cells, K <= ``round(fraction * N)`` (hosts without a place are skipped).
    host_index : (K,) ndarray of int64
        Index into ``hosts`` of each synthetic cell's host.

    Raises
    ------
    ValueError
        If ``fraction`` is outside (0, 1], or the shapes differ, or no donor shows a parasite.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if hosts.shape[1:] != donors.shape[1:] or hosts.ndim != 4:
        raise ValueError(f"hosts {hosts.shape} and donors {donors.shape} must both be (N, S, S, 3)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(hosts))[: round(fraction * len(hosts))])
    order = rng.permutation(len(donors))
    patches: list[np.ndarray] = []
    for i in order:  # enough donors for every host, each used once where possible
        p = parasite_patch(donors[i])
        if p is not None:
            patches.append(p)
            if len(patches) >= len(chosen):
                break
    if not patches:
        raise ValueError(f"none of the {len(donors)} donor cells shows a parasite (summed excess OD > {EXCESS_OD_THRESHOLD})")
    images, index = [], []
    for k, h in enumerate(chosen):
        out = paste_parasite(hosts[h], patches[k % len(patches)], rng)
        if out is not None:
            images.append(out)
            index.append(h)
    shape = (0,) + hosts.shape[1:]
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), np.asarray(index, dtype=np.int64)
