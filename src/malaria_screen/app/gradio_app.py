"""Offline web app (Gradio): upload cell images, see label, p_parasitized and a Grad-CAM overlay.

The page is served entirely from this machine: Gradio's own bundled scripts and fonts
(``LocalFont``), analytics off (``GRADIO_ANALYTICS_ENABLED=False``, ``analytics_enabled=False``),
no server-side rendering, no share link. A browser test checks that the page requests nothing
off-host.

The app opens on the "Whole field" tab (:mod:`malaria_screen.smear`, when installed): several
fields of one slide give the slide's parasitemia with its 95 % interval, the self-check's flags
(fields that are not blood smears, fields outside the model's domain, left out of the total) and a
gallery of the cells to confirm by eye; the bundled example fields are shown as thumbnails.

The "Labelling" tab (issue 20) adapts the model to a site: add unlabelled fields, label the
cells the model is least sure of (active learning) with one click or key each (``p`` / ``u`` /
``n``, ``z`` = undo), export the labels CSV, and fit a site model on them
(:mod:`malaria_screen.smear.labelling` holds the session's state, :func:`malaria_screen.smear.adapt.adapt`
fits), shown before/after on the labelled cells (in-sample) and as each field's parasitemia.

One predictor is built at start-up and shared by all sessions. With the PyTorch back-end each
result shows the cell beside its Grad-CAM overlay (:func:`malaria_screen.inference.gradcam.explain`);
with an ONNX model (no gradients) the cell alone.

Limits (issue 23), the same as the REST API's (:class:`AppLimits`): uploads of at most
``max_file_bytes`` each (Gradio's ``max_file_size``: larger files are refused before they are
stored); at most 25 Mpx per image, checked from the header before decoding, and 50 Mpx per
request in all, and ``max_request_cpu_s`` CPU seconds per click (20, checked before each image
or field: the rest are listed as not processed); the whole-field tab receives the file, not a
decoded array, so its pixels are decoded within the same limit; a bounded queue (``max_queue`` waiting events, then Gradio's
"queue full") with ``cell_concurrency`` / ``field_concurrency`` events at once; uploaded files
and result CSVs are deleted ``cache_ttl_s`` after they were made (Gradio's ``delete_cache``),
and a session's folder when its tab closes or, for API clients that never close one, after
``session_ttl_s`` without a write (:func:`sweep_sessions`).

Access (:class:`AppAccess`, as the REST API's): optional login keys (Gradio's ``auth``: every
page, upload, file and API route answers 401 until the login), a ``Host`` allow-list (400 for
other names, against DNS rebinding), and a refusal to listen beyond this machine without a login
unless anonymous use is asked for (:func:`check_exposure`).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import asyncio  # noqa: E402
import atexit  # noqa: E402
import dataclasses  # noqa: E402
import hmac  # noqa: E402
import ipaddress  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402

from malaria_screen.data.io import ImageDecodeError, check_colour, decode_image, is_image_entry  # noqa: E402
from malaria_screen.data.parallel import decode_cell  # noqa: E402
from malaria_screen.data.preprocess import letterbox  # noqa: E402
from malaria_screen.errors import error_text  # noqa: E402
from malaria_screen.fileio import atomic_write_text, rows_to_csv  # noqa: E402

__all__ = ["APP_KEYS_ENV", "AnonymousExposureError", "AppAccess", "AppLimits", "build_app", "check_exposure",
           "classify_files", "example_fields", "is_loopback", "launch", "sample_files", "screen_field_image",
           "screen_slide_files", "sweep_sessions"]

#: Environment variable holding the app's login keys, comma-separated (``app --key-file`` adds a
#: file's; read by the CLI with :func:`malaria_screen.serve.load_api_keys`, the REST API's reader).
APP_KEYS_ENV = "MALARIA_SCREEN_APP_KEYS"

log = logging.getLogger(__name__)

_TITLE = "malaria-screen: thin-smear red blood cell classifier"
_DISCLAIMER = ("Upload Giemsa-stained thin-smear **single-cell** images (PNG, JPEG, WebP, TIFF...). Each is classified "
               "Parasitized / Uninfected with p(parasitized); the heat map (Grad-CAM, Selvaraju et al. 2017) shows where "
               "the model found its evidence. *Research use only; not a medical device.*")
_CSV_COLUMNS = ["file", "label", "p_parasitized", "error"]
_TILE_PX = 160


@dataclass(frozen=True)
class AppLimits:
    """Limits of the web app, the same as the REST API's defaults.

    Attributes
    ----------
    max_file_bytes : int, default=8 MiB
        Largest upload, bytes (Gradio refuses larger files before storing them).
    max_pixels : int, default=25,000,000
        Largest image, width x height (cells and fields), checked from the header.
    max_request_pixels : int, default=50,000,000
        Pixels decoded for one click, all images together; later images get an error unread.
    max_files : int, default=256
        Files classified per click; more get an error.
    max_request_cpu_s : float, default=20.0
        CPU seconds of one click (the handler's thread, as the REST API's ``/v1/classify``
        measures it), checked before each image or field: once spent, the rest get "not
        processed: this click's CPU budget ... is spent" unread. One image can overrun it by its
        own cost, which ``max_pixels`` and the not-a-smear check (before segmentation) bound.
    cell_concurrency, field_concurrency : int, default=2, 1
        Events of each tab run at once; the others wait in the queue.
    max_queue : int, default=16
        Events that may wait; more are refused ("queue full").
    cache_ttl_s : int, default=900
        Uploads and result files are deleted this long after they were made (checked as often).
    session_ttl_s : int, default=14400
        A session's own folder (its result CSVs, a labelling session's fields and site model) is
        deleted when its tab closes, and, since a client of the app's API never closes one, by
        any later click of any session once nothing in it was written for this long.
    max_label_fields : int, default=20
        Fields one labelling session holds (the "Labelling" tab).
    label_batch : int, default=12
        Cells shown per labelling batch.

    Raises
    ------
    ValueError
        If a limit is < 1 (``max_request_cpu_s``: not > 0).
    """

    max_file_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_request_pixels: int = 50_000_000
    max_files: int = 256
    max_request_cpu_s: float = 20.0
    cell_concurrency: int = 2
    field_concurrency: int = 1
    max_queue: int = 16
    cache_ttl_s: int = 900
    session_ttl_s: int = 14_400
    max_label_fields: int = 20
    label_batch: int = 12

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "float":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                    raise ValueError(f"{f.name} must be a positive number, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f.name} must be an int >= 1, got {v!r}")


class AnonymousExposureError(ValueError):
    """The app was asked to listen beyond this machine with no login and no ``allow_anonymous``."""


@dataclass(frozen=True)
class AppAccess:
    """Who may use the web app, and by which names it may be reached.

    Attributes
    ----------
    keys : tuple of str, default=()
        Login keys: the login form's password must be one of them (compared in constant time,
        :func:`hmac.compare_digest`, against every key); the user name is free and only logged.
        Empty: no login. Read from a file or ``$MALARIA_SCREEN_APP_KEYS`` by the CLI, never
        given on the command line.
    allowed_hosts : tuple of str, default=("127.0.0.1", "localhost", "::1", "[::1]")
        ``Host`` header values accepted (Starlette's ``TrustedHostMiddleware``, as the REST API;
        ``*.example.org`` wildcards); others get 400, which defeats DNS rebinding. ``("*",)``:
        any. :func:`launch` adds the address it binds when that is a concrete one.
    allow_anonymous : bool, default=False
        Allow listening on a non-loopback address without keys (:func:`check_exposure`).
    login_delay_s : float, default=1.0
        Seconds a failed login waits before its answer (awaited, so no thread is held), which
        slows guessing.

    Raises
    ------
    ValueError
        For an empty or blank key, no allowed host, or a negative delay.
    """

    keys: tuple[str, ...] = field(default=(), repr=False)
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    allow_anonymous: bool = False
    login_delay_s: float = 1.0

    def __post_init__(self) -> None:
        if any(not k or k.strip() != k for k in self.keys):
            raise ValueError("login keys must be non-empty and have no surrounding whitespace")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be answered (use ('*',) for any host)")
        if self.login_delay_s < 0:
            raise ValueError(f"login_delay_s must be >= 0, got {self.login_delay_s}")

    def check(self, password: str) -> bool:
        """Whether ``password`` is one of the keys; every key is compared (no early exit)."""
        given = password.encode()
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(given, k.encode())
        return ok


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost`` or a loopback address)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, access: AppAccess) -> None:
    """Refuse to serve beyond this machine without a login, unless anonymous use is asked for.

    Raises
    ------
    AnonymousExposureError
        If ``host`` is not loopback, ``access.keys`` is empty and ``access.allow_anonymous`` is False.
    """
    if not is_loopback(host) and not access.keys and not access.allow_anonymous:
        raise AnonymousExposureError(
            f"refusing to serve the web app on {host} without a login: anyone who reaches it could use it. Give "
            f"login keys (--key-file, or ${APP_KEYS_ENV}), or --allow-anonymous if a proxy in front authenticates "
            "(docs/deployment-security.md)")


def sample_files() -> list[str]:
    """Bundled example cells (``malaria_screen/assets/samples/<Class>/*.png``), sorted; [] if absent."""
    root = Path(str(resources.files("malaria_screen") / "assets" / "samples"))
    return sorted(str(p) for p in root.glob("*/*.png")) if root.is_dir() else []


def example_fields() -> list[str]:
    """Bundled, redistributable example fields (``malaria_screen/assets/demo_field/*``: Chula-RBC-12,
    MIT licence), sorted; [] if absent."""
    root = Path(str(resources.files("malaria_screen") / "assets" / "demo_field"))
    return sorted(str(p) for p in root.iterdir() if p.is_file() and is_image_entry(p.name)) if root.is_dir() else []


def _over_budget(cpu_s: float) -> str:
    """The message of a file or field left unread because the click's CPU budget is spent."""
    return f"not processed: this click's CPU budget ({cpu_s:g} s) is spent; send it in a later click"


def _tile(rgb: np.ndarray, overlay: np.ndarray | None) -> np.ndarray:
    """Cell (and overlay) side by side, each letterboxed to ``_TILE_PX`` px for display."""
    parts = [letterbox(rgb, _TILE_PX)] + ([letterbox(overlay, _TILE_PX)] if overlay is not None else [])
    return np.concatenate(parts, axis=1)


def classify_files(predictor, paths: Sequence[str], *, out_dir: str | Path, explain: bool = True, max_files: int = 256,
                   max_pixels: int = 25_000_000, max_request_pixels: int = 50_000_000, max_request_cpu_s: float = 20.0):
    """Classify uploaded files and build what the page shows; the app's one handler.

    Parameters
    ----------
    predictor : CellClassifierBase
    paths : sequence of str
        Uploaded files (Gradio's temporary copies).
    out_dir : path
        Folder for the results CSV (written atomically).
    explain : bool, default=True
        Grad-CAM overlays (PyTorch back-end only; ignored otherwise).
    max_files : int, default=256
        Files beyond this are reported as errors, not processed.
    max_pixels : int, default=25,000,000
        Largest image (width x height), checked from the header before decoding.
    max_request_pixels : int, default=50,000,000
        Pixels decoded in all; files after the budget is spent get an error unread.
    max_request_cpu_s : float, default=20.0
        CPU seconds of this call (its thread, :func:`time.thread_time`), checked before each file;
        files after it is spent get an error unread.

    Returns
    -------
    summary : str
        Markdown: n cells, n Parasitized, n failed.
    gallery : list of (ndarray, str)
        ``(H, W, 3) uint8`` tile (cell | overlay) and its caption, per classified file.
    rows : list of list
        Table rows ``[file, label, p_parasitized, error]``.
    csv_path : str or None
        The CSV with the same rows.
    """
    from malaria_screen.inference.gradcam import explain as run_explain

    paths = [str(p) for p in (paths or [])]
    can_explain = explain and hasattr(predictor, "net") and hasattr(getattr(predictor, "net"), "forward_features")
    rows, gallery = [], []
    pos = None if predictor.positive_index is None else predictor.class_names[predictor.positive_index]
    spent = {"px": 0}
    t_cpu = time.thread_time()

    def on_size(w: int, h: int) -> None:
        spent["px"] += w * h
        if spent["px"] > max_request_pixels:
            raise ImageDecodeError(f"not decoded: this upload's pixel budget ({max_request_pixels:,} px in all images) is spent")

    for i, p in enumerate(paths):
        name = Path(p).name
        row = {"file": name, "label": None, "p_parasitized": None, "error": None}
        rows.append(row)
        if i >= max_files:
            row["error"] = f"not processed: more than {max_files} files in one upload"
            continue
        if time.thread_time() - t_cpu > max_request_cpu_s:
            row["error"] = _over_budget(max_request_cpu_s)
            continue
        try:
            rgb = decode_cell(p, max_pixels=max_pixels, on_size=on_size)
            if can_explain:
                (ex,) = run_explain(predictor, [rgb])
                label, pp, ov = ex.label, ex.p_parasitized, ex.overlay
            else:
                (res,) = predictor.classify_prepared([name], [(letterbox(rgb, predictor.input_size), None)])
                if res.error:
                    raise RuntimeError(res.error)
                label, pp, ov = res.label, res.p_parasitized, None
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
            row["error"] = error_text(exc, plain=ImageDecodeError)
            continue
        row.update(label=label, p_parasitized=None if pp is None else round(pp, 4))
        gallery.append((_tile(rgb, ov), f"{name}: {label}" + ("" if pp is None else f" (p={pp:.3f})")))
    n_ok = sum(1 for r in rows if r["error"] is None)
    n_pos = sum(1 for r in rows if pos is not None and r["label"] == pos)
    n_bad = len(rows) - n_ok
    summary = (f"**{n_ok} cells classified: {n_pos} {pos or 'positive'}, {n_ok - n_pos} other**"
               + (f"; {n_bad} file(s) failed" if n_bad else "")) if rows else "No files uploaded."
    if rows and not can_explain and explain:
        summary += "\n\n(Grad-CAM overlays need the PyTorch model; this app runs an ONNX model.)"
    csv_path = None
    if rows:
        csv_path = str(atomic_write_text(Path(out_dir) / "malaria_screen_results.csv", rows_to_csv(rows, _CSV_COLUMNS)))
    table = [[r["file"], r["label"], r["p_parasitized"], r["error"]] for r in rows]
    return summary, gallery, table, csv_path


def screen_field_image(predictor, rgb, *, name: str = "field", rescorer=None, max_pixels: int = 25_000_000):
    """Screen one whole thin-smear field for the app (issue 5).

    Parameters
    ----------
    predictor : CellClassifierBase
    rgb : path, bytes or (H, W, 3) ndarray of uint8, or None
        The field: the uploaded file (decoded here, within ``max_pixels``) or an array.
    rescorer : CellRescorer, optional
        Second stage (:func:`malaria_screen.smear.screen.screen_field`).
    max_pixels : int, default=25,000,000
        Largest field (width x height), checked from the file's header before decoding.

    Returns
    -------
    summary : str
        Markdown: red cells, infected cells, parasitemia (percent) and its 95 % interval.
    overlay : (H, W, 3) ndarray of uint8 or None
        Cell outlines (red = Parasitized, green = Uninfected) from
        :func:`malaria_screen.smear.report.overlay_image`.
    """
    from malaria_screen.smear.report import overlay_image
    from malaria_screen.smear.screen import screen_field

    if rgb is None:
        return "No field uploaded.", None
    try:
        if isinstance(rgb, (str, os.PathLike)) and name == "field":
            name = Path(rgb).name
        rgb = check_colour(decode_image(rgb, max_pixels=max_pixels))
        res = screen_field(rgb, predictor, image_name=name, rescorer=rescorer)
    except (OSError, ValueError) as exc:  # bad input (undecodable, too small, too large): the user's, not ours
        log.warning("field screening refused: %s", exc)
        return f"Could not screen this image: {error_text(exc)}", None
    except Exception as exc:  # noqa: BLE001 - shown to the user, not raised; a bug, so logged in full
        log.exception("field screening failed")
        return f"Could not screen this image: {error_text(exc)}", None
    if res.parasitemia is None:
        summary = f"**No red cells found** ({res.width}x{res.height} px)."
    else:
        lo, hi = res.parasitemia_ci95
        summary = (f"**{res.n_rbc} red cells, {res.n_infected} Parasitized: parasitemia {100 * res.parasitemia:.2f} % "
                   f"(95 % CI {100 * lo:.2f} to {100 * hi:.2f} %; {res.parasitemia_method})**; {res.n_wbc} white cells excluded.")
    return summary, overlay_image(rgb, res)


def screen_slide_files(predictor, paths: Sequence[str] | None, *, rescorer=None, domain_reference=None,
                       include_out_of_domain: bool = False, max_pixels: int = 25_000_000,
                       max_request_pixels: int = 50_000_000, max_files: int = 256, max_request_cpu_s: float = 20.0):
    """Screen several fields of one slide for the app's whole-field tab.

    Each file is decoded within ``max_pixels`` (checked from its header) and refused when
    grayscale; once ``max_request_pixels`` are decoded, or after ``max_files`` files, the rest get
    an error unread. A field that is not a blood smear, or cannot be screened, is listed with its
    reason and the others go on (:func:`malaria_screen.smear.slide.screen_slide`).

    Parameters
    ----------
    predictor : CellClassifierBase
    paths : sequence of str or None
        Field image files.
    rescorer : CellRescorer, optional
    domain_reference : DomainReference, optional
        The model's self-check reference (:func:`malaria_screen.smear.domain.load_reference`).
    include_out_of_domain : bool
        Count fields outside the model's domain in the slide total.
    max_pixels, max_request_pixels, max_files : int
        Limits (:class:`AppLimits`).
    max_request_cpu_s : float, default=20.0
        CPU seconds of this call (its thread), checked before each field is decoded (each is
        screened before the next is decoded); the fields after it is spent are listed as not
        processed.

    Returns
    -------
    summary : str
        Markdown: the slide's parasitemia and 95 % interval, the flags (fields outside the
        domain, with what to do; fields refused, with the reason).
    overlays : list of (ndarray, str)
        Per screened field its outlined overlay and a caption.
    table : list of list
        ``[field, red cells, Parasitized, parasitemia %, in domain, domain score, note]`` per field.
    cells : list of (ndarray, str)
        The gallery: cells called Parasitized, then the least certain ones, with captions.
    """
    from malaria_screen.smear.report import overlay_image
    from malaria_screen.smear.slide import screen_slide

    paths = [str(p) if isinstance(p, (str, os.PathLike)) else getattr(p, "name", str(p)) for p in (paths or [])]
    if not paths:
        return "No field uploaded.", [], [], []
    decoded, refused = [], []
    t_cpu = time.thread_time()

    def fields():
        """Each field decoded when ``screen_slide`` takes it (it screens one before taking the
        next, in this thread), so the CPU budget is checked between screened fields."""
        spent, names = 0, set()
        for i, p in enumerate(paths):
            name = Path(p).name
            k = 2
            while name in names:  # two uploads of one name (other folders): each keeps its own overlay and row
                name = f"{Path(p).stem} ({k}){Path(p).suffix}"
                k += 1
            names.add(name)
            if i >= max_files or spent > max_request_pixels:
                refused.append((name, f"not read: over the limit of {max_files} files or "
                                      f"{max_request_pixels:,} pixels per click"))
                continue
            if decoded and time.thread_time() - t_cpu > max_request_cpu_s:  # the first field is always screened
                refused.append((name, _over_budget(max_request_cpu_s)))
                continue
            try:
                rgb = check_colour(decode_image(p, max_pixels=max_pixels))
            except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
                refused.append((name, str(exc)))
                continue
            spent += rgb.shape[0] * rgb.shape[1]
            decoded.append((name, rgb))
            yield name, rgb

    slide = screen_slide(fields(), predictor, rescorer=rescorer, domain_reference=domain_reference,
                         include_out_of_domain=include_out_of_domain)
    refused += slide.errors
    rgb_of = dict(decoded)
    overlays = [(overlay_image(rgb_of[r.image], r), f"{r.image}: {r.n_infected}/{r.n_rbc}"
                 + (" (outside the model's domain)" if r.in_domain is False else "")) for r in slide.fields]
    table = [[r.image, r.n_rbc, r.n_infected, None if r.parasitemia is None else round(100 * r.parasitemia, 2),
              r.in_domain, None if r.domain_score is None else round(r.domain_score, 2), ""] for r in slide.fields]
    table += [[name, None, None, None, None, None, reason] for name, reason in refused]
    if slide.parasitemia is None:
        head = f"**No parasitemia**: no red cells counted in {len(slide.fields)} screened field(s)."
    else:
        lo, hi = slide.parasitemia_ci95
        n_counted = len(slide.fields) - (0 if slide.included_out_of_domain else len(slide.out_of_domain))
        head = (f"**Slide parasitemia {100 * slide.parasitemia:.2f} % (95 % CI {100 * lo:.2f} to {100 * hi:.2f} %)**: "
                f"{slide.n_infected} Parasitized of {slide.n_rbc} red cells in {n_counted} field(s).")
    lines = [head] + [f"⚠️ {w}" for w in slide.warnings]
    lines += [f"⛔ **{name}**: {reason}" for name, reason in refused]
    pos, unc, n_pos = slide.gallery
    if predictor is not None:
        lines.append(f"Gallery: {len(pos)} of {n_pos} cell(s) called Parasitized, then {len(unc)} least certain: "
                     "confirm them by eye. *Research use only; not a medical device.*")
    cells = [(c.thumb, f"{c.caption()} (Parasitized)") for c in pos] + [(c.thumb, f"{c.caption()} (uncertain)") for c in unc]
    return "\n\n".join(lines), overlays, table, cells


def _special(fn, **types):
    """Give ``fn`` the annotations Gradio injects by (``gr.Request``, ``gr.SelectData``): this
    module postpones annotations, and Gradio cannot resolve ``gr`` (imported in the function)
    from the strings, so it would pass None."""
    fn.__annotations__.update(types)
    return fn


def _smear_available() -> bool:
    try:
        import malaria_screen.smear.report  # noqa: F401
        import malaria_screen.smear.screen  # noqa: F401
    except ImportError:
        return False
    return True


def sweep_sessions(work: Path, ttl_s: float, *, keep: str | None = None) -> list[str]:
    """Delete the session folders under ``work`` in which nothing was written for ``ttl_s`` seconds.

    A browser tab's folder goes when the tab closes (Gradio's ``unload``), but a client of the
    app's HTTP API never closes one, so without this its result CSVs and labelling fields would
    stay until the app stops. A folder's age is that of the newest file or folder in it (a
    session holds at most a few dozen files); ``keep`` (the calling session) is never deleted.

    Parameters
    ----------
    work : Path
        The app's work folder (one sub-folder per session).
    ttl_s : float
        Seconds without a write after which a session's folder is deleted.
    keep : str, optional
        A session folder's name to leave alone.

    Returns
    -------
    list of str
        The names deleted.
    """
    now, gone = time.time(), []
    try:
        entries = list(os.scandir(work))
    except OSError:
        return gone
    for entry in entries:
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        newest = 0.0
        for root, _dirs, files in os.walk(entry.path):
            for name in (root, *(os.path.join(root, f) for f in files)):
                try:
                    newest = max(newest, os.lstat(name).st_mtime)
                except OSError:
                    pass
        if now - newest > ttl_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            gone.append(entry.name)
    return gone


def build_app(predictor, *, examples: Sequence[str] | None = None, work_dir: str | Path | None = None, rescorer=None,
              limits: AppLimits | None = None):
    """Build the Gradio app around one predictor.

    Parameters
    ----------
    predictor : CellClassifierBase
        Built once; shared by all sessions.
    examples : sequence of str, optional
        Example image paths; default :func:`sample_files`.
    work_dir : path, optional
        Folder of the sessions' files (result CSVs, labelled fields); default a new temporary
        folder, deleted when the process exits.
    rescorer : CellRescorer, optional
        Second stage for the "Whole field" tab (fitted with this cell model).
    limits : AppLimits, optional
        Default :class:`AppLimits()`.

    Returns
    -------
    gradio.Blocks
        Launch with :func:`launch` (which sets the offline options and ``max_file_size``).
    """
    import gradio as gr

    limits = limits or AppLimits()

    examples = list(sample_files() if examples is None else examples)
    if work_dir is not None:
        work = Path(work_dir)
    else:  # our own temporary folder: gone when the process ends normally
        work = Path(tempfile.mkdtemp(prefix="malaria-screen-app-"))
        atexit.register(shutil.rmtree, work, True)
    metrics = predictor.metrics or {}
    model_line = f"Model: `{Path(predictor.source).name if predictor.source else '?'}` ({getattr(predictor, 'backend', '?')})"
    model_line += (f"; limits: {limits.max_file_bytes / 2**20:g} MiB and {limits.max_pixels / 1e6:g} Mpx per image, "
                   f"{limits.max_files} files, {limits.max_request_pixels / 1e6:g} Mpx and "
                   f"{limits.max_request_cpu_s:g} CPU s per click")
    if "accuracy" in metrics and "roc_auc" in metrics:
        model_line += f"; test patients: accuracy {metrics['accuracy']:.3f}, ROC-AUC {metrics['roc_auc']:.3f}"
    if rescorer is not None:
        model_line += (f"; whole fields rescored by `{Path(rescorer.source).name if rescorer.source else 'rescorer'}` "
                       f"(fitted on {rescorer.config.n_fields} annotated fields)")

    def run(files, request: gr.Request | None = None):
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        sess = work / (getattr(request, "session_hash", None) or "session")
        sweep_sessions(work, limits.session_ttl_s, keep=sess.name)
        summary, gallery, table, csv_path = classify_files(predictor, paths, out_dir=sess, max_files=limits.max_files,
                                                           max_pixels=limits.max_pixels,
                                                           max_request_pixels=limits.max_request_pixels,
                                                           max_request_cpu_s=limits.max_request_cpu_s)
        return summary, gallery, table, csv_path

    def forget(request: gr.Request | None = None):
        """A closed tab: delete its session's result folder."""
        h = getattr(request, "session_hash", None)
        if h and "/" not in h and h not in (".", ".."):
            shutil.rmtree(work / h, ignore_errors=True)

    with gr.Blocks(title="malaria-screen", analytics_enabled=False,
                   delete_cache=(limits.cache_ttl_s, limits.cache_ttl_s)) as demo:
        gr.Markdown(f"# {_TITLE}\n{_DISCLAIMER}\n\n{model_line}")
        with gr.Tabs(selected="field" if _smear_available() else "cells"):
            if _smear_available():
                _field_tab(gr, predictor, rescorer, limits)
            with gr.Tab("Cells", id="cells"), gr.Row():
                with gr.Column(scale=1):
                    files = gr.File(label="Cell images", file_count="multiple", file_types=["image"], elem_id="cell-files")
                    btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
                    if examples:
                        gr.Examples(examples=[[[p]] for p in examples[:8]] + [[examples]], inputs=[files],
                                    label="Examples (bundled NIH cells; last row: all)", examples_per_page=9)
                with gr.Column(scale=2):
                    summary = gr.Markdown(elem_id="summary")
                    gallery = gr.Gallery(label="Cell | Grad-CAM", columns=4, height="auto", elem_id="gallery")
                    table = gr.Dataframe(headers=_CSV_COLUMNS, label="Results", elem_id="results", interactive=False)
                    csv_file = gr.File(label="Results (CSV)", elem_id="csv")
            if _smear_available():
                _label_tab(gr, predictor, limits, work)
        outs = [summary, gallery, table, csv_file]
        _special(run, request=gr.Request)
        btn.click(run, inputs=[files], outputs=outs, concurrency_limit=limits.cell_concurrency, concurrency_id="cells",
                  api_name="classify")
        files.upload(run, inputs=[files], outputs=outs, concurrency_limit=limits.cell_concurrency, concurrency_id="cells")
        demo.unload(_special(forget, request=gr.Request))
        demo.load(None, js=_KEYS_JS)  # the labelling tab's keyboard shortcuts, in the browser
    demo.queue(max_size=limits.max_queue)
    demo.app_limits = limits
    return demo


_FIELD_COLUMNS = ["field", "red cells", "Parasitized", "parasitemia %", "in domain", "domain score", "note"]


def _field_tab(gr, predictor, rescorer, limits: AppLimits) -> None:
    """The "Whole field" tab (opened first): several fields of one slide -> the slide's
    parasitemia, the self-check's flags, per-field overlays and the gallery of cells to confirm."""
    from malaria_screen.smear.domain import load_reference

    reference = load_reference(predictor)
    fields = example_fields()
    with gr.Tab("Whole field", id="field"), gr.Row():
        with gr.Column(scale=1):
            # files, not decoded arrays: decoded in screen_slide_files within the limits
            field_in = gr.File(label="Field images of one slide", file_count="multiple", file_types=["image"],
                               elem_id="field-in")
            include = gr.Checkbox(False, label="Count fields outside the model's domain in the slide total",
                                  elem_id="field-include")
            field_btn = gr.Button("Screen fields", variant="primary", elem_id="field-btn")
            if fields:
                ex = gr.Gallery(value=[(p, Path(p).name) for p in fields], label="Example fields (click one to screen it)",
                                columns=3, height="auto", allow_preview=False, elem_id="field-examples")
        with gr.Column(scale=2):
            field_summary = gr.Markdown(elem_id="field-summary")
            cells = gr.Gallery(label="Cells to confirm: called Parasitized, then the least certain", columns=6,
                               height="auto", elem_id="field-cells")
            field_table = gr.Dataframe(headers=_FIELD_COLUMNS, label="Fields", interactive=False, elem_id="field-table")
            field_out = gr.Gallery(label="Fields: red = Parasitized, green = Uninfected", columns=2, height="auto",
                                   elem_id="field-out")

    def run(paths, include_ood):
        summary, overlays, table, gal = screen_slide_files(
            predictor, paths, rescorer=rescorer, domain_reference=reference, include_out_of_domain=include_ood,
            max_pixels=limits.max_pixels, max_request_pixels=limits.max_request_pixels, max_files=limits.max_files,
            max_request_cpu_s=limits.max_request_cpu_s)
        return summary, gal, table, overlays

    outs = [field_summary, cells, field_table, field_out]
    field_btn.click(run, inputs=[field_in, include], outputs=outs, concurrency_limit=limits.field_concurrency,
                    concurrency_id="field", api_name="screen_fields")
    if fields:
        def pick(include_ood, evt):
            path = fields[evt.index]
            return ([path], *run([path], include_ood))

        pick.__annotations__["evt"] = gr.SelectData  # Gradio injects the event by this type (no postponed string)
        ex.select(pick, inputs=[include], outputs=[field_in, *outs], concurrency_limit=limits.field_concurrency,
                  concurrency_id="field")


# -- the "Labelling" tab (issue 20): active learning, labels, export, adapt ---------------------

_LABEL_BUTTONS = (("Parasitized", "p", "label-par"), ("Uninfected", "u", "label-uninf"), ("not a cell", "n", "label-nocell"))
#: Keyboard shortcuts of the labelling tab (p / u / n label the current cell, z undoes), run in the
#: browser: a key press clicks the tab's button when the tab is shown and no text field has focus.
_KEYS_JS = """() => {
  if (window.__malariaScreenKeys) return;
  window.__malariaScreenKeys = true;
  const ids = {p: "label-par", u: "label-uninf", n: "label-nocell", z: "label-undo"};
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target, tag = ((t && t.tagName) || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" || (t && t.isContentEditable)) return;
    const id = ids[(e.key || "").toLowerCase()];
    const b = id && document.getElementById(id);
    if (!b || b.offsetParent === null || b.disabled) return;
    e.preventDefault();
    b.click();
  });
}"""
_LABEL_TABLE = ["#", "field", "x", "y", "w", "h", "label", "p (model)"]
_COMPARE_TABLE = ["field", "cells", "labelled", "parasitemia % before", "parasitemia % after"]
_LABEL_HELP = ("Add unlabelled fields of your own microscope (or an example field). The model screens them and "
               "offers, batch by batch, the cells it is least sure of (uncertainty sampling, with a quarter drawn at "
               "random). Label each: **Parasitized** (`p`), **Uninfected** (`u`) or **not a cell** (`n`: debris, a "
               "white cell, a platelet, two cells in one box); `z` undoes. Export the labels CSV for "
               "`malaria-screen adapt`, or fit a site model here. *Research use only; not a medical device.*")


def _label_status(sess) -> str:
    if sess is None or not sess.fields:
        return "No fields yet: add field images to start."
    c = sess.counts
    return (f"**{len(sess.fields)} field(s), {sess.n_cells} cells; {sess.n_labelled} labelled: "
            f"{c['Parasitized']} Parasitized, {c['Uninfected']} Uninfected, {c['not a cell']} not a cell.** "
            "Keys: `p` / `u` / `n`, `z` = undo.")


def _label_view(sess, note: str = ""):
    """``(current tile, caption, status, batch gallery, labels table)`` of a labelling session."""
    status = _label_status(sess) + (f"\n\n{note}" if note else "")
    if sess is None:
        return None, "", status, [], []
    cur = sess.current
    batch = sess.batch
    gallery = [(c.tile, f"{k + 1}: {sess.label_of(c.index) or '?'}") for k, c in enumerate(batch)]
    rows = [[k + 1, Path(c.field).name, *(round(v) for v in c.bbox), c.label, round(p, 3)]
            for k, (_, c, p) in enumerate(sess.labelled())][-50:][::-1]
    if cur is None:
        caption = "Every cell is labelled." if sess.fields else ""
        return None, caption, status, gallery, rows
    pos = next(k for k, c in enumerate(batch) if c.index == cur.index)
    x, y, w, h = (round(v) for v in cur.bbox)
    by = "the site model" if sess.fit is not None else "the prior-corrected call (2 % prevalence)"
    was = sess.label_of(cur.index)
    caption = (f"**Cell {pos + 1} of {len(batch)}** in this batch: `{cur.field}`, box ({x}, {y}) {w}x{h} px. "
               f"Model P(Parasitized) {cur.p:.3f}; ranked by {by}: {cur.p_current:.3f} (threshold {cur.threshold:.3f})"
               + (f". Labelled **{was}**: label again to change it." if was else "."))
    return cur.tile, caption, status, gallery, rows


def _rate(m: dict, key: str, num: str, den: str) -> str:
    return "n/a" if m[key] is None else f"{m[key]:.2f} ({m[num]}/{m[den]})"


def _comparison_md(res, cmp, model_name: str) -> str:
    """Markdown of an adapt's before/after (:class:`~malaria_screen.smear.labelling.Comparison`)."""
    b, a = cmp.before, cmp.after
    site = res.site
    prev = b["n_parasitized"] / b["n"] if b["n"] else 0.0
    lines = [
        f"**Site model fitted ({cmp.method}) on {b['n']} labelled cells** ({site.n_parasitized} Parasitized, "
        f"{site.n_uninfected} Uninfected, {site.n_not_a_cell} not a cell) from {site.n_fields} field(s). "
        "Download it below and use it with `--model` (`smear`, `predict`, `serve`, `app`).",
        "",
        f"| on the labelled cells | before: `{model_name}` as screened today | after: site model |",
        "|---|---|---|",
        f"| sensitivity | {_rate(b, 'sensitivity', 'tp', 'n_parasitized')} | {_rate(a, 'sensitivity', 'tp', 'n_parasitized')} |",
        f"| PPV | {_rate(b, 'ppv', 'tp', 'called')} | {_rate(a, 'ppv', 'tp', 'called')} |",
        f"| specificity | {_rate(b, 'specificity', 'tn', 'n_negative')} | {_rate(a, 'specificity', 'tn', 'n_negative')} |",
        f"| called Parasitized (labelled {b['n_parasitized']}) | {b['called']} | {a['called']} |",
        "",
        f"Trivial baseline, calling every labelled cell Parasitized: sensitivity 1.00, PPV {prev:.2f} "
        "(the labelled cells' prevalence).",
        "",
        "⚠️ **\"After\" is in-sample**: measured on the cells the site model was fitted on, it shows the fit, not "
        "how the site model does on new fields; held-out figures come from the learning-curve benchmark "
        "(`benchmarks/bench_learning_curve.py`). The cells offered for labelling are the ones the model is least "
        "sure of, not a field's usual mix. Parasitemia below counts every segmented cell of each field.",
    ]
    if res.report.get("skipped_rows"):
        lines.append(f"{len(res.report['skipped_rows'])} label(s) left out: " + "; ".join(res.report["skipped_rows"][:5]))
    return "\n".join(lines)


def _label_tab(gr, predictor, limits: AppLimits, work: Path) -> None:
    """The "Labelling" tab: add fields, label the cells offered (active learning), export, adapt.

    The state of each browser session is a :class:`~malaria_screen.smear.labelling.LabellingSession`;
    its fields (copied, so that Gradio's cache expiry does not remove them mid-session), labels CSV
    and site folder live in ``work/<session>/labelling/`` and go when the tab closes."""
    from malaria_screen.smear.labelling import LabellingSession, adaptable_model

    cell_model, run_dir = adaptable_model(predictor)
    model_name = Path(str(getattr(cell_model, "source", None) or "model")).name
    fields = example_fields()

    def folder(request) -> Path:
        h = getattr(request, "session_hash", None) or "session"
        sweep_sessions(work, limits.session_ttl_s, keep=h)
        return work / h / "labelling"

    with gr.Tab("Labelling", id="label"), gr.Row():
        with gr.Column(scale=1):
            gr.Markdown(_LABEL_HELP)
            label_in = gr.File(label="Unlabelled field images", file_count="multiple", file_types=["image"],
                               elem_id="label-in")
            add_btn = gr.Button("Add fields and screen them", variant="primary", elem_id="label-add")
            if fields:
                ex = gr.Gallery(value=[(p, Path(p).name) for p in fields], label="Example fields (click one to add it)",
                                columns=3, height="auto", allow_preview=False, elem_id="label-examples")
            export_btn = gr.Button("Export labels (CSV)", elem_id="label-export")
            csv_out = gr.File(label="Labels CSV (field,x,y,w,h,label)", elem_id="label-csv")
            adapt_btn = gr.Button("Fit a site model on these labels (adapt)", elem_id="label-adapt")
            site_out = gr.File(label="Site model folder (zip)", elem_id="label-site")
        with gr.Column(scale=2):
            status = gr.Markdown(_label_status(None), elem_id="label-status")
            with gr.Row():
                cell = gr.Image(label="Cell to label (box outlined)", format="png", height=320, interactive=False,
                                elem_id="label-cell")
                with gr.Column():
                    caption = gr.Markdown(elem_id="label-caption")
                    btns = {lab: gr.Button(f"{lab} ({key})", elem_id=eid) for lab, key, eid in _LABEL_BUTTONS}
                    undo_btn = gr.Button("Undo (z)", elem_id="label-undo")
                    next_btn = gr.Button("Next batch", elem_id="label-next")
            batch = gr.Gallery(label="This batch (click a cell to label or relabel it)", columns=6, height="auto",
                               allow_preview=False, elem_id="label-batch")
            result = gr.Markdown(elem_id="label-result")
            compare = gr.Dataframe(headers=_COMPARE_TABLE, label="Fields: parasitemia before / after", interactive=False,
                                   elem_id="label-compare")
            table = gr.Dataframe(headers=_LABEL_TABLE, label="Labels (latest first)", interactive=False,
                                 elem_id="label-table")
    state = gr.State(None)
    view = [cell, caption, status, batch, table]

    def add(paths, sess, request: gr.Request | None = None):
        paths = [str(p) if isinstance(p, (str, os.PathLike)) else getattr(p, "name", str(p)) for p in (paths or [])]
        if not paths:
            return sess, *_label_view(sess, "No field given.")
        if sess is None:
            sess = LabellingSession(cell_model, max_fields=limits.max_label_fields, batch_size=limits.label_batch)
        dest_dir = folder(request) / "fields"
        dest_dir.mkdir(parents=True, exist_ok=True)
        notes, spent, t_cpu = [], 0, time.thread_time()
        for i, p in enumerate(paths):
            name = Path(p).name
            if i >= limits.max_files or spent > limits.max_request_pixels:
                notes.append(f"⛔ **{name}**: not read (over {limits.max_files} files or "
                             f"{limits.max_request_pixels:,} pixels per click)")
                continue
            if time.thread_time() - t_cpu > limits.max_request_cpu_s:
                notes.append(f"⛔ **{name}**: {_over_budget(limits.max_request_cpu_s)}")
                continue
            dest = dest_dir / name
            try:
                if any(Path(f).name == name for f in sess.fields):
                    raise ValueError(f"a field named {name!r} is already in this session")
                rgb = check_colour(decode_image(p, max_pixels=limits.max_pixels))
                spent += rgb.shape[0] * rgb.shape[1]
                shutil.copyfile(p, dest)
                n = sess.add_field(dest, rgb)
                notes.append(f"✅ **{name}**: {n} cells")
            except Exception as exc:  # noqa: BLE001 - one bad field never stops the others
                if dest.exists() and all(Path(f) != dest for f in sess.fields):
                    dest.unlink()
                if not isinstance(exc, (OSError, ValueError)):
                    log.exception("labelling: adding %s failed", name)
                notes.append(f"⛔ **{name}**: {error_text(exc)}")
        if sess.fields and sess.current is None:
            sess.next_batch()
        return sess, *_label_view(sess, "\n\n".join(notes))

    def do_label(sess, label):
        if sess is None or sess.current is None:
            return sess, *_label_view(sess, "No cell to label: add fields first.")
        sess.label(label)
        return sess, *_label_view(sess)

    def undo(sess):
        if sess is None or sess.undo() is None:
            return sess, *_label_view(sess, "Nothing to undo.")
        return sess, *_label_view(sess)

    def next_batch(sess):
        if sess is None or not sess.fields:
            return sess, *_label_view(sess)
        sess.next_batch()
        return sess, *_label_view(sess)

    def pick(sess, evt):
        if sess is not None and 0 <= evt.index < len(sess.batch):
            sess.select(evt.index)
        return sess, *_label_view(sess)

    def export(sess, request: gr.Request | None = None):
        if sess is None or not sess.n_labelled:
            return None, *_label_view(sess, "Nothing labelled yet.")[2:3]
        path = sess.write_csv(folder(request) / "fields" / "labels.csv")
        return str(path), _label_status(sess) + f"\n\nExported {sess.n_labelled} labels."

    def run_adapt(sess, request: gr.Request | None = None):
        if sess is None or not sess.n_labelled:
            return "Nothing labelled yet.", [], None
        if run_dir is None:
            return ("This app runs a model that `adapt` cannot fit (an ONNX file): export the labels and run "
                    "`malaria-screen adapt --labels labels.csv --model RUN_FOLDER`."), [], None
        root = folder(request)
        try:
            res, cmp = sess.adapt(root / "fields" / "labels.csv", root / "site", model_dir=run_dir)
        except (OSError, ValueError) as exc:  # LabelsError (too few of a class) is a ValueError
            return f"Could not fit a site model: {error_text(exc)}", [], None
        except Exception as exc:  # noqa: BLE001 - shown, not raised; a bug, so logged in full
            log.exception("labelling: adapt failed")
            return f"Could not fit a site model: {error_text(exc)}", [], None
        zip_path = shutil.make_archive(str(root / "site"), "zip", root_dir=res.out)
        rows = [[f["field"], f["cells"], f["labelled"], round(100 * f["before"], 2), round(100 * f["after"], 2)]
                for f in cmp.fields]
        return _comparison_md(res, cmp, model_name), rows, zip_path

    _special(pick, evt=gr.SelectData)
    for fn in (add, export, run_adapt):
        _special(fn, request=gr.Request)
    light = {"concurrency_limit": 1, "concurrency_id": "label", "trigger_mode": "multiple"}  # in order, one at a time
    work_kw = {"concurrency_limit": limits.field_concurrency, "concurrency_id": "label-work"}
    add_btn.click(add, inputs=[label_in, state], outputs=[state, *view], **work_kw)
    label_in.upload(add, inputs=[label_in, state], outputs=[state, *view], **work_kw)
    for lab, btn in btns.items():
        btn.click(lambda sess, _lab=lab: do_label(sess, _lab), inputs=[state], outputs=[state, *view], **light)
    undo_btn.click(undo, inputs=[state], outputs=[state, *view], **light)
    next_btn.click(next_batch, inputs=[state], outputs=[state, *view], **light)
    batch.select(pick, inputs=[state], outputs=[state, *view], **light)
    export_btn.click(export, inputs=[state], outputs=[csv_out, status], **light)
    adapt_btn.click(run_adapt, inputs=[state], outputs=[result, compare, site_out], **work_kw)
    if fields:
        def add_example(sess, evt, request: gr.Request | None = None):
            return add([fields[evt.index]], sess, request)

        _special(add_example, evt=gr.SelectData, request=gr.Request)
        ex.select(add_example, inputs=[state], outputs=[state, *view], **work_kw)


def _login(access: AppAccess):
    """Gradio's ``auth=`` callable: a key as the password (constant-time compare), a failed try
    answered after ``access.login_delay_s`` (awaited: the event loop goes on serving others)."""

    async def auth(username: str, password: str) -> bool:
        if access.check(password):
            log.info("web app login: %r", username)
            return True
        log.warning("web app login refused: %r", username)
        await asyncio.sleep(access.login_delay_s)
        return False

    return auth


def launch(predictor, *, host: str = "127.0.0.1", port: int = 7860, prevent_thread_lock: bool = False,
           access: AppAccess | None = None, **kwargs):
    """Build and serve the app, offline.

    Parameters
    ----------
    predictor : CellClassifierBase
    host : str, default="127.0.0.1"
        Interface to bind; the default serves this machine only.
    port : int, default=7860
    prevent_thread_lock : bool, default=False
        Return immediately (tests) instead of blocking.
    access : AppAccess, optional
        Login keys, accepted ``Host`` names; default :class:`AppAccess()` (no login, loopback names).
        With keys every page, file and API route of the app needs a login (Gradio's ``auth``).
    **kwargs
        Passed to :func:`build_app`.

    Returns
    -------
    gradio.Blocks
        The running app (``.close()`` stops it); ``.app_limits`` and ``.app_access`` (without the
        keys, with the ``Host`` names in force) say what it runs under.

    Raises
    ------
    AnonymousExposureError
        If ``host`` is not loopback and ``access`` has neither keys nor ``allow_anonymous``
        (checked before anything is built).
    """
    import gradio as gr
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    access = access or AppAccess()
    check_exposure(host, access)
    hosts = list(access.allowed_hosts)
    if host not in ("0.0.0.0", "::", "") and host not in hosts:  # a concrete address: its literal is no rebinding
        hosts.append(host)
    demo = build_app(predictor, **kwargs)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False, show_error=True,
                max_file_size=demo.app_limits.max_file_bytes,
                auth=_login(access) if access.keys else None,
                auth_message="Log in with one of this app's keys as the password (any user name)." if access.keys else None,
                app_kwargs={"middleware": [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]},
                prevent_thread_lock=prevent_thread_lock, quiet=True, footer_links=["api", "settings"],
                theme=gr.themes.Default(), pwa=False, mcp_server=False, enable_monitoring=False)
    demo.app_access = dataclasses.replace(access, keys=(), allowed_hosts=tuple(hosts))  # what it runs under, no keys
    return demo
