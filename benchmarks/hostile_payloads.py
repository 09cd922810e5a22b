"""Hostile inputs of issue 23, built locally and deterministically (seeded), for the test battery
(``tests/serve/test_hostile.py``) and the mixed-load benchmark (``loadtest_hostile.py``).

Each builder returns bytes; the sizes match the audit's: a 5000x5000 random-noise JPEG (~7 MB,
inside 8 MiB / 25 Mpx), a 5000x5000 black PNG (~73 KB), a GIF of 550,000 one-pixel frames
(~8 MB), and the raw HTTP bodies the audit used (multipart without its closing boundary, a text
part named ``files``).
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["black_png", "gif_frames", "multipart", "noise_jpeg"]


def noise_jpeg(side: int = 5000, *, seed: int = 0, quality: int = 75) -> bytes:
    """``side`` x ``side`` uniform RGB noise as a JPEG (5000 px: about 7 MB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def black_png(side: int = 5000) -> bytes:
    """``side`` x ``side`` black RGB PNG (5000 px: about 73 KB of file, 25 Mpx of pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def gif_frames(n_frames: int = 550_000) -> bytes:
    """A 1x1 GIF89a of ``n_frames`` frames (550,000: about 8 MB), written byte by byte.

    Each frame is an Image Descriptor (10 bytes), LZW minimum code size 2 and one data sub-block
    holding the codes clear (4), pixel 0, end (5), 3 bits each: 15 bytes a frame.
    """
    import struct

    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02" + b"\x02\x44\x01" + b"\x00"
    return head + frame * n_frames + b"\x3b"


def multipart(parts: list[tuple[str, str | None, bytes]], *, boundary: str = "hostileboundary",
              close: bool = True) -> tuple[bytes, str]:
    """A raw ``multipart/form-data`` body and its Content-Type.

    Parameters
    ----------
    parts : list of (name, filename or None, data)
        ``filename`` None makes a text part.
    close : bool, default=True
        False leaves out the closing boundary (a truncated upload).
    """
    out = bytearray()
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
