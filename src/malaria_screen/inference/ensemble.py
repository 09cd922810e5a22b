"""Model averaging: several cell classifiers as one, saved as a self-contained folder.

Averaging the Parasitized probabilities of models trained with different augmentations cancels
part of their errors (Lakshminarayanan et al. 2017, *Simple and scalable predictive uncertainty
estimation using deep ensembles*; Dietterich 2000). On whole-smear screening, the mild-jitter and
strong-stain fine-tunings of ``benchmarks/bench_adapt.py`` averaged gave a lower parasitemia
error than either alone (commit 141d315; docs/experiments/adaptation.md).

An ensemble folder holds ``ensemble.json`` and a copy of each member under ``members/`` (a run
folder's ``config.json`` + ``weights.safetensors`` (+ ``metrics.json``, ``split.json``), or an
exported ``.onnx`` file), so it can be moved and deployed as one model:
:func:`malaria_screen.inference.load_model` loads it like a run folder, and every command that
takes ``--model`` (``predict``, ``evaluate``, ``smear``, ``serve``, ``app``) accepts it.

This module imports no torch: members load through :func:`~malaria_screen.inference.load_model`
with the back-end asked for.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.data.dataset import CellSet
from malaria_screen.data.patients import listed_in_groups
from malaria_screen.fileio import atomic_write_json
from malaria_screen.inference import load_model
from malaria_screen.inference.base import CellClassifierBase, seen_patients

__all__ = ["ENSEMBLE_FILE", "CalibrationCells", "EnsemblePredictor", "calibration_cells", "is_ensemble_dir", "write_ensemble"]

#: Name of the file that marks a folder as an ensemble.
ENSEMBLE_FILE = "ensemble.json"
_FORMAT = "malaria-screen-ensemble"
_RUN_FILES = ("config.json", "weights.safetensors", "metrics.json", "split.json")


def is_ensemble_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder holding ``ensemble.json``."""
    p = Path(path)
    return p.is_dir() and (p / ENSEMBLE_FILE).is_file()


class EnsemblePredictor(CellClassifierBase):
    """Average of several cell classifiers' class probabilities.

    Same interface as :class:`~malaria_screen.inference.predictor.Predictor` (``predict``,
    ``predict_proba``, ``predict_proba_prepared``, ``predict_files``, ``threshold``...). Each
    member letterboxes to the common input size and normalises with its own mean/std.

    Parameters
    ----------
    members : sequence of CellClassifierBase
        Two or more loaded models with the same input size, class names and positive class.
    threshold : float, optional
        Decision threshold on the averaged p_parasitized, in (0, 1). Default: the mean of the
        members' thresholds (a fair start when each was set by the same rule on the same kind of
        cells; :func:`write_ensemble` can calibrate it on labelled cells instead).
    batch_size : int, default=256
    source : str, optional
        The ensemble folder.

    Attributes
    ----------
    members : list of CellClassifierBase
    seen_patients : dict
        ``{"train": [...], "val": [...]}``: union over the members, so ``evaluate`` leaves out
        every patient (or field) any member was trained or validated on.

    Raises
    ------
    ValueError
        If fewer than two members are given, they disagree on input size or classes, or the
        threshold is outside (0, 1).
    """

    def __init__(self, members: Sequence[CellClassifierBase], *, threshold: float | None = None, batch_size: int = 256,
                 source: str | None = None) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for m in members[1:]:
            if (m.input_size, tuple(m.class_names), m.config.positive_class) != (
                    first.input_size, tuple(first.class_names), first.config.positive_class):
                raise ValueError(
                    f"ensemble members differ: {m.source}: input {m.input_size} px, classes {m.class_names}, positive "
                    f"{m.config.positive_class!r} vs {first.source}: {first.input_size} px, {first.class_names}, "
                    f"{first.config.positive_class!r}")
        thr = float(np.mean([m.threshold for m in members])) if threshold is None else float(threshold)
        if not 0.0 < thr < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {thr}")
        super().__init__(first.config.replace(threshold=thr), batch_size=batch_size, source=source)
        self.members = members
        seen = [seen_patients(m) for m in members]
        self.seen_patients = {k: sorted(set().union(*(s[k] for s in seen))) for k in ("train", "val")}
        self.backend = "ensemble:" + "+".join(sorted({m.backend for m in members}))

    def predict_proba_prepared(self, cells: np.ndarray) -> np.ndarray:
        """Mean of the members' class probabilities: ``(N, S, S, 3) uint8`` -> ``(N, C) float32``."""
        self._check_cells(cells)
        return np.mean([np.asarray(m.predict_proba_prepared(cells), np.float64) for m in self.members],
                       axis=0).astype(np.float32)

    @classmethod
    def from_dir(cls, path: str | Path, *, backend: str = "auto", batch_size: int = 256, **kwargs) -> "EnsemblePredictor":
        """Load an ensemble folder written by :func:`write_ensemble`.

        Parameters
        ----------
        path : path
            Folder with ``ensemble.json``.
        backend : {"auto", "torch", "onnx"}
            Back-end of every member (:func:`~malaria_screen.inference.load_model`).
        batch_size : int, default=256
        **kwargs
            Passed to each member's loader (``device``, ``num_threads``...).

        Raises
        ------
        FileNotFoundError
            If ``ensemble.json`` or a member is missing.
        ValueError
            If ``ensemble.json`` is not an ensemble description, or the members disagree.
        """
        path = Path(path)
        spec_path = path / ENSEMBLE_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"not an ensemble folder: {spec_path} is missing")
        try:
            spec = json.loads(spec_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec_path}: not valid JSON ({exc})") from exc
        if spec.get("format") != _FORMAT or not isinstance(spec.get("members"), list):
            raise ValueError(f"{spec_path}: not a malaria-screen ensemble description")
        members = [load_model(path / rel, backend=backend, batch_size=batch_size, **kwargs) for rel in spec["members"]]
        return cls(members, threshold=spec.get("threshold"), batch_size=batch_size, source=str(path))


@dataclass(frozen=True)
class CalibrationCells:
    """Labelled cells for an ensemble's count-matched threshold.

    Attributes
    ----------
    images : (n, S, S, 3) uint8 ndarray
        Letterboxed cells.
    parasitized : (n,) bool ndarray
        True for a Parasitized cell.
    n_left_out : int
        Cells dropped because a member was trained on their group (patient or field).
    """

    images: np.ndarray
    parasitized: np.ndarray
    n_left_out: int


def calibration_cells(cells: CellSet, ensemble: EnsemblePredictor, *, groups_csv: str | Path | None = None
                      ) -> CalibrationCells:
    """The cells of ``cells`` an ensemble's threshold may be calibrated on.

    Cells of a group any member was trained on are left out (they would make the threshold
    optimistic); with ``groups_csv`` only the cells it lists are used
    (:func:`~malaria_screen.data.patients.listed_in_groups`).

    Parameters
    ----------
    cells : CellSet
        Labelled cells (an NIH-layout folder loaded at the ensemble's input size).
    ensemble : EnsemblePredictor
        The members, for their training groups and classes.
    groups_csv : str or Path, optional
        ``path,group`` CSV of the calibration cells.

    Returns
    -------
    CalibrationCells

    Raises
    ------
    ValueError
        If no usable cell is left, or ``cells`` has no folder of the positive class.
    """
    keep = np.ones(len(cells), bool)
    if groups_csv is not None:
        keep &= listed_in_groups(cells.relpaths, groups_csv)
    trained = set(ensemble.seen_patients["train"])
    leak = np.asarray([g in trained for g in cells.patients], bool) & keep
    keep &= ~leak
    positive = ensemble.class_names[ensemble.positive_index]
    if not keep.any() or positive not in cells.class_names:
        raise ValueError(f"--calibrate: no usable labelled cells (need a {positive!r} folder and cells no member trained on)")
    idx = np.nonzero(keep)[0]
    return CalibrationCells(cells.images[idx], np.asarray(cells.labels)[idx] == cells.class_names.index(positive),
                            int(leak.sum()))


def write_ensemble(
    out_dir: str | Path,
    members: Sequence[str | Path],
    *,
    threshold: float | None = None,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    note: str | None = None,
) -> EnsemblePredictor:
    """Copy member models into a new ensemble folder and write ``ensemble.json``.

    Parameters
    ----------
    out_dir : path
        New folder (must not exist or be empty).
    members : sequence of path
        Run folders (``config.json`` + ``weights.safetensors``) or ``.onnx`` files; two or more.
    threshold : float, optional
        Fixed decision threshold on the averaged p_parasitized.
    calibration : (images, is_parasitized), optional
        Labelled cells to set the threshold by count matching
        (:func:`~malaria_screen.evaluation.metrics.count_matched_threshold`: as many cells called
        Parasitized as are): ``(N, S, S, 3) uint8`` letterboxed cells and ``(N,)`` bool. They must
        be cells none of the members trained on (e.g. the validation fields of their fine-tuning).
        Without ``threshold`` or ``calibration`` the mean of the members' thresholds is used.
    note : str, optional
        Free text stored in ``ensemble.json``.

    Returns
    -------
    EnsemblePredictor
        The saved ensemble, loaded from ``out_dir``.

    Raises
    ------
    FileNotFoundError
        If a member path does not exist or lacks its model files.
    FileExistsError
        If ``out_dir`` exists and is not empty.
    ValueError
        If both ``threshold`` and ``calibration`` are given, fewer than two members, or the
        members disagree (:class:`EnsemblePredictor`).
    """
    if threshold is not None and calibration is not None:
        raise ValueError("give threshold or calibration, not both")
    members = [Path(m) for m in members]
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    for m in members:
        if m.is_dir():
            for req in _RUN_FILES[:2]:
                if not (m / req).is_file():
                    raise FileNotFoundError(f"not a model folder: {m / req} is missing")
        elif not (m.is_file() and m.suffix.lower() == ".onnx"):
            raise FileNotFoundError(f"no such model folder or .onnx file: {m}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")

    # check the members and set the threshold on the source models, before anything is written
    probe = EnsemblePredictor([load_model(m) for m in members], threshold=threshold)
    spec = {"format": _FORMAT, "version": 1, "members": [], "sources": [str(m.resolve()) for m in members],
            "threshold": probe.threshold, "threshold_rule": "fixed" if threshold is not None else "mean of members"}
    if calibration is not None:
        from malaria_screen.evaluation.metrics import count_matched_threshold  # scikit-learn: only to calibrate

        images, y = calibration
        y = np.asarray(y, bool).reshape(-1)
        p = probe.predict_proba_prepared(np.asarray(images))[:, probe.positive_index]
        spec |= {"threshold": count_matched_threshold(y, p), "threshold_rule": "val-count",
                 "calibration": {"n_cells": int(len(y)), "n_parasitized": int(y.sum())}}
    if note:
        spec["note"] = note
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    for k, m in enumerate(members):
        if m.is_dir():
            dst = tmp / "members" / f"m{k}"
            dst.mkdir()
            for name in _RUN_FILES:
                if (m / name).is_file():
                    shutil.copy2(m / name, dst / name)
            spec["members"].append(f"members/m{k}")
        else:
            shutil.copy2(m, tmp / "members" / f"m{k}.onnx")
            spec["members"].append(f"members/m{k}.onnx")
    atomic_write_json(tmp / ENSEMBLE_FILE, spec)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return EnsemblePredictor.from_dir(out)
