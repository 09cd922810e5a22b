"""Cell classification over a Ray cluster: ``predict --ray`` and ``evaluate --ray``.

Each Ray worker loads the model once (:func:`load_for_worker`) and classifies chunks of files
with the same code as a local run (:meth:`~malaria_screen.inference.base.CellClassifierBase.predict_files`
for ``predict``; decode, letterbox and :meth:`predict_proba_prepared` for ``evaluate``, as
:func:`~malaria_screen.data.dataset.load_cell_set` prepares cells). The driver receives the
results in input order and writes the same files as a local run. See
:mod:`malaria_screen.data.ray_map` for addresses and cluster set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from malaria_screen.data.dataset import scan_image_folder
from malaria_screen.data.io import ImageDecodeError, decode_image
from malaria_screen.data.patients import patient_ids_from_names, read_groups_csv
from malaria_screen.data.preprocess import letterbox
from malaria_screen.data.ray_map import ray_map
from malaria_screen.inference import load_model
from malaria_screen.inference.base import FileResult

__all__ = ["CellProbs", "load_cell_probs_ray", "load_for_worker", "predict_files_ray", "predict_proba_files_ray"]

#: Files per Ray task: large enough that scheduling (~1 ms a task) is noise next to ~0.5 ms a cell.
RAY_CHUNK: int = 512


def load_for_worker(model: Optional[str], backend: str, batch_size: int):
    """Load the model on a Ray worker that owns one CPU: ONNX Runtime and torch on one thread.

    Parameters
    ----------
    model : str or None
        Run folder, ``.onnx`` file or ensemble folder; None for the bundled model.
    backend : {"auto", "torch", "onnx"}
    batch_size : int

    Returns
    -------
    CellClassifierBase
    """
    onnx = backend == "onnx" or (model is not None and str(model).lower().endswith(".onnx"))
    kwargs = {"num_threads": 1} if onnx else {}
    pred = load_model(model, backend=backend, batch_size=batch_size, **kwargs)
    if pred.backend == "torch":
        import torch

        torch.set_num_threads(1)
    return pred


def _predict_chunk(pred, paths: list[str]) -> list[FileResult]:
    return list(pred.predict_files(paths, workers=1, processes=False))


def _proba_chunk(pred, paths: list[str]) -> tuple[np.ndarray, list[Optional[str]]]:
    cells, errors = [], []
    for p in paths:
        try:
            cells.append(letterbox(decode_image(p), pred.input_size))
            errors.append(None)
        except ImageDecodeError as exc:
            errors.append(str(exc))
    probs = pred.predict_proba_prepared(np.stack(cells)) if cells else np.zeros((0, len(pred.class_names)), np.float32)
    return probs, errors


def _chunks(paths: Sequence[str | Path], size: int) -> list[list[str]]:
    paths = [str(p) for p in paths]
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def predict_files_ray(model: Optional[str], paths: Sequence[str | Path], *, backend: str = "auto", batch_size: int = 256,
                      chunk: int = RAY_CHUNK, workers: Optional[int] = None) -> Iterator[FileResult]:
    """:meth:`~malaria_screen.inference.base.CellClassifierBase.predict_files` on Ray workers.

    Needs a runtime started by :func:`~malaria_screen.data.ray_map.connect`.

    Parameters
    ----------
    model : str or None
        As :func:`load_for_worker`; a path every worker node can read.
    paths : sequence of path
        Paths every worker node can read.
    backend : str, default="auto"
    batch_size : int, default=256
    chunk : int, default=RAY_CHUNK
        Files per task.
    workers : int, optional
        Ray actors (one CPU each); default the cluster's CPUs.

    Yields
    ------
    FileResult
        One per path, in order; a file that fails gets its error, as in a local run.
    """
    for rows in ray_map(_predict_chunk, _chunks(paths, chunk), setup=load_for_worker, setup_args=(model, backend, batch_size),
                        workers=workers):
        yield from rows


def predict_proba_files_ray(model: Optional[str], paths: Sequence[str | Path], *, backend: str = "auto", batch_size: int = 256,
                            chunk: int = RAY_CHUNK, workers: Optional[int] = None) -> tuple[np.ndarray, list[Optional[str]]]:
    """Class probabilities of cell files prepared as ``evaluate`` prepares them, on Ray workers.

    Each file is decoded and letterboxed (as :func:`~malaria_screen.data.dataset.load_cell_set`
    does; no colour or size check) and classified on a worker.

    Parameters
    ----------
    model, paths, backend, batch_size, chunk, workers
        As :func:`predict_files_ray`.

    Returns
    -------
    probs : (k, num_classes) ndarray of float32
        For the files that decoded, in the order of ``paths``.
    errors : list of (str or None)
        One per path: None if it decoded, else why not.
    """
    probs, errors = [], []
    for p, e in ray_map(_proba_chunk, _chunks(paths, chunk), setup=load_for_worker, setup_args=(model, backend, batch_size),
                        workers=workers):
        probs.append(p)
        errors.extend(e)
    return (np.concatenate(probs) if probs else np.zeros((0, 2), np.float32)), errors


@dataclass(frozen=True)
class CellProbs:
    """The cells of an NIH-layout folder with their class probabilities (``evaluate --ray``).

    The fields of :class:`~malaria_screen.data.dataset.CellSet` that ``evaluate`` reads, with
    ``probs`` in place of the pixels.

    Attributes
    ----------
    probs : (N, num_classes) ndarray of float32
    labels : (N,) ndarray of int64
    patients, relpaths : list of str of length N
    class_names : list of str
    root : Path
    errors : dict of str to str
        Files that could not be decoded (relative path to message); left out.
    """

    probs: np.ndarray
    labels: np.ndarray
    patients: list[str]
    relpaths: list[str]
    class_names: list[str]
    root: Path
    errors: dict[str, str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "CellProbs":
        """The cells at integer indices ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        return CellProbs(self.probs[idx], self.labels[idx], [self.patients[i] for i in idx], [self.relpaths[i] for i in idx],
                         list(self.class_names), self.root, dict(self.errors))


def load_cell_probs_ray(root: str | Path, model: Optional[str], *, backend: str = "auto", batch_size: int = 256,
                        groups_csv: str | Path | None = None, group_per_image: bool = False,
                        chunk: int = RAY_CHUNK, workers: Optional[int] = None) -> CellProbs:
    """:func:`~malaria_screen.data.dataset.load_cell_set` and inference in one pass on Ray workers.

    Files, labels and patients are listed here exactly as ``load_cell_set`` lists them; the
    workers decode, letterbox and classify (no cell store is written).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`~malaria_screen.data.dataset.scan_image_folder`.
    """
    root = Path(root).resolve()
    relpaths, labels, class_names = scan_image_folder(root)
    groups = read_groups_csv(groups_csv) if groups_csv else None
    patients = patient_ids_from_names(relpaths, groups=groups, per_image=group_per_image)
    probs, errs = predict_proba_files_ray(model, [root / rp for rp in relpaths], backend=backend, batch_size=batch_size,
                                          chunk=chunk, workers=workers)
    ok = [i for i, e in enumerate(errs) if e is None]
    return CellProbs(probs, labels[ok], [patients[i] for i in ok], [relpaths[i] for i in ok], class_names, root,
                     {relpaths[i]: e for i, e in enumerate(errs) if e is not None})
