"""Outputs of whole-smear screening: overlay PNG, per-field JSON, ``summary.json``, ``report.html``.

:func:`run_smear` screens every field of one slide (a list of files/folders): each field gives
``<stem>.json`` and ``<stem>_overlay.png``; the run gives ``summary.json`` (totals over the
fields, a per-file error entry for every field that could not be read) and a self-contained
offline ``report.html`` (inline CSS, base64 JPEG thumbnails, no external fonts or scripts).
Every file is written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written output behind. A field that fails for any reason (an
unreadable or non-regular file, a field too small to segment, ``MemoryError``, ``cv2.error``, ...)
gets an error entry and the others go on; ``summary.json`` and ``report.html`` are written even
when the run is interrupted (``KeyboardInterrupt``), then marked ``"interrupted": true``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from malaria_screen.data.io import is_image_entry
from malaria_screen.data.parallel import start_fork_server
from malaria_screen.errors import error_text
from malaria_screen.evaluation.quantify import DEFAULT_TARGET_PRIOR
from malaria_screen.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from malaria_screen.smear.fields import decode_field
from malaria_screen.smear.gallery import gallery_cells, gallery_html, select_gallery
from malaria_screen.smear.parallel import map_fields
from malaria_screen.smear.parasitemia import decision_threshold, estimate_parasitemia, field_quantifier
from malaria_screen.smear.screen import FieldResult, screen_field
from malaria_screen.smear.segment import SegmentConfig
from malaria_screen.smear.slide import counted_fields, out_of_domain_warning
from malaria_screen.smear.stain import check_stain_method

logger = logging.getLogger(__name__)

__all__ = ["HIGH_PARASITEMIA", "collect_fields", "overlay_image", "prestart_workers", "render_report", "render_report_row",
           "run_smear", "screen_field_file", "slide_warnings", "write_field_outputs"]


def collect_fields(inputs: Iterable[str | Path], *, out_dir: str | Path | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of field image paths.

    Folders contribute their entries (not recursive) that
    :func:`~malaria_screen.data.io.is_image_entry` takes for images (not hidden, not a known
    non-image file such as ``.json``/``.txt``/``.csv``/``.html``) and that are not folders: regular files, and also
    broken symbolic links, FIFOs, sockets and devices, so that :func:`run_smear` reports each of
    those as an error instead of dropping it silently. Files named explicitly are always
    included (decoding is by content). Missing paths are kept, to be reported as errors. A file
    reached twice (by two spellings of its path, or a link) is kept once, under its first path.

    Parameters
    ----------
    inputs : iterable of str or Path
        Field image files and/or folders of them.
    out_dir : str or Path, optional
        The run's output folder: when it is one of the folders, its ``*_overlay.png`` files (the
        outputs of an earlier run) are not fields.

    Returns
    -------
    list of Path
        Folder entries sorted by name, in input order, without duplicates.
    """
    return _expand_inputs(inputs, out_dir)[0]


def _expand_inputs(inputs: Iterable[str | Path], out_dir: str | Path | None) -> tuple[list[Path], list[str]]:
    """:func:`collect_fields`, plus warnings: input folders without field images, duplicates dropped."""
    own = os.path.realpath(out_dir) if out_dir is not None else None
    out: list[Path] = []
    notes: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            skip_overlays = os.path.realpath(p) == own
            found = sorted(
                q
                for q in p.iterdir()
                if is_image_entry(q.name) and not q.is_dir()
                and not (skip_overlays and q.name.endswith("_overlay.png"))
            )
            if not found:
                notes.append(f"No field images found in {p} (hidden files and non-image files such as .json/.txt/.csv "
                             "are skipped; folders are not searched recursively).")
            out.extend(found)
        else:
            out.append(p)
    seen: set[str] = set()
    uniq = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    if len(uniq) < len(out):
        notes.append(f"{len(out) - len(uniq)} input path(s) named a field already given by another path: each field "
                     "is screened once.")
    return uniq, notes


def _check_regular_file(path: Path) -> None:
    """Raise unless ``path`` is (a link to) a regular file; never opens it (a FIFO would block).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or is a broken symbolic link.
    ValueError
        If ``path`` is a folder, FIFO, socket or device.
    OSError
        If ``path`` cannot be examined (permissions, a symbolic-link loop).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"broken symbolic link: {path} -> {os.readlink(path)}") from None
        raise FileNotFoundError(f"no such file: {path}") from None
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    kind = next((name for is_kind, name in kinds if is_kind(mode)), "special file")
    raise ValueError(f"not a regular file: {path} is a {kind}; not opened")


def overlay_image(rgb: np.ndarray, result: FieldResult) -> np.ndarray:
    """Draw cell outlines (green uninfected, red infected, grey unclassified, yellow border-cut),
    infected cells' ids in red, and excluded WBC boxes in blue.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 field.
    result : FieldResult
        Its screening result (with ``labels``).

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 overlay.
    """
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    lab = result.labels
    if lab is not None and lab.size:
        n = int(lab.max())
        colors = np.zeros((n + 1, 3), np.uint8)
        for c in result.cells:
            if c.label == "Parasitized":
                colors[c.id] = (230, 0, 0)
            elif c.border:
                colors[c.id] = (230, 200, 0)
            elif c.label == "Uninfected":
                colors[c.id] = (0, 170, 0)
            else:
                colors[c.id] = (90, 90, 90)
        edge = np.zeros(lab.shape, bool)
        edge[:-1] |= lab[:-1] != lab[1:]
        edge[1:] |= lab[:-1] != lab[1:]
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
        edge &= lab > 0
        thick = max(1, round(max(rgb.shape[:2]) / 800))
        if thick > 1:
            edge = cv2.dilate(edge.astype(np.uint8), np.ones((thick, thick), np.uint8)).astype(bool) & (lab > 0)
        out[edge] = colors[lab[edge]]
    scale = max(0.4, max(rgb.shape[:2]) / 1600)
    for c in result.cells:
        if c.label == "Parasitized":
            x, y, w, h = c.bbox
            org = (int(x + w / 2 - 8 * scale), int(y + h / 2 + 6 * scale))
            cv2.putText(out, str(c.id), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(2, int(4 * scale)), cv2.LINE_AA)
            cv2.putText(out, str(c.id), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (220, 0, 0), max(1, int(2 * scale)), cv2.LINE_AA)
    for x, y, w, h in result.wbc_boxes:
        cv2.rectangle(out, (int(x), int(y)), (int(x + w), int(y + h)), (0, 60, 255), 2)
    return out


def _png_bytes(rgb: np.ndarray) -> bytes:
    import cv2

    # zlib level 1, the "up" filter on every row and run-length matching: 33 ms of CPU for a
    # 1280x960 IML field against 72 ms with the default adaptive filters (level 1), and a file ~8 %
    # smaller (1.10 vs 1.19 MB); same pixels. OpenCV before 4.10 has no filter option: its default.
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    # cvtColor: 0.3 ms against 5 ms for a contiguous copy of the channel-reversed view
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _thumb_b64(rgb: np.ndarray, max_side: int = 360) -> str:
    import cv2

    h, w = rgb.shape[:2]
    f = min(1.0, max_side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def write_field_outputs(out_dir: Path, stem: str, rgb: np.ndarray, result: FieldResult, *,
                        overlay: bool = True) -> tuple[Path, Path | None, np.ndarray]:
    """Write ``<stem>.json`` and ``<stem>_overlay.png``, both or neither; returns both paths and the
    overlay array.

    Each is first written atomically under a hidden temporary name, then both are renamed, so an
    interrupt leaves no result file without its overlay (or the reverse). With ``overlay=False``
    only the JSON is written (the overlay PNG is about a fifth of a field's CPU time) and the
    overlay path is None; the overlay array is still returned (for the report's thumbnail).
    """
    ov = overlay_image(rgb, result)
    jp, op = out_dir / f"{stem}.json", (out_dir / f"{stem}_overlay.png" if overlay else None)
    parts = [out_dir / name for name in _part_names(stem)]
    try:
        atomic_write_json(parts[0], result.to_json())
        if op is not None:
            atomic_write_bytes(parts[1], _png_bytes(ov))
            os.replace(parts[1], op)
        os.replace(parts[0], jp)
    finally:
        for q in parts:
            q.unlink(missing_ok=True)
    return jp, op, ov


def _part_names(stem: str) -> tuple[str, str]:
    """The hidden temporary names of a field's JSON and overlay: the stem's first 40 characters
    (a file name's length is bounded) and a digest of the whole stem, so that fields whose names
    share their first 40 characters never share a temporary file (stems are unique in a run)."""
    tag = f".{stem[:40]}.{hashlib.sha256(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"
    return f"{tag}.json.part", f"{tag}.png.part"


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output stems, unique case-insensitively, never ``summary``/``report``: ``f``, ``f_2``, ..."""
    taken = {"summary", "report"}
    stems = []
    for p in paths:
        base = p.stem or "field"
        s, k = base, 1
        while s.lower() in taken:
            k += 1
            s = f"{base}_{k}"
        taken.add(s.lower())
        stems.append(s)
    return stems


def run_smear(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    model: Any,
    *,
    segment_config: SegmentConfig | None = None,
    stain: str = "none",
    scale_to_nih: bool = False,
    count_border_cells: bool = True,
    ci_method: str = "wilson",
    progress: Callable[[str, dict], None] | None = None,
    rescorer: Any | None = None,
    overlays: bool = True,
    workers: int = 1,
    ray: str | None = None,
    domain_reference: Any | None = None,
    include_out_of_domain: bool = False,
    parasitemia_method: str | None = None,
    target_prior: float = DEFAULT_TARGET_PRIOR,
) -> dict:
    """Screen the fields of one slide and write all outputs to ``out_dir``.

    The parasitemia of each field and of the slide is estimated with ``parasitemia_method``
    (:data:`~malaria_screen.smear.parasitemia.FIELD_METHODS`); default: the prior correction to
    2 % (:func:`~malaria_screen.smear.parasitemia.field_quantifier`; with a rescorer, its own
    threshold). The slide pools its counted fields' cells; its interval accounts for clustering by
    field (:func:`~malaria_screen.smear.parasitemia.estimate_parasitemia`).

    Parameters
    ----------
    inputs : iterable of path
        Field images and/or folders of them (see :func:`collect_fields`; the ``*_overlay.png``
        of ``out_dir`` are skipped when it is one of the folders).
    out_dir : path
        Output folder (created).
    model : CellModel or None
        Cell classifier (see :func:`~malaria_screen.smear.screen.screen_field`); None =
        segmentation/counting only.
    segment_config, stain, scale_to_nih, count_border_cells, ci_method
        Passed to :func:`~malaria_screen.smear.screen.screen_field`; ``summary.json`` records
        ``segment_config.pixel_size_um`` among its settings.
    progress : callable, optional
        Called as ``progress(name, entry)`` after each field (entry has an ``error`` key on
        failure).
    rescorer : CellRescorer, optional
        Second stage (see :func:`~malaria_screen.smear.screen.screen_field`).
    overlays : bool, default=True
        Write ``<stem>_overlay.png`` (False: only the JSON; ``"overlay": null`` in the entry).
    workers : int, default=1
        Fields screened at once, in worker processes (:func:`~malaria_screen.smear.parallel.map_fields`);
        the outputs equal a one-worker run's (timings aside).
    ray : str, optional
        A Ray address already joined (:func:`malaria_screen.data.ray_map.connect`): the fields
        are screened on Ray actors instead (``workers`` ignored); every node must see the inputs
        and ``out_dir`` at the same paths.
    domain_reference : DomainReference, optional
        The model's self-check reference (:func:`~malaria_screen.smear.domain.load_reference`):
        each field gets ``in_domain`` / ``domain_score``; fields outside the domain are left out
        of the slide totals (unless ``include_out_of_domain``) and named in ``warnings``.
        Fields that are not blood smears are per-field errors either way.
    include_out_of_domain : bool
        Count fields outside the model's domain in the slide totals.
    parasitemia_method : str, optional
        A key of :data:`~malaria_screen.smear.parasitemia.FIELD_METHODS`; default: the model's own
        (a site model's ``"cc"``) or ``"prior"``.
    target_prior : float, default=0.02
        The prior (expected share of infected cells, 0..1) of the ``"prior"`` method; a higher
        one calls more cells Parasitized (``docs/quantification.md``: what 10 % changes).

    Returns
    -------
    dict
        The ``summary.json`` document: totals (``n_fields``, ``n_failed``, ``n_rbc``,
        ``n_infected``, ``parasitemia``, ``parasitemia_ci95``), ``fields`` and ``errors``
        (``{"image", "path", "error": "<exception type>: <message>"}`` per failed field: missing
        files, broken links, FIFOs and other non-regular files (never opened), undecodable or
        grayscale images, fields too small to segment, and any other ``Exception`` raised while
        screening one); ``warnings`` also names input folders without field images, inputs
        dropped as duplicates of a field already given, and per-field files in ``out_dir`` left
        from an earlier run.

    Raises
    ------
    ValueError
        If ``stain`` or ``ci_method`` is unknown or ``target_prior`` is not in (0, 1) (checked
        before any field is read).
    KeyboardInterrupt, SystemExit
        Passed on (not recorded as a field error), after ``summary.json`` and ``report.html``
        have been written for the fields done so far (``"interrupted": true``).
    """
    # checked up front: inside the loop a ValueError is one field's error
    check_stain_method(stain)
    if ci_method not in ("wilson", "exact"):
        raise ValueError(f"ci_method must be 'wilson' or 'exact', got {ci_method!r}")
    if not 0.0 < target_prior < 1.0:
        raise ValueError(f"target_prior must be in (0, 1), got {target_prior}")
    quantifier = field_quantifier(model, rescorer=rescorer, method=parasitemia_method, target_prior=target_prior)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, notes = _expand_inputs(inputs, out)
    stems = _unique_stems(paths)
    earlier = _field_outputs(out)  # per-field files already there; those this run does not rewrite are stale
    fields: list[dict] = []
    field_p: list[np.ndarray] = []  # each field's counted cells' p_parasitized, for the slide's estimate
    errors: list[dict] = []
    # the gallery's threshold: where the estimator calls a cell Parasitized (on the raw posterior)
    thr = None if quantifier is None else decision_threshold(quantifier, model)
    opts = {"segment_config": segment_config, "stain": stain, "scale_to_nih": scale_to_nih,
            "count_border_cells": count_border_cells, "ci_method": ci_method, "overlays": overlays,
            "domain_reference": domain_reference, "gallery_threshold": thr, "quantifier": quantifier}
    candidates: list = []  # gallery: cells to confirm by eye, pruned to the best as fields finish
    n_positive = 0
    jobs = [(path, stem, out, opts) for path, stem in zip(paths, stems)]
    t_start = time.perf_counter()
    finished = False
    rows = _RowSpool(out)  # report rows (with their ~50 KB thumbnails) wait on disk, not in memory
    results = map_fields(screen_field_file, jobs, model=model, rescorer=rescorer, workers=workers, ray=ray,
                         preload=_FIELD_JOB_IMPORTS)
    try:
        for done in results:
            entry = done["entry"]
            if "error" in entry:
                errors.append(entry)
                # the progress callback shows it; logged at WARNING too it would be printed twice
                logger.log(logging.INFO if progress else logging.WARNING, "field %s failed: %s", entry["path"], entry["error"])
            else:
                fields.append(entry)
                field_p.append(np.asarray(done.get("p", []), np.float64))
                rows.add(render_report_row(entry, done["thumb"], include_out_of_domain=include_out_of_domain))
                # the gallery shows the cells of the fields the total counts
                new = done.get("cells", []) if include_out_of_domain or entry.get("in_domain") is not False else []
                n_positive += sum(c.kind == "parasitized" for c in new)
                pos, unc, _ = select_gallery(candidates + new, threshold=thr or 0.5)
                candidates = pos + unc
            if progress:
                progress(entry["image"], entry)
        finished = True
    finally:
        # also on KeyboardInterrupt (or a failing progress callback): the fields done so far keep their summary
        results.close()  # stops the workers, if any
        if not finished:
            _remove_unfinished(out, stems, {f["json"] for f in fields}, earlier)
        stale = sorted(earlier - {n for f in fields for n in (f["json"], f["overlay"]) if n})
        if stale:
            notes.append(f"{out} holds {len(stale)} per-field result file(s) that this run did not write (e.g. "
                         f"{stale[0]}): left from an earlier run, they are not in this summary. Use an empty --out.")
        summary = _summary(fields, errors, model, rescorer, quantifier, field_p, settings={
            "pixel_size_um": (segment_config or SegmentConfig()).pixel_size_um, "stain": stain, "scale_to_nih": scale_to_nih,
            "count_border_cells": count_border_cells}, ci_method=ci_method, seconds=time.perf_counter() - t_start,
            interrupted=None if finished else len(paths), notes=notes, include_out_of_domain=include_out_of_domain,
            domain_reference=domain_reference)
        atomic_write_json(out / "summary.json", summary)
        pos, unc, _ = select_gallery(candidates, threshold=thr or 0.5)
        rows.write_report(out / "report.html", summary, gallery_html(pos, unc, n_positive) if model is not None else "")
    return summary


def _remove_unfinished(out: Path, stems: list[str], done_json: set[str], earlier: set[str]) -> None:
    """After an interrupt: remove what the fields in progress wrote (temporary parts; a worker
    stopped between its two renames; one that finished after the driver stopped listening), so
    only the fields in the summary have outputs. Files from an earlier run are left alone."""
    for stem in stems:
        if f"{stem}.json" in done_json:
            continue
        for name in (*_part_names(stem), f"{stem}.json", f"{stem}_overlay.png"):
            if name not in earlier:
                (out / name).unlink(missing_ok=True)


# Modules :func:`screen_field_file` imports lazily (segmentation, features, the self-check): the
# fork server of ``smear --workers`` imports them once, so no worker pays ~1 s on its first field.
_FIELD_JOB_IMPORTS = ("scipy.ndimage", "scipy.special", "skimage.segmentation", "skimage.measure", "skimage.morphology",
                     "skimage.filters", "skimage.feature", "skimage.transform", "skimage.exposure", "skimage.draw")


def prestart_workers(workers: int, *, torch: bool = True) -> None:
    """Start the worker processes' fork server of a ``run_smear(..., workers=workers)`` to come,
    importing what a field job needs (the cell model's module: the PyTorch one if ``torch``, else
    the ONNX Runtime one), so that these imports overlap the caller's own start-up. Call it before
    loading the model; a no-op for one worker. Saves about 2 s of wall time per ``smear`` command
    on 2 cores with the PyTorch model."""
    if workers > 1:
        model_module = "malaria_screen.inference.predictor" if torch else "malaria_screen.inference.onnx_predictor"
        start_fork_server([*_FIELD_JOB_IMPORTS, __name__, model_module])


def screen_field_file(job: tuple[Path, str, Path, dict], model: Any, rescorer: Any) -> dict:
    """Screen one field file and write its outputs: the per-field work of :func:`run_smear`.

    Run here, in a worker process or on a Ray actor (:func:`~malaria_screen.smear.parallel.map_fields`).

    Parameters
    ----------
    job : (path, stem, out_dir, options)
        The field, its output stem, the output folder and ``run_smear``'s options
        (``segment_config``, ``stain``, ``scale_to_nih``, ``count_border_cells``, ``ci_method``,
        ``overlays``, ``domain_reference``, ``gallery_threshold``: the threshold the gallery's
        candidates are chosen by, None for none).
    model, rescorer
        As :func:`~malaria_screen.smear.screen.screen_field`.

    Returns
    -------
    dict
        ``{"entry": <summary.json field entry>, "thumb": <base64 JPEG>, "cells": <gallery
        candidates, :func:`~malaria_screen.smear.gallery.gallery_cells`>}``, or, if the field
        failed for any reason (never raised), ``{"entry": {"image", "path", "error"}}``.
    """
    path, stem, out, opts = job
    opts = dict(opts)
    overlays = opts.pop("overlays", True)
    thr = opts.pop("gallery_threshold", None)
    try:
        _check_regular_file(path)
        rgb = decode_field(path)
        res = screen_field(rgb, model, image_name=path.name, rescorer=rescorer, **opts)
        jp, op, ov = write_field_outputs(out, stem, rgb, res, overlay=overlays)
        thumb = _thumb_b64(ov)
        cells = gallery_cells(rgb, res, threshold=thr) if thr is not None and model is not None else []
    except Exception as exc:  # noqa: BLE001 - one bad field (MemoryError, cv2.error, ...) never costs the others
        logger.debug("field %s failed", path, exc_info=True)
        return {"entry": {"image": path.name, "path": str(path), "error": error_text(exc)}}
    counted = [c.p_parasitized for c in res.cells
               if c.p_parasitized is not None and (opts.get("count_border_cells", True) or not c.border)]
    return {"thumb": thumb, "cells": cells, "p": counted, "entry": {
        "image": path.name,
        "path": str(path),
        "json": jp.name,
        "overlay": op.name if op is not None else None,
        "width": res.width,
        "height": res.height,
        "n_rbc": res.n_rbc,
        "n_infected": res.n_infected,
        "n_wbc": res.n_wbc,
        "parasitemia": res.parasitemia,
        "parasitemia_ci95": res.parasitemia_ci95,
        "parasitemia_method": res.parasitemia_method,
        "rbc_diameter_px": None if not np.isfinite(res.rbc_diameter_px) else round(float(res.rbc_diameter_px), 2),
        "in_domain": res.in_domain,
        "domain_score": None if res.domain_score is None else round(float(res.domain_score), 3),
        "seconds": round(res.seconds.get("total", float("nan")), 4),
    }}


class _RowSpool:
    """The report's table rows, appended to a hidden file in the output folder as fields finish,
    then streamed into ``report.html`` between its head and tail: memory does not grow with the
    number of fields (a row carries its field's ~50 KB thumbnail)."""

    def __init__(self, out: Path) -> None:
        fd, name = tempfile.mkstemp(dir=out, prefix=".report-rows.", suffix=".part")
        self.path = Path(name)
        self.fh = os.fdopen(fd, "w+", encoding="utf-8")

    def add(self, row: str) -> None:
        self.fh.write(row + "\n")

    def write_report(self, path: Path, summary: dict, gallery: str = "") -> None:
        try:
            head, tail = render_report(summary, "\0ROWS\0", gallery).split("\0ROWS\0")
            self.fh.flush()
            self.fh.seek(0)

            def writer(fh) -> None:
                fh.write(head.encode("utf-8"))
                for line in self.fh:
                    fh.write(line.encode("utf-8"))
                fh.write(tail.encode("utf-8"))

            atomic_write(path, writer)
        finally:
            self.fh.close()
            self.path.unlink(missing_ok=True)


def _field_outputs(out: Path) -> set[str]:
    """Names of the per-field result files in ``out``: ``<stem>_overlay.png`` and its ``<stem>.json``."""
    overlays = {q.name for q in out.glob("*_overlay.png") if not q.name.startswith(".")}
    return overlays | {j for j in (f"{n[:-len('_overlay.png')]}.json" for n in overlays) if (out / j).is_file()}


def _summary(fields: list[dict], errors: list[dict], model: Any, rescorer: Any, quantifier: Any,
             field_p: list[np.ndarray], *, settings: dict, ci_method: str, seconds: float, interrupted: int | None,
             notes: list[str] = (), include_out_of_domain: bool = False, domain_reference: Any | None = None) -> dict:
    """The ``summary.json`` document; ``interrupted`` = number of fields the run was given if it
    stopped early (a warning then says the totals cover only the fields listed), else None;
    ``notes`` are more warnings (inputs without fields, duplicates, stale files in the folder).
    Fields with ``in_domain`` False count in the totals only if ``include_out_of_domain``. The
    slide's parasitemia pools the counted fields' ``field_p`` (their counted cells) with ``quantifier``."""
    keep = counted_fields([f.get("in_domain") for f in fields], include_out_of_domain=include_out_of_domain)
    counted = [f for f, c in zip(fields, keep) if c]
    counted_p = [p for p, c in zip(field_p, keep) if c]
    ood = [f["image"] for f in fields if f.get("in_domain") is False]
    n_rbc = sum(f["n_rbc"] for f in counted)
    n_inf = sum(f["n_infected"] for f in counted)
    classified = model is not None
    est = None
    if classified and n_rbc:
        groups = np.concatenate([np.full(len(p), i) for i, p in enumerate(counted_p)])
        est = estimate_parasitemia(quantifier, np.concatenate(counted_p), groups=groups, ci_method=ci_method)
    lo, hi = est.ci95 if est is not None else (0.0, 1.0)
    ood_note = out_of_domain_warning(ood, included=include_out_of_domain)
    warnings = ([ood_note] if ood_note else []) + (slide_warnings(n_inf, n_rbc) if classified else []) + list(notes)
    if interrupted is not None:
        warnings.append(f"The run was interrupted after {len(fields) + len(errors)} of {interrupted} field(s): the "
                        "totals cover only the fields listed here.")
    return {
        "n_fields": len(fields),
        "n_failed": len(errors),
        "n_rbc": n_rbc,
        "n_infected": n_inf,
        "parasitemia": est.prevalence if est is not None else None,
        "parasitemia_ci95": [lo, hi],
        "parasitemia_method": quantifier.name if classified else None,
        "ci_method": est.ci_method if est is not None else ci_method,
        "classified": classified,
        "n_fields_counted": len(counted),
        "out_of_domain": ood,
        "include_out_of_domain": include_out_of_domain,
        "self_check": None if domain_reference is None else {
            "threshold": domain_reference.threshold, "rule": domain_reference.threshold_rule},
        "settings": {
            **settings,
            "model": getattr(model, "source", None) if model is not None else None,
            "threshold": float(getattr(rescorer if rescorer is not None else model, "threshold", 0.5)) if model is not None else None,
            "quantifier": quantifier.describe() if classified else None,
            "rescorer": None if rescorer is None or model is None else {
                "source": getattr(rescorer, "source", None), "fitted_with_model": rescorer.config.model,
                "n_fields": rescorer.config.n_fields, "n_parasitized": rescorer.config.n_parasitized},
        },
        "seconds_total": round(seconds, 3),
        "interrupted": interrupted is not None,
        "warnings": warnings,
        "fields": fields,
        "errors": errors,
    }


#: Parasitemia above which a slide gets a warning (WHO: > 5 % is hyperparasitaemia in low-
#: transmission areas; 10 % everywhere).
HIGH_PARASITEMIA = 0.05


def slide_warnings(n_infected: int, n_rbc: int, *, high: float = HIGH_PARASITEMIA, min_rbc: int = 200) -> list[str]:
    """Plain-language warnings for a slide's result (empty when there is nothing to flag).

    A parasitemia above ``high`` (fraction) over at least ``min_rbc`` counted RBCs is either
    hyperparasitaemia (WHO severe-malaria criterion, an emergency) or a cell model that does not
    fit this microscope/stain: the previous, NIH-only default model called ~15 % of the cells of
    the IML_Malaria microscope Parasitized, and the stain-robust one still over-calls some of its
    fields when counting at its threshold (docs/quantification.md). Both need a microscopist.

    Parameters
    ----------
    n_infected, n_rbc : int
        Slide totals (counted cells).
    high : float
        Parasitemia threshold, fraction 0..1.
    min_rbc : int
        Fewer counted cells than this give no warning (too few to judge).

    Returns
    -------
    list of str
    """
    if n_rbc < min_rbc or n_infected / n_rbc <= high:
        return []
    return [f"Parasitemia {100 * n_infected / n_rbc:.1f} % is above {100 * high:.0f} %: either hyperparasitaemia "
            "(severe malaria) or a cell model that does not fit this microscope and stain (a model trained on other "
            "slides can call many healthy cells Parasitized). Confirm by microscopy; adapt the model to annotated "
            "fields of this microscope before relying on its counts."]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


@functools.lru_cache(maxsize=1)
def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("malaria_screen.smear", "templates"), autoescape=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def render_report_row(entry: dict, thumb: str, *, include_out_of_domain: bool = False) -> str:
    """One field's table row of ``report.html`` (template ``smear/templates/report_row.html.j2``, autoescaped).

    Parameters
    ----------
    entry : dict
        The field's ``summary.json`` entry.
    thumb : str
        Its overlay's base64 JPEG thumbnail ("" for none).
    include_out_of_domain : bool, default=False
        Whether out-of-domain fields were counted in the slide total (their self-check flag says so).

    Returns
    -------
    str
        ``<tr>...</tr>`` markup, one line.
    """
    return _templates().get_template("report_row.html.j2").render(f=entry, img=thumb, pct=_pct,
                                                                   include_out_of_domain=include_out_of_domain)


def render_report(summary: dict, rows: str, gallery: str = "") -> str:
    """``report.html`` around the table rows ``rows`` (template ``smear/templates/report.html.j2``, autoescaped).

    Parameters
    ----------
    summary : dict
        The ``summary.json`` document (:func:`run_smear`).
    rows : str
        The fields' rows (:func:`render_report_row`), markup inserted as is.
    gallery : str, default=""
        The gallery of cells to confirm (:func:`~malaria_screen.smear.gallery.gallery_html`),
        markup inserted as is below the table.

    Returns
    -------
    str
        A self-contained HTML page (inline CSS, no external resources). To add a section, add a
        block to the template and its data to this function's context.
    """
    from markupsafe import Markup

    return _templates().get_template("report.html.j2").render(summary=summary, rows=Markup(rows),
                                                               gallery=Markup(gallery), pct=_pct)
