import os

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data.dataset import list_image_files, load_cell_set, scan_image_folder
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


def test_letterbox_gives_opencv_uint8_area_pixels(nih_dir):
    """letterbox resizes a float32 copy (cheaper): the pixels must equal OpenCV's uint8 INTER_AREA,
    padded, on real cells and on random images of non-integer ratios."""
    cv2 = pytest.importorskip("cv2")
    from malaria_screen.data.io import decode_image

    rng = np.random.default_rng(0)
    images = [decode_image(f) for f in sorted(nih_dir.glob("*/*"))[::100]]
    images += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((97, 131), (395, 61), (65, 65), (300, 299))]
    images += [np.full((131, 77, 3), 255, np.uint8)]  # the top of the range stays 255
    assert len(images) >= 200
    for img in images:
        h, w = img.shape[:2]
        for size in (64, 32):
            s = size / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            if s >= 1:
                continue
            ref = np.zeros((size, size, 3), np.uint8)
            top, left = (size - nh) // 2, (size - nw) // 2
            ref[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            assert np.array_equal(letterbox(img, size), ref), (img.shape, size)


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


def _samples_dataset(samples_dir, root):
    """The bundled NIH samples, symlinked into ``root/<Class>/``."""
    for cls in ("Parasitized", "Uninfected"):
        (root / cls).mkdir(parents=True)
        for f in sorted((samples_dir / cls).glob("*.png")):
            (root / cls / f.name).symlink_to(f)
    return root


def test_list_image_files_keeps_named_missing_paths_for_decoding_to_report(tmp_path, samples_dir):
    real = sorted((samples_dir / "Uninfected").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "deleted.png")
    named = [tmp_path / "typo.png", broken, real]
    assert list_image_files(named) == named
    assert list_image_files([tmp_path / "no_such_folder"]) == [tmp_path / "no_such_folder"]


def test_broken_symlink_in_dataset_is_a_per_file_error(tmp_path, samples_dir):
    root = _samples_dataset(samples_dir, tmp_path / "ds")
    bad = "Uninfected/C999P1ThinF_IMG_20150101_000000_cell_1.png"
    (root / bad).symlink_to(tmp_path / "moved_away.png")
    cs = load_cell_set(root, size_px=32, cache_dir=tmp_path / "cache", progress=False)
    assert len(cs) == 24 and bad not in cs.relpaths
    assert list(cs.errors) == [bad] and "broken symbolic link" in cs.errors[bad]
    (root / bad).unlink()  # the link repaired: a new store, keyed on the file's content
    (root / bad).symlink_to(sorted((samples_dir / "Uninfected").glob("*.png"))[0])
    cs2 = load_cell_set(root, size_px=32, cache_dir=tmp_path / "cache", progress=False)
    assert len(cs2) == 25 and not cs2.errors and len(list((tmp_path / "cache").glob("*.npy"))) == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipe_in_dataset_is_a_per_file_error(tmp_path, samples_dir, call_releasing_fifo):
    root = _samples_dataset(samples_dir, tmp_path / "ds")
    bad = "Parasitized/C999P1ThinF_IMG_20150101_000000_cell_2.png"
    os.mkfifo(root / bad)
    assert bad in scan_image_folder(root)[0]  # listed, never opened
    cs = call_releasing_fifo(lambda: load_cell_set(root, size_px=32, cache_dir="", progress=False), root / bad)
    assert len(cs) == 24 and list(cs.errors) == [bad] and "not a regular file" in cs.errors[bad]
