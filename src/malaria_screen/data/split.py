"""Patient-level splits: no patient ever falls on two sides.

Cells of one patient are correlated (same slide, stain, microscope; infected patients give cells
of both classes), so a random cell split inflates accuracy. Splits here wrap scikit-learn's
:class:`~sklearn.model_selection.StratifiedGroupKFold`, grouping by patient and keeping the class
balance of cells close to the whole set's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from malaria_screen.data.patients import GroupingWarning, patient_ids_from_names

__all__ = ["patient_folds", "patient_split", "SplitIndices", "check_leak_free", "split_manifest"]


@dataclass(frozen=True)
class SplitIndices:
    """Cell indices of a train/val/test split, each an ``(n,) int64`` array."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _validate(labels: np.ndarray, patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    groups = np.asarray(patients)
    if labels.shape[0] != groups.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} cells but patients has {groups.shape[0]}")
    return labels, groups


def patient_folds(
    labels: np.ndarray, patients: Sequence[str], *, n_splits: int = 5, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(train_idx, test_idx)`` for patient-grouped, label-stratified k-fold.

    Parameters
    ----------
    labels : ndarray of shape (n_cells,)
        Class index of each cell.
    patients : sequence of str of length n_cells
        Patient id of each cell.
    n_splits : int, default=5
    seed : int, default=0

    Yields
    ------
    train_idx, test_idx : ndarray of int64
        No patient appears in both.

    Raises
    ------
    ValueError
        If lengths differ or there are fewer patients than ``n_splits``.
    """
    labels, groups = _validate(labels, patients)
    n_patients = len(np.unique(groups))
    if n_patients < n_splits:
        raise ValueError(f"need at least n_splits={n_splits} patients, got {n_patients}")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for tr, te in sgkf.split(np.zeros(len(labels)), labels, groups):
        yield tr.astype(np.int64), te.astype(np.int64)


def patient_split(
    labels: np.ndarray,
    patients: Sequence[str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    force_test: Sequence[str] = (),
) -> SplitIndices:
    """Split cells into train/val/test by patient (default 70/10/20 of patients).

    ``force_test`` patients all go to the test split (e.g. the patients of a demo's sample
    images, so that the demo shows held-out patients). The other patients are split as below with
    the test share lowered to ``(test_fraction * n - n_forced) / (n - n_forced)``, so that about
    ``test_fraction`` of all patients are tested (never less than what ``force_test`` holds).

    The test set is one fold of a ``round(1 / test_fraction)``-fold
    :class:`~sklearn.model_selection.StratifiedGroupKFold`; the validation set is one fold of a
    second grouped split of the rest. Fractions are approximate (whole patients).

    Parameters
    ----------
    labels : ndarray of shape (n_cells,)
    patients : sequence of str of length n_cells
    val_fraction, test_fraction : float, default=0.1, 0.2
        Share of patients in validation and test; ``val_fraction=0`` gives an empty val set.
    seed : int, default=0
    force_test : sequence of str, optional
        Patient ids put in the test split; every one must occur in ``patients``.

    Returns
    -------
    SplitIndices

    Raises
    ------
    ValueError
        If fractions are out of range or there are too few patients (at least 3 are needed,
        2 with ``val_fraction=0``); if a ``force_test`` patient is unknown.
    """
    labels, groups = _validate(labels, patients)
    if not (0 < test_fraction < 1) or not (0 <= val_fraction < 1) or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad fractions: val={val_fraction}, test={test_fraction}")
    if len(force_test):
        forced = set(force_test)
        unknown = sorted(forced - set(groups.tolist()))
        if unknown:
            raise ValueError(f"force_test patients not in the data: {unknown[:5]}")
        in_forced = np.isin(groups, sorted(forced))
        rest = np.flatnonzero(~in_forced)
        n_all, n_forced = len(np.unique(groups)), len(forced)
        n_rest = n_all - n_forced
        want = test_fraction * n_all - n_forced
        if want < 1:  # the forced patients already fill the test share: the rest is train/val only
            rest_val = min(val_fraction / (1 - test_fraction), 0.5)
            if rest_val == 0:
                part = SplitIndices(train=np.arange(len(rest)), val=np.zeros(0, np.int64), test=np.zeros(0, np.int64))
            else:
                n_splits = min(max(2, round(1 / rest_val)), max(2, n_rest))  # never more folds than patients
                tr_i, va_i = next(iter(patient_folds(labels[rest], groups[rest], n_splits=n_splits, seed=seed + 1)))
                part = SplitIndices(train=tr_i, val=va_i, test=np.zeros(0, np.int64))
        else:
            t = want / n_rest
            v = min(val_fraction * n_all / n_rest, 0.98 - t)
            part = patient_split(labels[rest], groups[rest], val_fraction=v, test_fraction=t, seed=seed)
        return SplitIndices(train=np.sort(rest[part.train]), val=np.sort(rest[part.val]),
                            test=np.sort(np.concatenate([rest[part.test], np.flatnonzero(in_forced)])))
    n_test_folds = max(2, round(1 / test_fraction))
    tr_all, te = next(iter(patient_folds(labels, groups, n_splits=min(n_test_folds, len(np.unique(groups))), seed=seed)))
    if val_fraction == 0:
        return SplitIndices(train=np.sort(tr_all), val=np.zeros(0, dtype=np.int64), test=np.sort(te))
    rest_share = 1 - test_fraction
    n_val_folds = max(2, round(rest_share / val_fraction))
    sub_groups = groups[tr_all]
    n_sub_patients = len(np.unique(sub_groups))
    if n_sub_patients < 2:
        raise ValueError(f"too few patients ({len(np.unique(groups))}) for a train/val/test split")
    tr_i, va_i = next(iter(patient_folds(labels[tr_all], sub_groups, n_splits=min(n_val_folds, n_sub_patients), seed=seed + 1)))
    return SplitIndices(train=np.sort(tr_all[tr_i]), val=np.sort(tr_all[va_i]), test=np.sort(te))


def split_manifest(
    split: SplitIndices, *, patients: Sequence[str], relpaths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], seed: int,
    forced_test_patients: Sequence[str] = (),
) -> dict:
    """JSON-ready record of a split: patients, files and counts per split.

    Returns
    -------
    manifest : dict
        ``{"seed", "class_names", "splits": {name: {"patients", "files", "n_cells",
        "n_patients", "n_per_class"}}}``, plus ``"forced_test_patients"`` (sorted) when given.
    """
    out: dict = {"seed": seed, "class_names": list(class_names), "splits": {}}
    if len(forced_test_patients):
        out["forced_test_patients"] = sorted(forced_test_patients)
    for name, idx in split.as_dict().items():
        pats = sorted({patients[i] for i in idx})
        counts = np.bincount(np.asarray(labels)[idx], minlength=len(class_names)) if len(idx) else np.zeros(len(class_names), int)
        out["splits"][name] = {
            "n_cells": int(len(idx)),
            "n_patients": len(pats),
            "n_per_class": {c: int(n) for c, n in zip(class_names, counts)},
            "patients": pats,
            "files": [relpaths[i] for i in idx],
        }
    return out


def check_leak_free(manifest: dict, *, groups: dict[str, str] | None = None, per_image: bool = False) -> None:
    """Check that no patient and no file appears in two splits of a manifest.

    The patients are re-derived from each split's listed files, by the rule training used
    (:func:`~malaria_screen.data.patients.patient_ids_from_names`: ``groups`` first, then the NIH
    file-name pattern; or one group per image), rather than read from the manifest's own
    ``patients`` lists, which must agree with them: a hand-edited or stale manifest cannot
    hide a patient on two sides. A split listing no ``files`` falls back to its ``patients``.

    Parameters
    ----------
    manifest : dict
        From :func:`split_manifest` (``{"splits": {name: {"patients": [...], "files": [...]}}}``).
    groups : dict, optional
        ``path -> patient`` of a groups CSV (:func:`~malaria_screen.data.patients.read_groups_csv`),
        as passed to training.
    per_image : bool, default=False
        The run grouped cells per image (``--group-per-image``).

    Raises
    ------
    ValueError
        Naming the patients or files shared between two splits; if a listed file's patient
        cannot be derived; or if a split's ``patients`` list differs from its files' patients.
    """
    splits = manifest["splits"]
    derived: dict[str, set[str]] = {}
    for name, part in splits.items():
        files = part.get("files")
        if files is None:
            derived[name] = set(part["patients"])
            continue
        with warnings.catch_warnings():  # training already warned about per-image grouping
            warnings.simplefilter("ignore", GroupingWarning)
            derived[name] = set(patient_ids_from_names(files, groups=groups, per_image=per_image))
        listed = set(part.get("patients", derived[name]))
        if listed != derived[name]:
            extra, absent = sorted(listed - derived[name])[:5], sorted(derived[name] - listed)[:5]
            raise ValueError(f"split {name!r}: its patients list disagrees with its files' names (listed without "
                             f"files: {extra}; files of unlisted patients: {absent})")
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared_f = set(splits[a].get("files", [])) & set(splits[b].get("files", []))
            if shared_f:
                raise ValueError(f"file leakage: {sorted(shared_f)[:5]} in both {a!r} and {b!r}")
            shared_p = derived[a] & derived[b]
            if shared_p:
                raise ValueError(f"patient leakage: {sorted(shared_p)[:5]} in both {a!r} and {b!r}")
