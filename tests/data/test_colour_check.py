"""The sampled grayscale check gives the full scan's verdict on every real image and its grayscale copies."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data.io import GRAY_SPREAD, ImageDecodeError, check_colour, decode_image


def _full_scan_is_colour(rgb: np.ndarray) -> bool:
    """The check before sampling: any pixel whose channels spread by more than GRAY_SPREAD."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return bool((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).max() > GRAY_SPREAD)


def _sampled_is_colour(rgb: np.ndarray) -> bool:
    try:
        check_colour(rgb)
        return True
    except ImageDecodeError:
        return False


def _grey_jpeg_rgb(rgb: np.ndarray) -> np.ndarray:
    """A grayscale copy saved as an RGB JPEG (keeps a little chroma noise), decoded."""
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("L").convert("RGB").save(buf, "JPEG", quality=85)
    return decode_image(buf.getvalue())


@pytest.mark.slow
def test_sampled_check_agrees_with_full_scan_on_every_real_image(data_dir, samples_dir):
    """Every 4th NIH cell (5,144 of 20,576), all 120 IML and 54 Chula fields and the bundled samples
    are colour by both checks; their grayscale copies (exact grey, and every 25th as a grey RGB JPEG
    with chroma noise) are grey by both. (All 20,576 cells agreed too, a one-off 6-minute run.)"""
    files = (sorted((data_dir / "nih_cell_images").glob("*/*"))[::4] + sorted((data_dir / "iml_malaria_dev/images").iterdir())
             + sorted((data_dir / "chula_rbc/images").iterdir()) + sorted(samples_dir.glob("*/*.png")))
    assert len(files) >= 5_144 + 120 + 54
    agree = disagree = 0
    for i, f in enumerate(files):
        rgb = decode_image(f)
        copies = [rgb, np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)]
        if i % 25 == 0:
            copies.append(_grey_jpeg_rgb(rgb))
        for k, img in enumerate(copies):
            full, sampled = _full_scan_is_colour(img), _sampled_is_colour(img)
            assert full == (k == 0), (f, k)  # the real image is colour, its copies grey, by today's check
            agree += full == sampled
            disagree += full != sampled
    assert disagree == 0 and agree >= 2 * len(files)


def test_sampled_check_cost_does_not_grow_with_the_image():
    """A 25 Mpx black image (a hostile upload) is refused after reading ~4,096 pixels, not 25 M."""
    black = np.zeros((5000, 5000, 3), np.uint8)
    small = np.zeros((64, 64, 3), np.uint8)
    for img in (black, small):
        with pytest.raises(ImageDecodeError, match="no colour"):
            check_colour(img)
    t0 = time.process_time()
    for _ in range(20):
        with pytest.raises(ImageDecodeError):
            check_colour(black)
    per_call = (time.process_time() - t0) / 20
    assert per_call < 0.005  # the full int16 scan took ~2 s per call on this image


def test_sampled_check_reads_a_grid():
    """A grey image with one coloured pixel on the grid is colour; off the grid it is grey (the
    only way the sampled verdict can differ from the full scan's)."""
    img = np.full((640, 640, 3), 128, np.uint8)
    step = 10  # ceil(sqrt(640 * 640 / 4096))
    img[step // 2 + 3 * step, step // 2 + 7 * step] = (200, 50, 50)
    assert _sampled_is_colour(img)
    img2 = np.full((640, 640, 3), 128, np.uint8)
    img2[step // 2 + 1, step // 2] = (200, 50, 50)
    assert not _sampled_is_colour(img2) and _full_scan_is_colour(img2)


def test_a_strip_thinner_than_half_a_step_is_checked_not_crashed(samples_dir):
    """A 1-pixel-high (or -wide) strip cut from a real cell: the grid's offset stays inside the
    image, so the strip is judged by its pixels (colour), and its grayscale copy is refused."""
    cell = decode_image(sorted(samples_dir.glob("Parasitized/*.png"))[0])
    row = np.ascontiguousarray(np.tile(cell[cell.shape[0] // 2 : cell.shape[0] // 2 + 1], (1, 100, 1)))  # 1 x ~13,000 px
    for strip in (row, np.ascontiguousarray(row.transpose(1, 0, 2))):
        assert strip.shape[0] == 1 or strip.shape[1] == 1
        assert _sampled_is_colour(strip) == _full_scan_is_colour(strip) is True
        grey = np.repeat(strip[..., :1], 3, axis=2)
        assert not _sampled_is_colour(grey)
