"""Read a cell image folder in the NIH layout into a cached uint8 array store.

Layout: ``<root>/<ClassName>/**/<image>``; one sub-folder per class (``Parasitized``,
``Uninfected`` for the NIH set; more folders, more classes). Files are decoded by content
(:mod:`malaria_screen.data.io`), letterboxed to a square (:func:`letterbox`) in parallel threads
(as seed 000 does with ``ThreadPoolExecutor``) and stored as one ``(N, S, S, 3) uint8`` array.

The store is keyed by the dataset's content (every file's relative path, byte size and
modification time) and the target size, so a changed, added or removed file, or another size,
builds a new store; a second run with the same data loads it back in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.data.io import ImageDecodeError, decode_image, is_image_entry
from malaria_screen.fileio import atomic_write, atomic_write_json
from malaria_screen.data.patients import patient_ids_from_names, read_groups_csv
from malaria_screen.data.preprocess import letterbox

__all__ = ["CellSet", "scan_image_folder", "load_cell_set", "default_cache_dir", "list_image_files", "unique_real_paths"]

log = logging.getLogger(__name__)

_STORE_VERSION = 2


def default_cache_dir() -> Path:
    """``$MALARIA_SCREEN_CACHE``, else ``$XDG_CACHE_HOME/malaria-screen``, else ``~/.cache/malaria-screen``."""
    env = os.environ.get("MALARIA_SCREEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "malaria-screen"


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named by ``paths``, folders walked recursively, sorted.

    A folder contributes the entries :func:`~malaria_screen.data.io.is_image_entry` takes for
    images (not hidden, not a known non-image file such as ``.txt``/``.json``/``.csv``); hidden
    subfolders are not walked.

    Nothing is opened, so a named pipe in a folder cannot block the listing; it is listed, and
    decoding (:func:`~malaria_screen.data.io.open_image_file`) refuses it. A path that is not a
    folder is returned as given, even when it does not exist or is a broken symbolic link, so
    that decoding reports it as one failed file and the rest of a batch goes on.

    Parameters
    ----------
    paths : sequence of str or Path
        Files and folders.

    Returns
    -------
    files : list of Path
        In the order of ``paths``; the files of each folder sorted.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if is_image_entry(f):
                        out.append(Path(dirpath) / f)
        else:  # a file, or a missing path / broken link that decoding will report
            out.append(p)
    return out


def _real_path(path: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(path)``, with the folder's resolution looked up in (and added to) ``folders``.

    realpath resolves a path component by component, so a file that is not itself a symbolic
    link resolves to its resolved folder joined with its name; a link, ``.`` or ``..`` is left to
    realpath itself. A missing file is not a link: it too is its folder's path plus its name."""
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except OSError:  # missing or unreadable: realpath keeps the name as it stands
        pass
    real_head = folders.get(head)
    if real_head is None:
        real_head = folders[head] = os.path.realpath(head or os.curdir)
    return os.path.join(real_head, tail)


def unique_real_paths(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` without the repeats of a file already named by another spelling or link.

    Two paths name the same file when their :func:`os.path.realpath` is equal (``a.png``,
    ``./a.png``, ``dir/../a.png`` and a symbolic link to it); the first spelling is kept. A
    missing path or broken link is compared by the path it resolves to, so it too is kept once.
    Nothing is opened.

    Parameters
    ----------
    paths : sequence of str or Path

    Returns
    -------
    list of Path
        In the order of ``paths``.
    """
    seen: set[str] = set()
    out: list[Path] = []
    folders: dict[str, str] = {}  # each folder resolved once: one lstat per file, not one per component
    for p in map(Path, paths):
        key = _real_path(str(p), folders)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@dataclass
class CellSet:
    """Decoded cells of one image folder.

    Attributes
    ----------
    images : (N, S, S, 3) ndarray of uint8
        Letterboxed RGB cells, S = ``size_px``.
    labels : (N,) ndarray of int64
        Index into ``class_names``.
    patients : list of str of length N
        Patient (grouping) id of each cell.
    relpaths : list of str of length N
        Path of each cell relative to ``root``, POSIX separators.
    class_names : list of str
        Sorted class folder names (the NIH set gives ``["Parasitized", "Uninfected"]``).
    root : Path
    size_px : int
    errors : dict of str to str
        Files that could not be decoded, relative path to message; they are left out.
    """

    images: np.ndarray
    labels: np.ndarray
    patients: list[str]
    relpaths: list[str]
    class_names: list[str]
    root: Path
    size_px: int
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "CellSet":
        """The cells at integer indices ``idx``, as a new :class:`CellSet`."""
        idx = np.asarray(idx, dtype=np.int64)
        return CellSet(
            images=self.images[idx],
            labels=self.labels[idx],
            patients=[self.patients[i] for i in idx],
            relpaths=[self.relpaths[i] for i in idx],
            class_names=list(self.class_names),
            root=self.root,
            size_px=self.size_px,
            errors=dict(self.errors),
        )


def scan_image_folder(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """List the cell files of an image folder in the NIH layout.

    Returns
    -------
    relpaths : list of str
        Relative POSIX paths, sorted by class then path.
    labels : (N,) ndarray of int64
    class_names : list of str
        Sorted names of the class sub-folders.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If ``root`` has fewer than two non-empty class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    relpaths: list[str] = []
    labels: list[int] = []
    kept: list[str] = []
    for name in class_names:
        files = list_image_files([root / name])
        if not files:
            log.warning("class folder %s is empty: ignored", root / name)
            continue
        k = len(kept)
        kept.append(name)
        for f in files:
            relpaths.append(f.relative_to(root).as_posix())
            labels.append(k)
    if len(kept) < 2:
        raise ValueError(f"{root}: need at least two non-empty class folders (e.g. Parasitized/, Uninfected/), found {kept}")
    return relpaths, np.asarray(labels, dtype=np.int64), kept


def _fingerprint(root: Path, relpaths: Sequence[str], size_px: int) -> str:
    """Store key: hash of every file's relative path, byte size and mtime (symlinks followed).

    A file that cannot be stat'ed (a broken symbolic link, a file removed since the listing)
    enters the key as unreadable instead of failing the whole set: decoding reports it.
    """
    h = hashlib.sha256(f"v{_STORE_VERSION}|size={size_px}|".encode())
    for rp in relpaths:
        try:
            st = (root / rp).stat()
            h.update(f"{rp}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError as exc:
            h.update(f"{rp}|unreadable:{exc.errno}\n".encode())
    return h.hexdigest()[:24]


def _decode_one(path: Path, size_px: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return letterbox(decode_image(path), size_px), None
    except ImageDecodeError as exc:
        return None, str(exc)


def load_cell_set(
    root: str | Path,
    *,
    size_px: int = 64,
    cache_dir: str | Path | None = None,
    groups_csv: str | Path | None = None,
    group_per_image: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> CellSet:
    """Decode, letterbox and cache every cell of an NIH-layout folder.

    Parameters
    ----------
    root : path
        Dataset folder with one sub-folder per class.
    size_px : int, default=64
        Side of the stored square cells, in pixels.
    cache_dir : path, optional
        Where stores live; default :func:`default_cache_dir`. ``cache_dir=False``-like empty
        string disables caching.
    groups_csv : path, optional
        ``path,patient`` CSV for non-NIH names (see :func:`read_groups_csv`).
    group_per_image : bool, default=False
        Group per image (leaky; warned) when no patient information exists.
    workers : int, optional
        Decoding threads; default ``min(8, os.cpu_count() + 2)``.
    progress : bool, default=True
        Show a progress bar while decoding.

    Returns
    -------
    CellSet
        Files that failed to decode are left out and listed in ``errors``.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`scan_image_folder`; ``ValueError`` also if patients cannot be found.
    """
    root = Path(root).resolve()
    relpaths, labels, class_names = scan_image_folder(root)
    groups = read_groups_csv(groups_csv) if groups_csv else None
    patients = patient_ids_from_names(relpaths, groups=groups, per_image=group_per_image)

    key = _fingerprint(root, relpaths, size_px)
    cdir = Path(cache_dir) if cache_dir not in (None, "") else (default_cache_dir() if cache_dir is None else None)
    store = meta_path = None
    if cdir is not None:
        cdir.mkdir(parents=True, exist_ok=True)
        store, meta_path = cdir / f"cells-{key}.npy", cdir / f"cells-{key}.json"
    if store is not None and store.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        ok, images, errors = np.asarray(meta["kept"], dtype=np.int64), np.load(store), meta["errors"]
        log.info("loaded %d cells from cache %s", len(images), store)
    else:
        ok, images, errors = _decode_all(root, relpaths, size_px, workers=workers, progress=progress)
        if store is not None:
            atomic_write(store, lambda fh: np.save(fh, images))
            atomic_write_json(meta_path, {"root": str(root), "size_px": size_px, "kept": ok.tolist(), "errors": errors}, indent=None)
    return CellSet(
        images=images,
        labels=labels[ok],
        patients=[patients[i] for i in ok],
        relpaths=[relpaths[i] for i in ok],
        class_names=class_names,
        root=root,
        size_px=size_px,
        errors=errors,
    )


def _decode_all(root: Path, relpaths: list[str], size_px: int, *, workers: int | None, progress: bool):
    """Decode + letterbox every file in threads: (kept indices, (n_kept, S, S, 3) uint8, errors)."""
    n = len(relpaths)
    images = np.zeros((n, size_px, size_px, 3), dtype=np.uint8)
    ok_mask = np.zeros(n, dtype=bool)
    errors: dict[str, str] = {}
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"decode+resize {size_px}px", unit="cell", leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (img, err) in enumerate(pool.map(lambda rp: _decode_one(root / rp, size_px), relpaths, chunksize=64)):
            if err is None:
                images[i] = img
                ok_mask[i] = True
            else:
                errors[relpaths[i]] = err
                log.warning("skipping %s: %s", relpaths[i], err)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    ok = np.flatnonzero(ok_mask)
    return ok, (images[ok] if len(ok) < n else images), errors
