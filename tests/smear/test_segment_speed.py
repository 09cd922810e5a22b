"""The faster segmentation steps give the old implementation's output exactly, on real fields.

The old steps are kept here as references (scipy's ``binary_fill_holes`` for filling every hole;
per-pixel ``bincount`` sums for the cell centroids; scikit-image's ``peak_local_max`` for the
watershed markers) and swapped in with ``monkeypatch``: the segmentation of IML and Chula fields
(labels, boxes, white cells, every cell's box, area and centroid) must be byte-identical with and
without them.
"""

from __future__ import annotations

import numpy as np
import pytest

from malaria_screen.data.io import decode_image
from malaria_screen.smear import segment
from malaria_screen.smear.segment import cell_properties, segment_field

# generic, scale bar, dense, enlarged pale cells, magenta with pale cells, pale WBC nucleus (IML);
# two Chula fields at half the magnification
FIELDS = [("iml_malaria_dev", n) for n in ("PA171691.JPG", "PA171692.JPG", "PA171750.JPG", "PA171842.JPG",
                                            "PA171891.JPG", "PA172024.JPG")] + [("chula_rbc", "1.jpg"), ("chula_rbc", "15.jpg")]


def _old_fill_small_holes(mask, max_hole_px):
    from scipy import ndimage as ndi

    if max_hole_px is None:
        return ndi.binary_fill_holes(mask)
    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    fill = sizes <= max_hole_px
    fill[0] = False
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill[edge] = False
    return mask | fill[holes]


def _old_moments(labels, objs, n):
    h, w = labels.shape
    ys, xs = np.indices((h, w), sparse=True)
    return (np.bincount(labels.ravel(), minlength=n + 1),
            np.bincount(labels.ravel(), weights=np.broadcast_to(xs, (h, w)).ravel(), minlength=n + 1),
            np.bincount(labels.ravel(), weights=np.broadcast_to(ys, (h, w)).ravel(), minlength=n + 1))


def _old_label_peaks(image, labels, min_distance, threshold):
    from skimage.feature import peak_local_max

    return peak_local_max(image, min_distance=min_distance, threshold_abs=threshold, labels=labels, exclude_border=False)


def _outputs(rgb):
    seg = segment_field(rgb)
    return seg.labels, (seg.boxes, seg.wbc_boxes, seg.n_excluded, seg.rbc_diameter_px, seg.scale, seg.cells())


def test_segmentation_of_real_fields_equals_the_old_implementation(data_dir, monkeypatch):
    images = []
    for folder, name in FIELDS:
        path = data_dir / folder / "images" / name
        if not path.is_file():
            pytest.skip(f"{path} not found")
        images.append(decode_image(path))
    new = [_outputs(rgb) for rgb in images]
    monkeypatch.setattr(segment, "_fill_small_holes", _old_fill_small_holes)
    monkeypatch.setattr(segment, "_moments", _old_moments)
    monkeypatch.setattr(segment, "_label_peaks", _old_label_peaks)
    old = [_outputs(rgb) for rgb in images]
    n_cells = 0
    for (name, (nl, nm), (ol, om)) in zip(FIELDS, new, old):
        assert nl.dtype == ol.dtype and np.array_equal(nl, ol), name
        assert nm == om, name  # boxes, white cells, counts, floats, CellProps: all equal
        n_cells += len(nm[-1])
    assert n_cells > 500


def test_fill_holes_equals_scipy_on_random_masks():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    for p in (0.3, 0.5, 0.7):
        mask = rng.random((97, 131)) < p
        assert np.array_equal(segment._fill_small_holes(mask, None), ndi.binary_fill_holes(mask))
    assert np.array_equal(segment._fill_small_holes(np.ones((5, 5), bool), None), np.ones((5, 5), bool))


def test_centroids_equal_per_pixel_sums_for_cells_and_sprawling_labels():
    """Boxes covering more than 4x the image use the whole-image sums; both give the same values."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, (60, 80)).astype(np.int32)  # every label spans the image
    ref = [(c.id, c.area_px, c.centroid) for c in cell_properties(labels)]
    from scipy import ndimage as ndi

    objs = ndi.find_objects(labels)
    old = _old_moments(labels, objs, 39)
    assert [(i, int(old[0][i]), (old[1][i] / old[0][i], old[2][i] / old[0][i])) for i in range(1, 40)] == ref
    small = np.zeros((60, 80), np.int32)
    small[5:15, 5:20], small[30:50, 40:45], small[52:60, 70:80] = 1, 2, 3
    got = segment._moments(small, ndi.find_objects(small), 3)
    want = _old_moments(small, None, 3)
    for g, o in zip(got, want):
        assert np.array_equal(g[1:], o[1:])


def test_label_peaks_equal_scikit_image_on_real_fields_and_flat_objects(data_dir, monkeypatch):
    """The markers of every 6th IML field and every 6th Chula field (29 fields), and of synthetic
    flat objects, single pixels and ties, are scikit-image's, in the same order."""
    fields = (sorted((data_dir / "iml_malaria_dev" / "images").iterdir())[::6]
              + sorted((data_dir / "chula_rbc" / "images").iterdir())[::6])
    assert len(fields) >= 25
    new = segment._label_peaks
    seen = []

    def both(image, labels, min_distance, threshold):
        got, want = new(image, labels, min_distance, threshold), _old_label_peaks(image, labels, min_distance, threshold)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        seen.append(len(want))
        return got

    monkeypatch.setattr(segment, "_label_peaks", both)
    for f in fields:
        segment_field(decode_image(f))
    assert len(seen) == len(fields) and sum(seen) > 2000

    img = np.zeros((60, 90), np.float32)
    lab = np.zeros((60, 90), np.int32)
    lab[5:20, 5:30], img[5:20, 5:30] = 1, 3.0  # flat: isolated pixels only (none)
    lab[25, 40], img[25, 40] = 2, 5.0  # one pixel
    lab[30:50, 10:60] = 3  # two equal summits (a tie) and a ridge
    img[30:50, 10:60] = 1.0
    img[40, 20] = img[40, 50] = 4.0
    img[35, 10:60] = 2.0
    lab[52:58, 70:72], img[52:58, 70:72] = 4, 9.0  # thin flat object
    lab[2, 80], lab[3, 81], img[2, 80], img[3, 81] = 5, 5, 1.0, 1.0  # diagonal pixels: 4-connected apart
    for md in (1, 2, 5, 12):
        for thr in (0.5, 2.5):
            assert np.array_equal(new(img, lab, md, thr), _old_label_peaks(img, lab, md, thr)), (md, thr)
