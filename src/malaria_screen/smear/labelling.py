"""A labelling session: the state behind the web app's labelling tab (issue 20).

A clinic screens a few of its own fields, labels the cells the model is least sure of, and fits a
site model on those labels (:func:`~malaria_screen.smear.adapt.adapt`). This module holds what
one person's session needs, as a plain class the app drives (:class:`LabellingSession`):

- the pool: every segmented cell of the fields added, scored by the cell model
  (:func:`~malaria_screen.smear.adapt.field_cells`: box, P(Parasitized), field-relative inputs);
- the queue: batches of cells to label next, chosen by uncertainty sampling with a random quarter
  (:func:`~malaria_screen.smear.adapt.select_cells`). Before any fit the uncertainty is that of the
  cell model's posterior re-weighted to the smear prior (2 %,
  :func:`~malaria_screen.evaluation.quantify.adjust_to_prior`, decision at 0.5: the call the
  whole-field screen makes); after :meth:`LabellingSession.adapt`, that of the site model;
- the labels, in the order given, with undo; their export as the labels CSV
  (:func:`~malaria_screen.smear.adapt.write_labels_csv`);
- the before/after of an adapt (:class:`Comparison`): sensitivity, PPV and counts on the labelled
  cells, and each field's parasitemia, for the model as the whole-field screen calls today and for
  the site model. "After" is measured on the cells the site model was fitted on (in-sample): it
  shows the fit, not how well it carries to new fields (``benchmarks/bench_learning_curve.py``
  measures that on held-out fields).

Thread safety: each method that reads or changes the state holds the session's lock, so one
session may be driven by overlapping requests.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from malaria_screen.evaluation.quantify import DEFAULT_TARGET_PRIOR, ClassifyAndCount, adjust_to_prior, params_from_model
from malaria_screen.inference.site import RESCORER_DIR, SITE_FILE, SiteConfig, is_site_dir
from malaria_screen.smear.adapt import (LABEL_CLASSES, AdaptResult, LabelledCell, SiteFit, adapt, field_cells,
                                        read_labels_csv, select_cells, write_labels_csv)
from malaria_screen.smear.domain import require_smear
from malaria_screen.smear.fields import decode_field
from malaria_screen.smear.gallery import cell_thumbnail
from malaria_screen.smear.parasitemia import estimate_parasitemia, field_quantifier
from malaria_screen.smear.rescore import CellRescorer
from malaria_screen.smear.segment import SegmentConfig

__all__ = ["KEYS", "Candidate", "Comparison", "LabellingSession", "adaptable_model", "load_site_fit"]

#: Keyboard shortcuts of the labels (the app binds them; ``z`` is undo).
KEYS: dict[str, str] = {"p": "Parasitized", "u": "Uninfected", "n": "not a cell"}
#: Side of a cell's tile, px.
TILE_PX = 160


@dataclass(frozen=True)
class Candidate:
    """A cell offered for labelling.

    Attributes
    ----------
    index : int
        Its index in the session's pool.
    field : str
        The field's file name.
    bbox : (float, float, float, float)
        ``(x, y, w, h)`` px in the field.
    p : float
        The cell model's P(Parasitized).
    p_current : float
        The probability the queue was ranked by (prior-corrected before an adapt, the site
        model's after), and ``threshold`` its decision threshold.
    threshold : float
    tile : (TILE_PX, TILE_PX, 3) uint8
        The cell with a margin of its field, unmasked, its box outlined.
    """

    index: int
    field: str
    bbox: tuple[float, float, float, float]
    p: float
    p_current: float
    threshold: float
    tile: np.ndarray


@dataclass
class _Field:
    path: str
    boxes: np.ndarray
    p: np.ndarray
    X: np.ndarray


@dataclass(frozen=True)
class Comparison:
    """Before/after of a site fit on the labelled cells (:meth:`LabellingSession.compare`).

    Attributes
    ----------
    before, after : dict
        On the labelled cells (Parasitized = positive; Uninfected and ``not a cell`` negative):
        ``n``, ``n_parasitized`` and ``n_negative`` (labelled), ``called`` (called Parasitized), ``tp``, ``fp``,
        ``fn``, ``tn``, ``sensitivity``, ``ppv``, ``specificity`` (None when undefined).
        ``before``: the cell model as the whole-field screen calls (its default parasitemia
        method's labels, the prior-corrected call for a model with a training prior);
        ``after``: the site model (in-sample: fitted on these cells).
    fields : list of dict
        Per field: ``field``, ``cells``, ``labelled``, ``before`` and ``after`` parasitemia
        (fractions, every segmented cell counted, as the whole-field screen counts by default).
    method : str
        The site fit's method.
    """

    before: dict
    after: dict
    fields: list[dict]
    method: str


def _call_metrics(y: np.ndarray, called: np.ndarray) -> dict:
    y, called = np.asarray(y, bool), np.asarray(called, bool)
    tp, fp = int(np.sum(called & y)), int(np.sum(called & ~y))
    fn, tn = int(np.sum(~called & y)), int(np.sum(~called & ~y))
    return {"n": int(len(y)), "n_parasitized": tp + fn, "n_negative": tn + fp, "called": tp + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "ppv": tp / (tp + fp) if tp + fp else None,
            "specificity": tn / (tn + fp) if tn + fp else None}


def adaptable_model(model: Any) -> tuple[Any, Path | None]:
    """The cell model to label with and the run folder :func:`~malaria_screen.smear.adapt.adapt` can adapt.

    Parameters
    ----------
    model : cell model
        A loaded model: a run folder's ``Predictor``, an ONNX model, or a site model
        (:class:`~malaria_screen.inference.site.SitePredictor`).

    Returns
    -------
    (cell_model, run_dir)
        For a site model, the cell model it wraps and its ``model/`` folder (labels adapt the
        cell model afresh); for a run folder's model, itself and the folder; otherwise (an
        ``.onnx`` file, an object without a source) the model and None: labels can be made and
        exported, not adapted here.
    """
    src = getattr(model, "source", None)
    if src and is_site_dir(src) and hasattr(model, "base"):
        base = model.base
        run = Path(src) / "model"
        return base, run if (run / "config.json").is_file() else None
    if src and Path(src).is_dir() and (Path(src) / "config.json").is_file() and (Path(src) / "weights.safetensors").is_file():
        return model, Path(src)
    return model, None


def load_site_fit(site_dir: str | Path) -> SiteFit:
    """The :class:`~malaria_screen.smear.adapt.SiteFit` a site folder holds (``site.json`` and
    its optional ``rescorer/``), to apply to cells already scored by its cell model.

    Raises
    ------
    FileNotFoundError
        If ``site_dir`` is not a site folder, or its second stage is missing.
    ValueError
        If ``site.json`` or the second stage is invalid.
    """
    d = Path(site_dir)
    if not is_site_dir(d):
        raise FileNotFoundError(f"{d} is not a site folder ({SITE_FILE} is missing)")
    site = SiteConfig.from_json(d / SITE_FILE)
    rescorer = CellRescorer.load(d / RESCORER_DIR) if site.method != "calibration" else None
    return SiteFit(site.method, site.calibration_a, site.calibration_b, site.threshold, rescorer)


def _outlined_tile(rgb: np.ndarray, bbox: Sequence[float], size: int = TILE_PX, margin: float = 0.25) -> np.ndarray:
    """:func:`~malaria_screen.smear.gallery.cell_thumbnail` with the cell's box drawn in (yellow)."""
    import cv2

    tile = np.ascontiguousarray(cell_thumbnail(rgb, bbox, size=size, margin=margin))
    x, y, w, h = (int(v) for v in bbox)
    side = int(round(max(w, h) * (1 + 2 * margin))) or 1
    x0, y0 = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
    s = size / side
    p0 = (int(round((x - x0) * s)), int(round((y - y0) * s)))
    p1 = (int(round((x + w - x0) * s)) - 1, int(round((y + h - y0) * s)) - 1)
    cv2.rectangle(tile, p0, p1, (255, 215, 0), 1)
    return tile


class LabellingSession:
    """One person's labelling: fields, the queue of cells to label, the labels and their undo.

    Parameters
    ----------
    model : cell model
        Scores the cells (``predict``, and ``threshold``, ``metrics``, ``source`` for the
        prior correction: :func:`~malaria_screen.evaluation.quantify.params_from_model`). Use
        :func:`adaptable_model` to get it from the app's model.
    max_fields : int, default=20
        Fields per session (bounded work and memory); more raise ``ValueError``.
    batch_size : int, default=12
        Cells per batch of the queue.
    explore : float, default=0.25
        Share of each batch drawn at random (:func:`~malaria_screen.smear.adapt.select_cells`).
    seed : int, default=0
        Seed of the random share (batch ``b`` uses ``seed + b``).
    target_prior : float, default=0.02
        The smear prior the cell model's posterior is re-weighted to before any fit.
    segment_config : SegmentConfig, optional
        As ``smear`` segments; pass the same to :meth:`adapt`.

    Raises
    ------
    ValueError
        If ``max_fields`` or ``batch_size`` is < 1, or ``explore`` is outside [0, 1].
    """

    def __init__(self, model: Any, *, max_fields: int = 20, batch_size: int = 12, explore: float = 0.25, seed: int = 0,
                 target_prior: float = DEFAULT_TARGET_PRIOR, segment_config: SegmentConfig | None = None) -> None:
        if max_fields < 1 or batch_size < 1 or not 0.0 <= explore <= 1.0:
            raise ValueError(f"need max_fields >= 1, batch_size >= 1 and explore in [0, 1], got {max_fields}, "
                             f"{batch_size}, {explore}")
        self.model = model
        self.max_fields = int(max_fields)
        self.batch_size = int(batch_size)
        self.explore = float(explore)
        self.seed = int(seed)
        self.target_prior = float(target_prior)
        self.segment_config = segment_config
        self.fit: SiteFit | None = None
        self._fields: list[_Field] = []
        self._start: list[int] = []
        self._labels: dict[int, str] = {}  # pool index -> label, in labelling order
        self._batch: list[Candidate] = []
        self._current: int | None = None
        self._n_batches = 0
        self._lock = threading.RLock()
        self._train_prior = params_from_model(model).train_prior

    # -- the pool ------------------------------------------------------------------------------

    @property
    def fields(self) -> list[str]:
        """Paths of the fields added, in order."""
        return [f.path for f in self._fields]

    @property
    def n_cells(self) -> int:
        """Cells in the pool (every segmented cell of the fields added)."""
        return sum(len(f.p) for f in self._fields)

    def add_field(self, path: str | Path, rgb: np.ndarray | None = None) -> int:
        """Segment and score a field; its cells join the pool.

        Parameters
        ----------
        path : path
            The field's file (kept in the labels; it must stay readable for :meth:`adapt`).
        rgb : (H, W, 3) uint8, optional
            Its pixels when already decoded (within the caller's limits); else decoded here.

        Returns
        -------
        int
            Cells found.

        Raises
        ------
        ValueError
            If the session holds ``max_fields`` fields, the field is already in it, it is not a
            colour blood-smear field (:class:`~malaria_screen.smear.domain.NotASmearError`,
            :class:`~malaria_screen.data.io.ImageDecodeError`), or no cell is found in it.
        """
        path = str(path)
        with self._lock:
            if len(self._fields) >= self.max_fields:
                raise ValueError(f"this session holds its limit of {self.max_fields} fields: export and adapt, "
                                 "or start a new session")
            if any(Path(f.path).name == Path(path).name for f in self._fields):
                raise ValueError(f"a field named {Path(path).name!r} is already in this session")
        rgb = require_smear(decode_field(path) if rgb is None else rgb)
        fc = field_cells(rgb, self.model, segment_config=self.segment_config)
        if not len(fc.p):
            raise ValueError("no cell segmented in this field")
        with self._lock:
            if len(self._fields) >= self.max_fields:
                raise ValueError(f"this session holds its limit of {self.max_fields} fields")
            self._start.append(self.n_cells)
            self._fields.append(_Field(path, np.asarray(fc.boxes, np.float64), np.asarray(fc.p, np.float64),
                                       np.asarray(fc.X, np.float64)))
        return len(fc.p)

    def _locate(self, index: int) -> tuple[_Field, int]:
        k = int(np.searchsorted(self._start, index, side="right")) - 1
        if index < 0 or k < 0 or index - self._start[k] >= len(self._fields[k].p):
            raise IndexError(f"no cell {index} in the pool of {self.n_cells}")
        return self._fields[k], index - self._start[k]

    def current_proba(self) -> tuple[np.ndarray, float]:
        """``(p (N,), threshold)`` the queue is ranked by, over the whole pool: the site fit's
        (:meth:`~malaria_screen.smear.adapt.SiteFit.proba`) after :meth:`adapt`, else the cell
        model's posterior re-weighted to ``target_prior`` with threshold 0.5 (the model's own
        posterior and threshold when it has no training prior)."""
        with self._lock:
            if not self._fields:
                return np.zeros(0), 0.5
            p = np.concatenate([f.p for f in self._fields])
            if self.fit is not None:
                return self.fit.proba(p, np.concatenate([f.X for f in self._fields]))
            if self._train_prior is not None:
                return adjust_to_prior(p, self._train_prior, self.target_prior), 0.5
            return p, float(getattr(self.model, "threshold", 0.5))

    # -- the queue -----------------------------------------------------------------------------

    def next_batch(self) -> list[Candidate]:
        """Choose the next batch of unlabelled cells (least sure first, then the random share)
        and make its first cell current; [] when every cell is labelled."""
        with self._lock:
            p, thr = self.current_proba()
            idx = select_cells(p, thr, self.batch_size, exclude=list(self._labels), explore=self.explore,
                               seed=self.seed + self._n_batches)
            self._n_batches += 1
            by_field: dict[str, list[int]] = {}
            for i in idx.tolist():
                by_field.setdefault(self._locate(i)[0].path, []).append(i)
            tiles: dict[int, np.ndarray] = {}
            for path, members in by_field.items():
                rgb = decode_field(path)
                for i in members:
                    f, j = self._locate(i)
                    tiles[i] = _outlined_tile(rgb, f.boxes[j])
            self._batch = []
            for i in idx.tolist():
                f, j = self._locate(i)
                self._batch.append(Candidate(index=i, field=Path(f.path).name, bbox=tuple(float(v) for v in f.boxes[j]),
                                             p=float(f.p[j]), p_current=float(p[i]), threshold=float(thr), tile=tiles[i]))
            self._current = self._batch[0].index if self._batch else None
            return list(self._batch)

    @property
    def batch(self) -> list[Candidate]:
        """The current batch (labelled or not)."""
        return list(self._batch)

    @property
    def current(self) -> Candidate | None:
        """The cell the next :meth:`label` applies to (None when the batch is done)."""
        with self._lock:
            return next((c for c in self._batch if c.index == self._current), None)

    def select(self, position: int) -> Candidate:
        """Make the batch's ``position``-th cell current (to label or relabel it).

        Raises
        ------
        IndexError
            If there is no such position.
        """
        with self._lock:
            if not 0 <= position < len(self._batch):
                raise IndexError(f"no cell {position} in a batch of {len(self._batch)}")
            self._current = self._batch[position].index
            return self._batch[position]

    def label(self, label: str) -> Candidate | None:
        """Label the current cell; the next unlabelled cell of the batch becomes current.

        A cell labelled before is relabelled (it moves to the end of the labelling order, so
        :meth:`undo` takes it back first). When the batch has no unlabelled cell left, the next
        batch is chosen.

        Returns
        -------
        Candidate or None
            The new current cell (None when every cell of the pool is labelled).

        Raises
        ------
        ValueError
            If ``label`` is not one of :data:`~malaria_screen.smear.adapt.LABEL_CLASSES`, or no
            cell is current.
        """
        if label not in LABEL_CLASSES:
            raise ValueError(f"unknown label {label!r} (use {', '.join(LABEL_CLASSES)})")
        with self._lock:
            if self._current is None:
                raise ValueError("no cell to label: add fields, or choose the next batch")
            self._labels.pop(self._current, None)
            self._labels[self._current] = label
            pos = next(k for k, c in enumerate(self._batch) if c.index == self._current)
            order = self._batch[pos + 1 :] + self._batch[:pos]
            nxt = next((c for c in order if c.index not in self._labels), None)
            if nxt is None:
                self.next_batch()
            else:
                self._current = nxt.index
            return self.current

    def undo(self) -> Candidate | None:
        """Take back the last label; its cell becomes current again (put back at the head of the
        batch when a later batch was chosen). Returns that cell, or None when nothing is labelled."""
        with self._lock:
            if not self._labels:
                return None
            index = next(reversed(self._labels))
            del self._labels[index]
            if all(c.index != index for c in self._batch):
                f, j = self._locate(index)
                p, thr = self.current_proba()
                tile = _outlined_tile(decode_field(f.path), f.boxes[j])
                self._batch.insert(0, Candidate(index=index, field=Path(f.path).name,
                                                bbox=tuple(float(v) for v in f.boxes[j]), p=float(f.p[j]),
                                                p_current=float(p[index]), threshold=float(thr), tile=tile))
            self._current = index
            return self.current

    # -- the labels ----------------------------------------------------------------------------

    def label_of(self, index: int) -> str | None:
        """The label of pool cell ``index``, or None."""
        return self._labels.get(index)

    @property
    def counts(self) -> dict[str, int]:
        """Labels per class of :data:`~malaria_screen.smear.adapt.LABEL_CLASSES`."""
        with self._lock:
            vals = list(self._labels.values())
        return {c: vals.count(c) for c in LABEL_CLASSES}

    @property
    def n_labelled(self) -> int:
        """Cells labelled."""
        return len(self._labels)

    def labelled(self) -> list[tuple[int, LabelledCell, float]]:
        """``(index, LabelledCell, p)`` per label in labelling order, ``p`` the cell model's P(Parasitized)."""
        with self._lock:
            out = []
            for i, lab in self._labels.items():
                f, j = self._locate(i)
                out.append((i, LabelledCell(label=lab, field=f.path, bbox=tuple(float(v) for v in f.boxes[j])),
                            float(f.p[j])))
            return out

    def labelled_cells(self, *, relative_to: str | Path | None = None,
                       indices: Sequence[int] | None = None) -> list[LabelledCell]:
        """The labels as :class:`~malaria_screen.smear.adapt.LabelledCell` (field path + box), in
        labelling order (only pool cells ``indices`` when given); field paths relative to
        ``relative_to`` when the field lies under it."""
        keep = None if indices is None else set(int(i) for i in indices)
        cells = [c for i, c, _ in self.labelled() if keep is None or i in keep]
        if relative_to is None:
            return cells
        root = Path(relative_to).resolve()
        out = []
        for c in cells:
            p = Path(c.field).resolve()
            rel = os.path.relpath(p, root) if p.is_relative_to(root) else str(p)
            out.append(LabelledCell(label=c.label, field=rel, bbox=c.bbox))
        return out

    def write_csv(self, path: str | Path, *, indices: Sequence[int] | None = None) -> Path:
        """Write the labels CSV (``field,x,y,w,h,label``; :func:`~malaria_screen.smear.adapt.read_labels_csv`
        reads it back), atomically; field paths relative to the CSV's folder when they lie under it.
        ``indices``: only these labelled pool cells (default all).

        Raises
        ------
        ValueError
            If nothing is labelled.
        """
        path = Path(path)
        cells = self.labelled_cells(relative_to=path.parent, indices=indices)
        if not cells:
            raise ValueError("nothing labelled yet")
        return write_labels_csv(cells, path)

    # -- adapt and its before/after ------------------------------------------------------------

    def adapt(self, csv_path: str | Path, out: str | Path, *, model_dir: str | Path, method: str = "auto") -> tuple[AdaptResult, Comparison]:
        """Export the labels, fit a site model on them (:func:`~malaria_screen.smear.adapt.adapt`,
        written to ``out``), rank later batches by it, and compare it with the cell model.

        Parameters
        ----------
        csv_path : path
            Where the labels CSV is written (and read back, checked, by ``adapt``).
        out : path
            The site folder (replaced if it exists).
        model_dir : path
            The run folder of the session's cell model (:func:`adaptable_model`).
        method : str
            ``adapt``'s method (``"auto"``: by the amount of labels).

        Returns
        -------
        (AdaptResult, Comparison)

        Raises
        ------
        LabelsError
            (a ValueError) If a class has too few labels, or a label matches no cell.
        ValueError
            If nothing is labelled.
        """
        with self._lock:
            snapshot = dict(self._labels)  # labels given while adapt runs are for the next fit
        csv_path = self.write_csv(csv_path, indices=list(snapshot))
        res = adapt(read_labels_csv(csv_path), out, model=model_dir, method=method, labels_source=csv_path,
                    segment_config=self.segment_config, overwrite=True)
        fit = load_site_fit(res.out)
        with self._lock:
            self.fit = fit
        return res, self.compare(fit, labels=snapshot)

    def compare(self, fit: SiteFit, *, labels: dict[int, str] | None = None) -> Comparison:
        """Before/after of ``fit`` on the labelled cells and the fields (:class:`Comparison`).

        ``labels``: ``{pool index: label}`` to compare on (default: the session's labels).

        Raises
        ------
        ValueError
            If nothing is labelled.
        """
        with self._lock:
            labels = dict(self._labels if labels is None else labels)
            if not labels:
                raise ValueError("nothing labelled yet")
            idx = np.fromiter(labels, np.int64)
            y = np.asarray([labels[i] == "Parasitized" for i in idx.tolist()])
            p = np.concatenate([f.p for f in self._fields])
            X = np.concatenate([f.X for f in self._fields])
            fields = list(self._fields)
            starts = list(self._start)
        before_q = field_quantifier(self.model)
        p_site, thr = fit.proba(p, X)
        after_q = ClassifyAndCount(thr)
        before = _call_metrics(y, before_q.labels(p[idx]))
        after = _call_metrics(y, after_q.labels(p_site[idx]))
        rows = []
        for f, s in zip(fields, starts):
            sl = slice(s, s + len(f.p))
            rows.append({"field": Path(f.path).name, "cells": int(len(f.p)),
                         "labelled": int(np.sum((idx >= s) & (idx < s + len(f.p)))),
                         "before": float(estimate_parasitemia(before_q, p[sl]).prevalence),
                         "after": float(estimate_parasitemia(after_q, p_site[sl]).prevalence)})
        return Comparison(before=before, after=after, fields=rows, method=fit.method)
