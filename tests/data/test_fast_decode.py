"""The fast decoders (libspng, libjpeg-turbo, OpenCV) give Pillow's pixels and Pillow's errors on real files.

The reference is ``decode_image`` as it was before them: the same function with the fast
decoders switched off, so that Pillow decodes everything.
"""

import io
import os
import struct
import zlib
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from malaria_screen.data import io as dio
from malaria_screen.data.io import ImageDecodeError, decode_image, fast_decoders


@contextmanager
def _pillow_only():
    mp = pytest.MonkeyPatch()
    try:
        for name in ("pyspng", "simplejpeg", "cv2"):
            mp.setattr(dio, name, None)
        yield
    finally:
        mp.undo()


def _outcome(src):
    try:
        return decode_image(src)
    except ImageDecodeError as exc:
        return str(exc)


def _reference(src):
    with _pillow_only():
        return _outcome(src)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls of each fast decoder (so a test knows the fast path was taken)."""
    calls = Counter()

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(dio.pyspng, "load", counting("png", dio.pyspng.load))
    monkeypatch.setattr(dio.simplejpeg, "decode_jpeg", counting("jpeg", dio.simplejpeg.decode_jpeg))
    monkeypatch.setattr(dio.cv2, "imdecode", counting("webp", dio.cv2.imdecode))
    return calls


def _same(path) -> None:
    ref = _reference(path)
    assert not isinstance(ref, str), (path, ref)
    np.testing.assert_array_equal(decode_image(path), ref, err_msg=str(path))
    np.testing.assert_array_equal(decode_image(path.read_bytes()), ref, err_msg=f"{path} (bytes)")


def test_fast_decoders_are_installed():
    """The dev install has the wheels (pyspng, simplejpeg, OpenCV): the tests below exercise them."""
    assert fast_decoders() == {"PNG": "libspng (pyspng)", "JPEG": "libjpeg-turbo (simplejpeg)", "WebP": "OpenCV",
                               "other": "Pillow"}


def test_png_and_webp_same_pixels_on_nih_cells(nih_dir, samples_dir, tmp_path, fast_calls):
    """Every 40th NIH cell (515 of 20,576; lossless WebP here) written back to PNG, as the public
    release has them, and the bundled original PNGs: libspng gives Pillow's pixels; OpenCV on the
    WebP too."""
    cells = sorted(nih_dir.glob("*/*"))[::40]
    assert len(cells) >= 500
    for f in cells:
        rgb = _reference(f)
        png = tmp_path / (f.stem + ".png")
        Image.fromarray(rgb).save(png, compress_level=6)
        np.testing.assert_array_equal(decode_image(png), rgb, err_msg=str(png))
        np.testing.assert_array_equal(decode_image(f), rgb, err_msg=str(f))
    samples = sorted(samples_dir.glob("*/*.png"))
    assert len(samples) >= 20
    for f in samples:
        _same(f)
    assert fast_calls["png"] == len(cells) + 2 * len(samples) and fast_calls["webp"] == len(cells)


@pytest.mark.parametrize("folder", ["iml_malaria_dev/images", "chula_rbc/images"])
def test_jpeg_same_pixels_on_every_field(data_dir, folder, fast_calls):
    """libjpeg-turbo through simplejpeg (accurate IDCT, fancy upsampling) equals Pillow on all 120
    IML and 54 Chula JPEG fields, bit for bit."""
    files = sorted(p for p in (data_dir / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    assert len(files) >= 50
    for f in files:
        _same(f)
    assert fast_calls["jpeg"] == 2 * len(files)


def test_jpeg_variants_same_pixels(data_dir, tmp_path, fast_calls):
    """Grey, progressive, 4:4:4 and 4:2:0 JPEGs take the fast path with Pillow's pixels; a CMYK
    JPEG goes to Pillow."""
    field = _reference(sorted((data_dir / "iml_malaria_dev/images").iterdir())[0])[:300, :400]
    im = Image.fromarray(field)
    variants = {"grey": (im.convert("L"), {}), "progressive": (im, {"progressive": True, "quality": 90}),
                "444": (im, {"subsampling": 0}), "420": (im, {"subsampling": 2, "quality": 75})}
    for name, (img, kw) in variants.items():
        p = tmp_path / f"{name}.jpg"
        img.save(p, "JPEG", **kw)
        _same(p)
    assert fast_calls["jpeg"] == 2 * len(variants)
    im.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    _same(tmp_path / "cmyk.jpg")
    assert fast_calls["jpeg"] == 2 * len(variants)


def test_png_variants_same_pixels(samples_dir, tmp_path, fast_calls):
    """RGBA (composited on black) and gAMA-tagged PNGs on the fast path; palette, grey, 16-bit and
    tRNS-keyed PNGs through Pillow; all with Pillow's pixels."""
    rgb = _reference(sorted(samples_dir.glob("*/*.png"))[0])
    alpha = np.where(np.arange(rgb.shape[1]) % 3 == 0, 77, 255).astype(np.uint8)
    rgba = np.dstack([rgb, np.broadcast_to(alpha, rgb.shape[:2])])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    data = (tmp_path / "rgba.png").read_bytes()
    body = b"gAMA" + struct.pack(">I", 100_000)  # neither decoder may apply gamma
    (tmp_path / "gama.png").write_bytes(data[:33] + struct.pack(">I", 4) + body + struct.pack(">I", zlib.crc32(body)) + data[33:])
    for name in ("rgba", "gama"):
        _same(tmp_path / f"{name}.png")
    assert fast_calls["png"] == 4
    slow = {"palette": (Image.fromarray(rgb).convert("P"), {"transparency": 0}), "grey": (Image.fromarray(rgb).convert("L"), {}),
            "trns": (Image.fromarray(rgb), {"transparency": tuple(int(v) for v in rgb[0, 0])}),
            "i16": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), {})}
    for name, (img, kw) in slow.items():
        img.save(tmp_path / f"{name}.png", **kw)
        _same(tmp_path / f"{name}.png")
    assert fast_calls["png"] == 4


def test_corrupt_files_get_pillows_errors(samples_dir, data_dir, tmp_path):
    """A fast decoder failing hands the file to Pillow: the same error (or pixels) as before."""
    png = sorted(samples_dir.glob("*/*.png"))[0].read_bytes()
    jpg = sorted((data_dir / "chula_rbc/images").iterdir())[0].read_bytes()
    bad = {"png_cut": png[: len(png) // 2], "jpg_cut": jpg[: len(jpg) // 2], "png_head": png[:40], "jpg_head": jpg[:30],
           "png_flip": png[:200] + bytes(b ^ 0x5A for b in png[200:260]) + png[260:],
           "jpg_flip": jpg[:2000] + bytes(b ^ 0x5A for b in jpg[2000:2200]) + jpg[2200:]}
    for name, data in bad.items():
        p = tmp_path / name
        p.write_bytes(data)
        for src in (p, data):
            want, got = _reference(src), _outcome(src)
            if isinstance(want, str):
                assert got == want, (name, got, want)
            else:  # Pillow decodes it (libjpeg conceals a damaged block): the same pixels
                np.testing.assert_array_equal(got, want, err_msg=name)
    assert isinstance(_outcome(tmp_path / "png_cut"), str) and isinstance(_outcome(tmp_path / "jpg_head"), str)


def test_size_limit_and_hook_come_before_fast_decoding(samples_dir, fast_calls):
    png = sorted(samples_dir.glob("*/*.png"))[0]
    w, h = Image.open(png).size
    with pytest.raises(ImageDecodeError, match=f"image too large: {w}x{h} px"):
        decode_image(png, max_pixels=w * h - 1)
    assert fast_calls["png"] == 0
    seen = []
    decode_image(png, on_size=lambda *wh: seen.append(wh))
    assert seen == [(w, h)] and fast_calls["png"] == 1


def test_large_files_are_left_to_pillow(samples_dir, monkeypatch, fast_calls):
    """A file over the fast path's byte limit streams through Pillow instead of being read whole."""
    png = sorted(samples_dir.glob("*/*.png"))[0]
    monkeypatch.setattr(dio, "_FAST_MAX_BYTES", os.path.getsize(png) - 1)
    np.testing.assert_array_equal(decode_image(png), _reference(png))
    assert fast_calls["png"] == 0
