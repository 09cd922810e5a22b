"""Decoding: every bad-input kind gets a clear ImageDecodeError; odd-but-valid inputs decode."""

import io

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data.io import ImageDecodeError, decode_image


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
