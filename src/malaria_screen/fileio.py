"""Atomic file writes: a crash or kill never leaves a half-written output behind.

Each function writes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination with :func:`os.replace` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "file_sha256",
           "rows_to_csv", "read_point_labels"]


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Call ``writer(fh)`` on a temporary binary file, then move it to ``path`` atomically.

    The temporary file sits in the same folder (so :func:`os.replace` is a rename, never a copy)
    under a short name (``.<first 16 characters of the name>.<8 random>.tmp``, at most 79 bytes),
    so any name valid for ``path`` (up to the usual 255-byte limit) can be written. Parent folders
    are created.

    Parameters
    ----------
    path : str or Path
        Destination file; replaced if it exists.
    writer : callable
        ``writer(fh)`` writes the content to the binary file object ``fh``.

    Returns
    -------
    path : Path

    Raises
    ------
    OSError
        If the folder or file cannot be written. On this or any exception from ``writer``,
        ``path`` is left as it was and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:16]}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (bounded memory).

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically; NaN and infinities become ``null``."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False) + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    try:
        if isinstance(o, np.floating):
            return _finite(float(o))
        if isinstance(o, np.ndarray):
            return _finite(o.tolist())
    except ImportError:  # pragma: no cover
        pass
    return o


def rows_to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV text (header + one line per dict row; missing or None values empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def _json_default(o: Any) -> Any:
    try:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_point_labels(path: str | Path) -> np.ndarray:
    """``(N, 2)`` float64 ``(x, y)`` pixel centres from a ``x y type`` label file (empty file: ``(0, 2)``)."""
    pts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pts.append((float(parts[0]), float(parts[1])))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)
