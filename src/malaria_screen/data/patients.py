"""Patient (grouping) ids for cell images: parsed from NIH names, read from a CSV, or per image.

NIH/NLM malaria cell names (Rajaraman et al., PeerJ 2018) carry the patient:
``C<slide>[letters]P<patient>...`` gives ``P<patient>`` (``C33P1thinF_IMG_...`` -> ``P1``,
``C37BP2_thinF_...`` -> ``P2``, ``C51AP12thinF...`` -> ``P12``). Names with no ``P<n>`` token
are uninfected-only control patients; their id is the part before ``_IMG`` / ``_original``
(``C1_thinF_IMG_...`` -> ``C1_thinF``, ``C12NThinF_IMG_...`` -> ``C12NThinF``).

Infected patients contribute cells to both classes, so the patient is correlated with the label:
every split must keep a patient on one side only.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["parse_nih_patient_id", "patient_ids_from_names", "read_groups_csv", "listed_in_groups", "GroupingWarning"]

log = logging.getLogger(__name__)

_NIH_PATIENT = re.compile(r"^C\d+[A-Za-z]*?P(\d+)")
#: Cells cut around the annotated points of a field (:mod:`malaria_screen.data.extra_negatives`):
#: ``<folder>/images/<stem>.<ext>#<k>``, grouped by field as ``<folder>:<stem>``.
_POINT_CELL = re.compile(r"^(?P<folder>[^/#]+)/images/(?P<stem>[^/#]+)\.[A-Za-z0-9]+#\d+(?:\+parasite)?$")
_NIH_CONTROL = re.compile(r"^(C\d+[A-Za-z_]*?)(?:_IMG|_original|IMG_)", re.IGNORECASE)


class GroupingWarning(UserWarning):
    """Cells are grouped per image: patient-level leakage cannot be ruled out."""


def parse_nih_patient_id(name: str) -> str:
    """Patient id of an NIH malaria cell image from its file name.

    Parameters
    ----------
    name : str
        File name or path (only the last component is read).

    Returns
    -------
    patient : str
        ``"P<n>"`` for infected patients, the slide prefix (e.g. ``"C1_thinF"``) for controls.

    Raises
    ------
    ValueError
        If the name follows neither NIH pattern.

    Examples
    --------
    >>> parse_nih_patient_id("C37BP2_thinF_IMG_20150620_133111a_cell_87.png")
    'P2'
    >>> parse_nih_patient_id("C1_thinF_IMG_20150604_104722_cell_9.png")
    'C1_thinF'
    """
    base = Path(name).name
    m = _NIH_PATIENT.match(base)
    if m:
        return f"P{int(m.group(1))}"
    m = _NIH_CONTROL.match(base)
    if m:
        return m.group(1)
    raise ValueError(f"cannot parse an NIH patient id from file name {base!r}")


def read_groups_csv(path: str | Path) -> dict[str, str]:
    """Read a user grouping CSV with header ``path,patient``.

    ``path`` is relative to the dataset root (or just a file name); ``patient`` is any id.

    Returns
    -------
    groups : dict of str to str
        Maps each ``path`` as written (POSIX separators) to its patient id.

    Raises
    ------
    ValueError
        If the header lacks ``path`` or ``patient`` or a row is empty.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "patient"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a groups CSV needs the header 'path,patient', got {reader.fieldnames}")
        out: dict[str, str] = {}
        for i, row in enumerate(reader, start=2):
            p, g = (row.get("path") or "").strip(), (row.get("patient") or "").strip()
            if not p or not g:
                raise ValueError(f"{path}:{i}: empty path or patient")
            out[Path(p).as_posix()] = g
    return out


def patient_ids_from_names(
    relpaths: Sequence[str],
    *,
    groups: dict[str, str] | None = None,
    per_image: bool = False,
) -> list[str]:
    """Patient id of each image, by the first rule that applies: ``groups``, then a point-cut cell
    of another site's field (``<folder>/images/<stem>.<ext>#<k>`` → ``<folder>:<stem>``, as
    :mod:`malaria_screen.data.extra_negatives` names them; ``...#<k>+parasite`` for its synthetic
    Parasitized copy, :mod:`malaria_screen.data.synthetic`), then the NIH file-name pattern.

    Parameters
    ----------
    relpaths : sequence of str of length n_images
        Paths relative to the dataset root, POSIX separators.
    groups : dict, optional
        From :func:`read_groups_csv`; looked up by relative path, then by file name.
    per_image : bool, default=False
        Give every image its own group (with a loud :class:`GroupingWarning`): only for data
        with no patient information, where per-patient leakage cannot be ruled out.

    Returns
    -------
    patients : list of str of length n_images

    Raises
    ------
    ValueError
        If a name cannot be parsed and neither ``groups`` covers it nor ``per_image`` is set.
    """
    if per_image:
        warnings.warn(
            "grouping cells per IMAGE, not per patient: if one patient gave several images, "
            "test accuracy will be optimistic (patient leakage). Supply a path,patient CSV instead.",
            GroupingWarning,
            stacklevel=2,
        )
        return list(relpaths)
    by_name: dict[str, str] = {}
    if groups:
        by_name = {Path(k).name: v for k, v in groups.items()}
    out: list[str] = []
    missing: list[str] = []
    for rp in relpaths:
        if groups is not None:
            g = groups.get(rp) or by_name.get(Path(rp).name)
            if g is not None:
                out.append(g)
                continue
        m = _POINT_CELL.match(rp)
        if m:  # a cell cut around an annotated point (extra negatives): one group per field
            out.append(f"{m['folder']}:{m['stem']}")
            continue
        try:
            out.append(parse_nih_patient_id(rp))
        except ValueError:
            missing.append(rp)
            out.append("")
    if missing:
        raise ValueError(
            f"no patient id for {len(missing)} image(s), e.g. {missing[:3]}: name them in the NIH way, "
            "pass a groups CSV (columns path,patient), or group per image (leaky, warned)"
        )
    return out


def listed_in_groups(relpaths: Sequence[str], groups_csv: str | Path) -> np.ndarray:
    """Which cells a groups CSV lists, looked up as the loader does: by path, then by file name.

    Parameters
    ----------
    relpaths : sequence of str
        Cell paths relative to their data folder (``CellSet.relpaths``).
    groups_csv : str or Path
        ``path,patient`` CSV (:func:`read_groups_csv`).

    Returns
    -------
    (N,) bool ndarray
    """
    listed = read_groups_csv(groups_csv)
    names = {Path(k).name for k in listed}
    return np.asarray([r in listed or Path(r).name in names for r in relpaths], bool)
