"""Cells of one part (train / val / test) of a run's patient split, decoded for calibration and checks.

A run folder's ``split.json`` lists, per part, the files (relative to the NIH data folder) and
patients. int8 calibration must see TRAINING patients only; parity and accuracy checks use TEST
patients only. Files are resolved against the data folder given by the caller (default
``$MALARIA_SCREEN_DATA/nih_cell_images``) and decoded exactly as inference does
(:func:`~malaria_screen.data.io.decode_image`, :func:`~malaria_screen.data.preprocess.letterbox`).

Torch-free: numpy, Pillow and ``malaria_screen.data`` only.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_screen.data.io import decode_image
from malaria_screen.data.patients import patient_ids_from_names
from malaria_screen.data.preprocess import letterbox

__all__ = ["SplitCells", "default_nih_dir", "load_split_cells"]

log = logging.getLogger(__name__)


def default_nih_dir() -> Path:
    """``$MALARIA_SCREEN_DATA/nih_cell_images`` (``MALARIA_SCREEN_DATA`` defaults to ``../shared/data``)."""
    return Path(os.environ.get("MALARIA_SCREEN_DATA", "../shared/data")) / "nih_cell_images"


@dataclass(frozen=True)
class SplitCells:
    """Decoded cells of one split part.

    Attributes
    ----------
    cells : (N, S, S, 3) ndarray of uint8
        Letterboxed RGB cells.
    y : (N,) ndarray of int64
        1 = positive class (Parasitized), 0 = other.
    patients : list of str of length N
    files : list of str of length N
        Paths relative to the data folder.
    part : str
    """

    cells: np.ndarray
    y: np.ndarray
    patients: list[str]
    files: list[str]
    part: str

    @property
    def n_patients(self) -> int:
        return len(set(self.patients))


def load_split_cells(
    split_json: str | Path,
    data_dir: str | Path,
    part: str,
    size_px: int,
    *,
    positive_class: str = "Parasitized",
    n: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> SplitCells:
    """Decode the cells of one part of a saved patient split.

    Parameters
    ----------
    split_json : path
        A run's ``split.json`` (``{"splits": {part: {"files": [...], "patients": [...]}}}``).
    data_dir : path
        Folder the listed files are relative to (the NIH ``nih_cell_images`` folder).
    part : {"train", "val", "test"}
    size_px : int
        Letterbox side, px (the model's input size).
    positive_class : str, default="Parasitized"
        Class folder whose cells get ``y = 1``.
    n : int, optional
        Take a random sample of ``n`` files (seeded; class proportions kept in expectation);
        default all.
    seed : int, default=0
    workers : int, optional
        Decoding threads; default ``min(8, cpu_count + 2)``.

    Returns
    -------
    SplitCells
        Files that fail to decode are dropped with a warning each in the log; missing files are
        dropped with one warning for them all ("N of M listed cells are missing under DIR").

    Raises
    ------
    FileNotFoundError
        If ``split_json`` or ``data_dir`` does not exist.
    ValueError
        If the part is absent or empty, or no listed file could be decoded.
    """
    split_json, data_dir = Path(split_json), Path(data_dir)
    if not split_json.is_file():
        raise FileNotFoundError(f"no split file: {split_json}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no data folder: {data_dir} (set MALARIA_SCREEN_DATA or pass the NIH folder)")
    man = json.loads(split_json.read_text(encoding="utf-8"))
    files = list(man.get("splits", {}).get(part, {}).get("files", []))
    if not files:
        raise ValueError(f"split {split_json} has no files in part {part!r}")
    if n is not None and n < len(files):
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]

    missing = [rel for rel in files if not (data_dir / rel).exists()]
    if missing:  # one line, not one per file: a wrong --data misses them all
        log.warning("%d of %d listed %s cells are missing under %s (e.g. %s)", len(missing), len(files), part, data_dir,
                    missing[0])
    gone = set(missing)

    def load(rel: str):
        if rel in gone:
            return None
        try:
            return letterbox(decode_image(data_dir / rel), size_px)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            log.warning("skipping %s: %s", rel, exc)
            return None

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        decoded = list(pool.map(load, files))
    keep = [i for i, c in enumerate(decoded) if c is not None]
    if not keep:
        raise ValueError(f"none of the {len(files)} {part} files could be read under {data_dir}")
    files = [files[i] for i in keep]
    cells = np.stack([decoded[i] for i in keep])
    y = np.asarray([Path(f).parts[0] == positive_class for f in files], dtype=np.int64)
    patients = patient_ids_from_names(files)
    log.info("%s: %d cells of %d patients from %s", part, len(files), len(set(patients)), data_dir)
    return SplitCells(cells=cells, y=y, patients=patients, files=files, part=part)
