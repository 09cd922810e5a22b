import time

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data.dataset import load_cell_set
from malaria_screen.data.preprocess import letterbox


def test_numpy_area_resize_matches_opencv_on_real_cells(nih_dir):
    """The runtime install (no OpenCV) must feed the model the same pixels as OpenCV does."""
    cv2 = pytest.importorskip("cv2")
    from malaria_screen.data.io import decode_image
    from malaria_screen.data.preprocess import area_resize

    files = sorted(nih_dir.glob("*/*"))[::400]
    assert len(files) >= 40
    for f in files:
        img = decode_image(f)
        h, w = img.shape[:2]
        for size in (64, 32):
            s = size / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            assert np.array_equal(area_resize(img, nh, nw), ref), (f.name, size)
    # non-integer ratios of a random image: within one grey level
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    ref = cv2.resize(img, (50, 37), interpolation=cv2.INTER_AREA)
    assert np.abs(area_resize(img, 37, 50).astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="downscales"):
        area_resize(img, 200, 50)


def test_letterbox_keeps_aspect_and_pads_black():
    img = np.full((40, 80, 3), 200, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:16] == 0).all() and (out[-16:] == 0).all()  # 80x40 -> 64x32, centred
    assert (out[16:48] == 200).all()
    up = letterbox(np.full((10, 10, 3), 50, np.uint8), 64)
    assert up.shape == (64, 64, 3) and abs(int(up[32, 32, 0]) - 50) <= 1
    with pytest.raises(ValueError, match="shape"):
        letterbox(np.zeros((5, 5), np.uint8), 8)


def test_cell_store_cached_and_keyed_by_content(nih_dir, tmp_path, make_subset):
    root = make_subset(nih_dir, tmp_path / "ds", ["P1", "C1_thinF"])
    cache = tmp_path / "cache"
    a = load_cell_set(root, size_px=32, cache_dir=cache, progress=False)
    assert a.images.shape[1:] == (32, 32, 3) and a.images.dtype == np.uint8
    assert a.class_names == ["Parasitized", "Uninfected"]
    assert set(a.patients) == {"P1", "C1_thinF"}
    assert len(list(cache.glob("*.npy"))) == 1
    b = load_cell_set(root, size_px=32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    assert b.relpaths == a.relpaths
    load_cell_set(root, size_px=48, cache_dir=cache, progress=False)  # other size, other store
    assert len(list(cache.glob("*.npy"))) == 2
    # a bad file added to the folder: new store, the file is reported and left out
    (root / "Uninfected" / "C1_thinF_IMG_broken_cell_1.png").write_bytes(b"not an image")
    c = load_cell_set(root, size_px=32, cache_dir=cache, progress=False)
    assert len(c) == len(a) and list(c.errors) == ["Uninfected/C1_thinF_IMG_broken_cell_1.png"]
    assert len(list(cache.glob("*.npy"))) == 3


def test_more_class_folders_more_classes(tmp_path):
    for k, cls in enumerate(["a", "b", "c"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * k, np.uint8)).save(tmp_path / cls / f"img{k}{i}.png")
    with pytest.warns(UserWarning):
        cs = load_cell_set(tmp_path, size_px=16, cache_dir="", group_per_image=True, progress=False)
    assert cs.class_names == ["a", "b", "c"] and sorted(set(cs.labels.tolist())) == [0, 1, 2]
    with pytest.raises(ValueError, match="no patient id"):
        load_cell_set(tmp_path, size_px=16, cache_dir="", progress=False)
