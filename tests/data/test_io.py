"""Decoding: every bad-input kind gets a clear ImageDecodeError; odd-but-valid inputs decode."""

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data.io import ImageDecodeError, check_colour, decode_image


@pytest.fixture
def sample_cell(samples_dir):
    """A bundled NIH cell PNG (always present) and its RGB pixels."""
    path = sorted((samples_dir / "Parasitized").glob("*.png"))[0]
    return path, np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def real_cell(nih_dir):
    path = sorted((nih_dir / "Parasitized").iterdir())[0]
    return path, np.asarray(Image.open(path).convert("RGB"))


def _encode(arr_or_img, fmt, **kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP"])
def test_lossless_formats_decode_by_content_not_extension(real_cell, tmp_path, fmt):
    _, rgb = real_cell
    p = tmp_path / "cell.jpg"  # misleading extension on purpose
    p.write_bytes(_encode(rgb, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    out = decode_image(p)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close(real_cell):
    _, rgb = real_cell
    out = decode_image(_encode(rgb, "JPEG", quality=95))
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 4


def test_rgba_composited_on_black(real_cell):
    _, rgb = real_cell
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:5, :5, 3] = 0  # transparent corner -> black
    out = decode_image(_encode(rgba, "PNG"))
    np.testing.assert_array_equal(out[5:, 5:], rgb[5:, 5:])
    assert out[:5, :5].max() == 0


def test_grayscale_and_16bit(real_cell):
    _, rgb = real_cell
    gray = rgb.mean(2).astype(np.uint8)
    out = decode_image(_encode(gray, "PNG"))
    assert out.shape == (*gray.shape, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    g16 = gray.astype(np.uint16) * 257  # 16-bit grayscale PNG, full range
    out16 = decode_image(_encode(Image.fromarray(g16), "PNG"))
    assert out16.dtype == np.uint8 and out16.shape == (*gray.shape, 3)
    assert np.abs(out16[..., 0].astype(int) - gray).max() <= 1
    np.testing.assert_array_equal(decode_image(rgb.astype(np.uint16) * 257), rgb)


def test_check_colour_refuses_grayscale_of_a_real_cell(real_cell):
    """Grayscale decodes (above) but the classifying paths refuse it: the grayscale copy of a real
    infected cell, as L, as RGB with equal channels and as an RGB JPEG (chroma noise), is refused;
    the colour cell and a colour JPEG of it pass unchanged."""
    _, rgb = real_cell
    assert check_colour(rgb) is rgb
    assert check_colour(decode_image(_encode(rgb, "JPEG", quality=75))).shape == rgb.shape
    gray = rgb.mean(2).astype(np.uint8)
    for data in (_encode(gray, "PNG"), _encode(np.dstack([gray] * 3), "PNG"),
                 _encode(np.dstack([gray] * 3), "JPEG", quality=75)):
        with pytest.raises(ImageDecodeError, match="no colour"):
            check_colour(decode_image(data))
    with pytest.raises(ImageDecodeError, match=r"\(H, W, 3\)"):
        check_colour(gray)


def test_palette_and_cmyk(real_cell):
    _, rgb = real_cell
    pal = Image.fromarray(rgb).convert("P")
    assert decode_image(_encode(pal, "PNG")).shape == rgb.shape
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert decode_image(_encode(cmyk, "JPEG")).shape == rgb.shape


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"this is a text file, not an image\n" * 10, "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    ],
)
def test_bad_bytes_raise_clear_errors(tmp_path, payload, message):
    p = tmp_path / "bad.png"
    p.write_bytes(payload)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(p)


def test_truncated_real_file(real_cell, tmp_path):
    path, _ = real_cell
    data = _encode(np.asarray(Image.open(path).convert("RGB")), "PNG")
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(p)


def test_huge_image_rejected_before_decoding(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("RGB", (3000, 3000)).save(p)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(p, max_pixels=4_000_000)
    assert decode_image(p, max_pixels=10_000_000).shape == (3000, 3000, 3)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        decode_image(tmp_path)


def test_bad_arrays():
    with pytest.raises(ImageDecodeError, match="shape"):
        decode_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageDecodeError, match="dtype"):
        decode_image(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ImageDecodeError, match="NaN"):
        decode_image(np.full((4, 4, 3), np.nan))


# -- special files: a named pipe must never be opened for reading ------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipe_refused_as_not_a_regular_file(tmp_path, call_releasing_fifo):
    fifo = tmp_path / "cell.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file: a named pipe"):
        call_releasing_fifo(lambda: decode_image(fifo), fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):  # through a symlink too
        (tmp_path / "link.png").symlink_to(fifo)
        call_releasing_fifo(lambda: decode_image(tmp_path / "link.png"), fifo)


def test_broken_symlink_named_as_such(tmp_path, sample_cell):
    link = tmp_path / "cell.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageDecodeError, match="broken symbolic link"):
        decode_image(link)
    link.unlink()
    link.symlink_to(sample_cell[0])  # a good link decodes
    np.testing.assert_array_equal(decode_image(link), sample_cell[1])


# -- float arrays ------------------------------------------------------------------------------


def test_float_array_must_be_in_unit_range(sample_cell):
    _, rgb = sample_cell
    np.testing.assert_array_equal(decode_image(rgb.astype(np.float32) / 255), rgb)
    with pytest.raises(ImageDecodeError, match=r"values up to 2\d\d.*divide a 0\.\.255 image by 255"):
        decode_image(rgb.astype(np.float32))  # a float copy of a uint8 image: not silently white
    with pytest.raises(ImageDecodeError, match="values down to -0.5"):
        decode_image(np.full((4, 4, 3), -0.5))
    assert isinstance(ImageDecodeError("x"), ValueError)


# -- one size limit, max_pixels, whatever the format or thread ----------------------------------


OVER_MESSAGE = "image too large: 10001x10000 px = 100,010,000 px > limit 100,000,000 px"


@pytest.mark.slow
def test_size_limit_is_max_pixels_and_the_same_in_every_thread(limit_pngs):
    under, over = limit_pngs
    with pytest.raises(ImageDecodeError) as info:
        decode_image(over)
    assert str(info.value) == OVER_MESSAGE
    with warnings.catch_warnings():  # Pillow's guard, even made an error, never refuses an image under the limit
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert decode_image(under).shape == (9_500, 10_000, 3)
        with pytest.raises(ImageDecodeError, match=r"^image too large: .*100,000,000 px"):
            decode_image(over)

    def outcome(path):
        try:
            return decode_image(path).shape
        except ImageDecodeError as exc:
            return str(exc)

    jobs = [over] * 24
    jobs[5] = jobs[17] = under  # decoded while other threads check the oversize file
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(outcome, jobs))
    assert got[5] == got[17] == (9_500, 10_000, 3)
    assert {g for i, g in enumerate(got) if i not in (5, 17)} == {OVER_MESSAGE}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_size_limit_checked_for_every_format(sample_cell, fmt):
    _, rgb = sample_cell
    data = _encode(rgb, fmt)
    h, w = rgb.shape[:2]
    with pytest.raises(ImageDecodeError, match=rf"^image too large: {w}x{h} px = {w * h:,} px > limit {w * h - 1:,} px$"):
        decode_image(data, max_pixels=w * h - 1)
    assert decode_image(data, max_pixels=w * h).shape == (h, w, 3)
