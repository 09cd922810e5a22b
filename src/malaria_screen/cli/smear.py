"""Typer commands for whole-smear screening: ``smear``, ``smear-eval``, ``crops`` and ``rescorer``.

The main CLI calls :func:`register`. The package modules that pull in heavy libraries (Pillow,
OpenCV, scikit-learn, torch) are imported inside the commands (fast start).
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from malaria_screen.cli.core import BACKEND_HELP, RAY_HELP, Backend, check_out_dir, connect_ray, screening_backend
from malaria_screen.errors import error_text
from malaria_screen.evaluation.quantify import DEFAULT_TARGET_PRIOR
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv
from malaria_screen.inference import load_model
from malaria_screen.smear.labels import load_iml_annotations
from malaria_screen.smear.segment import SegmentConfig
from malaria_screen.smear.stain import STAIN_METHODS

__all__ = ["BACKEND_HELP", "Backend", "RESCORER_HELP", "screening_backend", "crops", "fit_rescorer", "load_rescorer", "register", "smear", "smear_eval"]


def _load_model(model: Optional[str], no_classify: bool, backend: str = "auto"):
    if no_classify:
        return None

    try:
        return load_model(model, backend=backend)
    except (FileNotFoundError, ValueError, ImportError) as exc:  # missing, corrupt (a bad .onnx, config.json), not installed
        typer.echo(f"error: cannot load the cell model: {exc}. Pass --model RUN_DIR or --no-classify.", err=True)
        raise typer.Exit(2) from exc


#: ``--stain``: the stain normalisations of :data:`malaria_screen.smear.stain.STAIN_METHODS`.
Stain = Enum("Stain", {m: m for m in STAIN_METHODS}, type=str)


class CIMethod(str, Enum):
    """``--ci``: binomial 95 % interval of the parasitemia."""

    wilson = "wilson"
    exact = "exact"


class CropSource(str, Enum):
    """``crops --source``: cut the annotated boxes, or the segmented cells."""

    boxes = "boxes"
    detections = "detections"


class Unmatched(str, Enum):
    """``--unmatched``: what detections matching no annotated box become."""

    skip = "skip"
    uninfected = "uninfected"


def load_rescorer(path: Optional[Path], predictor):
    """The ``--rescorer`` folder's :class:`~malaria_screen.smear.rescore.CellRescorer`, else the
    second stage of a site model (``--model SITE`` from ``malaria-screen adapt``); None without one.

    Raises
    ------
    typer.Exit
        With status 2 if it cannot be loaded, or is given without a cell model.
    """
    path = path if path is not None else getattr(predictor, "rescorer_dir", None)
    if path is None:
        return None
    from malaria_screen.smear.rescore import CellRescorer

    try:
        r = CellRescorer.load(path)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: cannot load the rescorer: {exc}", err=True)
        raise typer.Exit(2) from exc
    if predictor is None:
        typer.echo("error: --rescorer needs a cell model (drop --no-classify)", err=True)
        raise typer.Exit(2)
    return r


def _load_annotations(path: Path) -> dict:
    """:func:`~malaria_screen.smear.labels.load_iml_annotations`, with a bad file as a usage error.

    Raises
    ------
    typer.BadParameter
        If ``path`` cannot be read or is not an IML ``annotations.json`` (names the cause).
    """
    try:
        return load_iml_annotations(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise typer.BadParameter(f"cannot read {path} as IML annotations.json: {error_text(exc)}",
                                 param_hint="'--annotations'") from exc


def _present_fields(field_dir: Path, ann: dict) -> list[str]:
    """The annotated images that are in ``field_dir``, sorted; one line on stderr says how many
    annotated images are not there, one how many images there have no annotation (both skipped).

    Raises
    ------
    typer.BadParameter
        If none of the annotated images is in ``field_dir``.
    """
    from malaria_screen.data.io import is_image_entry

    present = sorted(n for n in ann if os.path.lexists(field_dir / n))  # a broken link is a field's error
    if not present:
        raise typer.BadParameter(f"none of the {len(ann)} annotated images is in {field_dir}", param_hint="'FIELD_DIR'")
    if len(present) < len(ann):
        typer.echo(f"{len(ann) - len(present)} annotated image(s) are not in {field_dir} (skipped)", err=True)
    extra = sorted(q.name for q in field_dir.iterdir()
                   if is_image_entry(q.name) and not q.is_dir() and q.name not in ann)
    if extra:
        typer.echo(f"{len(extra)} image(s) in {field_dir} have no annotation (skipped), e.g. {extra[0]}", err=True)
    return present


def _check_parasitemia_method(method: Optional[str]) -> None:
    """Refuse an unknown ``--parasitemia-method`` before any work."""
    from malaria_screen.smear.parasitemia import FIELD_METHODS

    if method is not None and method not in FIELD_METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(FIELD_METHODS)}; got {method!r}",
                                 param_hint="'--parasitemia-method'")


RESCORER_HELP = ("Rescorer folder from `malaria-screen rescorer` (second stage fitted on annotated fields); "
                  "use it with the --model it was fitted with.")


def smear(
    fields: List[Path] = typer.Argument(
        ..., help="Field images (JPEG/PNG/TIFF/BMP/WebP/GIF, decoded by content, up to 100 Mpx each) and/or folders of "
        "them (every file but hidden ones and non-image files such as .json .txt .csv; subfolders are not searched; in the --out folder "
        "the *_overlay.png of an earlier run are skipped); all are one slide. A file given twice is screened once."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>.json, <stem>_overlay.png, summary.json, report.html."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model run folder; default: the bundled default model."),
    pixel_size_um: Optional[float] = typer.Option(
        None, "--pixel-size-um", min=1e-4, help="Pixel size at the specimen, µm/px. Default: estimate the RBC scale from each image (RBC ≈ 7.5 µm)."
    ),
    stain: Stain = typer.Option(Stain("none"), "--stain", help="Stain normalisation towards the NIH crops."),
    scale_to_nih: bool = typer.Option(False, "--scale-to-nih/--no-scale-to-nih", help="Resize cell crops to the NIH scale (~130 px per cell)."),
    count_border: bool = typer.Option(True, "--count-border/--no-count-border", help="Count cells cut by the image border in the parasitemia."),
    ci: CIMethod = typer.Option(CIMethod.wilson, "--ci", help="Binomial 95% interval: wilson, or exact (Clopper-Pearson)."),
    no_classify: bool = typer.Option(False, "--no-classify", help="Segment and count only (no model)."),
    rescorer: Optional[Path] = typer.Option(None, "--rescorer", help=RESCORER_HELP),
    include_out_of_domain: bool = typer.Option(
        False, "--include-out-of-domain", help="Count fields the self-check finds outside the model's domain in the "
        "slide total (default: left out and named; see docs/self-check.md)."),
    parasitemia_method: Optional[str] = typer.Option(
        None, "--parasitemia-method", help="Estimator of each field's and the slide's parasitemia: prior | em | acc | pacc | "
        "pcc | cc. Default: prior (posteriors corrected to a 2% prior; with --rescorer, its threshold). "
        "See docs/quantification.md."),
    target_prior: float = typer.Option(
        DEFAULT_TARGET_PRIOR, "--target-prior", min=1e-4, max=0.5, help="The prior method's expected share of infected "
        "cells (0-1). Higher calls more cells Parasitized: more infected cells found, more false calls on a negative "
        "slide (docs/quantification.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print the final summary line and its warnings."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write <stem>_overlay.png (about a fifth of a "
                                  "field's CPU time); the report keeps its thumbnails either way."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Fields screened at once, in worker processes "
                                          "(same outputs as 1). Default: the usable CPU cores."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
    backend: Optional[Backend] = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Screen whole thin-smear fields: segment red cells, classify each, report parasitemia.

    Self-check: an image that is not a blood smear field (noise, blank, a photo, text) is a
    field error; a field whose cells lie outside the model's training cells is flagged
    ("in_domain": false), left out of the slide total and named with what to do.

    A field that cannot be screened (missing, not a regular file, unreadable, grayscale, too
    small, ...) gets an entry in summary.json "errors" and the others go on; the exit status is 1
    if any field failed (or none was given), 130 if interrupted, 0 otherwise. The outputs of the
    other fields, summary.json and report.html are written either way.
    """
    from malaria_screen.data.parallel import default_workers
    from malaria_screen.smear.domain import load_reference
    from malaria_screen.smear.report import prestart_workers, run_smear

    check_out_dir(out)
    _check_parasitemia_method(parasitemia_method)
    workers = workers or default_workers()
    chosen = screening_backend(model, backend)
    if not ray:  # the workers' imports overlap the model's loading
        prestart_workers(workers, torch=not no_classify and chosen != "onnx" and not str(model or "").endswith(".onnx"))
    predictor = _load_model(model, no_classify, chosen)
    second = load_rescorer(rescorer, predictor)
    if ray:
        connect_ray(ray)

    done: list[str] = []

    def progress(name: str, entry: dict) -> None:
        done.append(name)
        if quiet:
            return
        if "error" in entry:
            typer.echo(f"{name}: ERROR {entry['error']}", err=True)
        else:
            p = entry["parasitemia"]
            ptxt = "n/a" if p is None else f"{100 * p:.2f}%"
            flag = " [OUTSIDE the model's domain]" if entry.get("in_domain") is False else ""
            typer.echo(f"{name}: {entry['n_rbc']} RBC, {entry['n_infected']} infected, parasitemia {ptxt} "
                       f"({entry['seconds']:.2f} s){flag}")

    log = logging.getLogger("malaria_screen")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        s = run_smear(
            fields,
            out,
            predictor,
            segment_config=SegmentConfig(pixel_size_um=pixel_size_um),
            stain=stain.value,
            scale_to_nih=scale_to_nih,
            count_border_cells=count_border,
            ci_method=ci.value,
            progress=progress,
            rescorer=second,
            overlays=overlays,
            workers=workers,
            ray=ray,
            domain_reference=load_reference(predictor) if predictor is not None else None,
            include_out_of_domain=include_out_of_domain,
            parasitemia_method=parasitemia_method,
            target_prior=target_prior,
        )
    except KeyboardInterrupt:
        typer.echo(f"interrupted after {len(done)} field(s): {Path(out) / 'summary.json'} and report.html cover them",
                   err=True)
        raise typer.Exit(130) from None
    finally:
        log.setLevel(level)
    p = s["parasitemia"]
    lo, hi = s["parasitemia_ci95"]
    ptxt = "n/a" if p is None else f"{100 * p:.3f}% (95% CI {100 * lo:.3f}-{100 * hi:.3f}%, {s['parasitemia_method']})"
    typer.echo(
        f"{s['n_fields'] + s['n_failed']} field(s): {s['n_fields']} screened, {s['n_failed']} failed"
        + (f", {len(s['out_of_domain'])} outside the model's domain" + ("" if include_out_of_domain else " (not counted)")
           if s.get("out_of_domain") else "")
        + f": {s['n_rbc']} RBC, "
        f"{s['n_infected']} infected, parasitemia {ptxt}. Report: {Path(out) / 'report.html'}"
    )
    for w in s.get("warnings", []):
        typer.echo(f"WARNING: {w}", err=True)
    if s["n_fields"] + s["n_failed"] == 0:
        typer.echo("error: no field images to screen", err=True)
    if s["n_failed"] or s["n_fields"] == 0:
        raise typer.Exit(1)


def smear_slides(
    slides: List[Path] = typer.Argument(..., exists=True, file_okay=False,
                                        help="One folder of field images per slide (the slide is named after its folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per slide (as `smear` writes it), "
                             "slides.csv and slides.json."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model run folder; default: the bundled default model."),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", min=1e-4, help="µm/px; default: estimated per image."),
    no_classify: bool = typer.Option(False, "--no-classify", help="Segment and count only (no model)."),
    rescorer: Optional[Path] = typer.Option(None, "--rescorer", help=RESCORER_HELP),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write each field's overlay PNG."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Fields screened at once. Default: the usable CPU cores."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
    backend: Optional[Backend] = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Screen several slides, one folder each, and write a slide table.

    Each slide is screened as `smear` screens one (outputs in OUT/<slide>/); slides.csv gives per
    slide the fields, red cells, estimated infected cells, parasitemia and a 95 % interval that
    accounts for clustering by field (cells of one field are not independent: the binomial interval
    at the fields' effective sample size, Korn & Graubard 1998). Exit status 1 if any field failed
    or a slide folder holds no field image.
    """
    from malaria_screen.data.parallel import default_workers
    from malaria_screen.smear.domain import load_reference
    from malaria_screen.smear.report import run_smear
    from malaria_screen.smear.slides import slide_table

    check_out_dir(out)
    names = [p.resolve().name or "slide" for p in slides]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"slide folders must have different names, got {names}", param_hint="SLIDES")
    predictor = _load_model(model, no_classify, screening_backend(model, backend))
    second = load_rescorer(rescorer, predictor)
    if ray:
        connect_ray(ray)
    reference = load_reference(predictor) if predictor is not None else None  # the self-check, as smear runs it
    summaries = {}
    for name, folder in zip(names, slides):
        summaries[name] = run_smear([folder], out / name, predictor, segment_config=SegmentConfig(pixel_size_um=pixel_size_um),
                                    rescorer=second, overlays=overlays, workers=workers or default_workers(), ray=ray,
                                    domain_reference=reference)
        typer.echo(f"{name}: {summaries[name]['n_fields']} field(s), {summaries[name]['n_failed']} failed")
    rows = slide_table(summaries)
    cols = ["slide", "n_fields", "n_out_of_domain", "n_failed", "n_rbc", "infected_estimate", "parasitemia", "ci95_low",
            "ci95_high", "n_effective"]
    atomic_write_text(out / "slides.csv", rows_to_csv(rows, cols))
    atomic_write_json(out / "slides.json", {"slides": rows})
    for r in rows:
        p = "n/a" if r["parasitemia"] is None else f"{100 * r['parasitemia']:.3f}% (95% CI {100 * r['ci95_low']:.3f}-{100 * r['ci95_high']:.3f}%)"
        typer.echo(f"{r['slide']}: {r['n_rbc']} RBC in {r['n_fields']} field(s), parasitemia {p}")
    typer.echo(f"slide table: {out / 'slides.csv'}")
    empty = [r["slide"] for r in rows if not r["n_fields"] and not r["n_failed"]]
    if empty:  # as smear on a folder without field images
        typer.echo(f"error: no field images in slide folder(s): {', '.join(empty)}", err=True)
    if empty or any(r["n_failed"] for r in rows):
        raise typer.Exit(1)


def smear_eval(
    field_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of annotated field images (IML_Malaria layout)."),
    annotations: Path = typer.Option(..., "--annotations", "-a", exists=True, dir_okay=False, help="IML annotations.json (boxes, px)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for metrics.json and per_field.csv."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model run folder; default: the bundled default model."),
    no_classify: bool = typer.Option(False, "--no-classify", help="Evaluate the segmentation only (no infection metrics)."),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", min=1e-4, help="µm/px; default: estimated per image."),
    stain: Stain = typer.Option(Stain("none"), "--stain", help="Stain normalisation towards the NIH crops."),
    iou: float = typer.Option(0.5, "--iou", min=0.05, max=1.0, help="IoU threshold of a detection match."),
    chula_dir: Optional[Path] = typer.Option(
        None, "--chula", exists=True, file_okay=False,
        help="Optional Chula-RBC-12 folder (images/, labels/) for the red-cell count check."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N (by name) of the annotated fields in FIELD_DIR."),
    box_scale: float = typer.Option(
        1.0, "--box-scale", min=0.1, help="Scale detection boxes about their centres before matching (the annotators' "
        "box convention: IML boxes are ~1.15x the cell); 1 = tight boxes, the strict figure."),
    rescorer: Optional[Path] = typer.Option(None, "--rescorer", help=RESCORER_HELP),
    parasitemia_method: Optional[str] = typer.Option(
        None, "--parasitemia-method", help="How cells are called Parasitized, as in `smear`: prior (default) | em | acc | "
        "pacc | pcc | cc (the model's own threshold)."),
) -> None:
    """Evaluate detection (P/R/F1 at IoU), infected-cell sensitivity/PPV, parasitemia error (points) and s/field.

    The annotated images found in FIELD_DIR are evaluated (the others are skipped, with a note;
    none found is an error). Fields that cannot be screened are listed in metrics.json "failed"
    and left out of the metrics; the exit status is then 1 (0 when all were screened).
    metrics.json is also printed.
    """
    from malaria_screen.smear.evaluate import evaluate_dataset

    check_out_dir(out)
    _check_parasitemia_method(parasitemia_method)
    if chula_dir is not None and not all((chula_dir / sub).is_dir() for sub in ("images", "labels")):
        raise typer.BadParameter(f"{chula_dir} is not a Chula-RBC-12 folder: it needs images/ and labels/",
                                 param_hint="'--chula'")
    ann = _load_annotations(annotations)
    names = _present_fields(field_dir, ann)
    predictor = _load_model(model, no_classify)
    second = load_rescorer(rescorer, predictor)
    metrics = evaluate_dataset(
        field_dir,
        ann,
        predictor,
        out_dir=out,
        segment_config=SegmentConfig(pixel_size_um=pixel_size_um),
        stain=stain.value,
        iou_threshold=iou,
        chula_dir=chula_dir,
        limit=limit,
        names=names,
        box_scale=box_scale,
        rescorer=second,
        parasitemia_method=parasitemia_method,
    )
    path = atomic_write_json(Path(out) / "metrics.json", metrics)
    typer.echo(path.read_text(encoding="utf-8"), nl=False)  # strict JSON: null, never NaN
    if metrics["n_failed"] or metrics.get("chula", {}).get("n_failed"):
        raise typer.Exit(1)


def crops(
    field_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of annotated field images."),
    annotations: Path = typer.Option(..., "--annotations", "-a", exists=True, dir_okay=False, help="IML annotations.json (boxes, px)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: Parasitized/, Uninfected/, groups.csv (path,patient)."),
    source: CropSource = typer.Option(
        CropSource.boxes, "--source", help="boxes: cut each annotated box | detections: cut the segmented cells exactly as "
        "`smear` does and label each by the box it matches (IoU >= 0.5); the crops an adapted model will see."),
    margin_px: int = typer.Option(2, "--margin-px", min=0, help="Margin around each box, px (boxes)."),
    no_mask: bool = typer.Option(False, "--no-mask", help="Keep the whole box instead of blacking out pixels outside the cell (boxes)."),
    pixel_size_um: Optional[float] = typer.Option(
        None, "--pixel-size-um", min=1e-4, help="µm per pixel (detections); default: estimated per field."),
    stain: Stain = typer.Option(Stain("none"), "--stain", help="Stain normalisation (detections; as the model will be run)."),
    unmatched: Unmatched = typer.Option(
        Unmatched.skip, "--unmatched", help="skip | uninfected (detections): write detections that match no box, and overlap no "
        "infected box, to Uninfected/ (negative mining of debris and fragments; for exhaustively annotated fields)."),
) -> None:
    """Export annotated cells as an NIH-layout crop folder (+ groups.csv for leak-free training).

    The annotated images found in FIELD_DIR are exported (the others are skipped, with a note;
    none found is an error). OUT must not hold images in Parasitized/ or Uninfected/ yet (add other
    cells, e.g. NIH ones, after the export). A field that cannot be read or segmented is reported
    and the others go on; the exit status is then 1. On Ctrl-C, groups.csv is written for the
    fields finished and the exit status is 130.
    """
    from malaria_screen.smear.crop_export import ExportInterrupted, export_annotation_crops, export_detection_crops
    from malaria_screen.data.io import is_image_entry

    check_out_dir(out)
    n_old = sum(1 for cls in ("Parasitized", "Uninfected") if (out / cls).is_dir() for q in (out / cls).iterdir()
                if is_image_entry(q.name) and not q.is_dir())
    if n_old:
        raise typer.BadParameter(f"{out} already holds {n_old} image file(s) in Parasitized/ and Uninfected/, which the "
                                 "new groups.csv would not list: use a new folder (add other cells after the export)",
                                 param_hint="'--out'")
    if unmatched is not Unmatched.skip and source is not CropSource.detections:
        raise typer.BadParameter("--unmatched needs --source detections")
    ann = _load_annotations(annotations)
    ann = {n: ann[n] for n in _present_fields(field_dir, ann)}
    try:
        if source is CropSource.boxes:
            s = export_annotation_crops(field_dir, ann, out, margin_px=margin_px, mask_cells=not no_mask)
        else:
            s = export_detection_crops(field_dir, ann, out, stain=stain.value, unmatched=unmatched.value,
                                       segment_config=SegmentConfig(pixel_size_um=pixel_size_um))
    except ExportInterrupted as exc:
        s = exc.summary
    for name, err in s.errors.items():
        typer.echo(f"{name}: ERROR {err}", err=True)
    typer.echo(
        f"{s.n_fields} field(s): {s.n_parasitized} Parasitized, {s.n_uninfected} Uninfected crops "
        f"({s.n_skipped} skipped, {len(s.errors)} failed). Groups: {s.groups_csv}"
    )
    if s.interrupted:
        typer.echo(f"interrupted after {s.n_fields + len(s.errors)} of {len(ann)} field(s): {s.groups_csv} lists the "
                   "crops of the fields finished", err=True)
        raise typer.Exit(130)
    if s.errors:
        raise typer.Exit(1)


def fit_rescorer(
    field_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of annotated field images."),
    annotations: Path = typer.Option(..., "--annotations", "-a", exists=True, dir_okay=False, help="IML annotations.json (boxes, px)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: rescorer.json + rescorer.skops."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Cell model whose logit is an input; default: the bundled model."),
    no_model_logit: bool = typer.Option(False, "--no-model-logit", help="Colour/shape features only (no cell model)."),
    fields: Optional[Path] = typer.Option(
        None, "--fields", exists=True, dir_okay=False,
        help="Text file of field image names to use (one per line); default: the annotated images in FIELD_DIR."),
    unmatched: Unmatched = typer.Option(
        Unmatched.uninfected, "--unmatched", help="uninfected | skip: detections that match no box (and overlap no infected "
        "box) are Uninfected training cells (for exhaustively annotated fields), or left out."),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", min=1e-4, help="µm per pixel; default: estimated per field."),
) -> None:
    """Fit a second-stage cell rescorer on annotated fields (gradient-boosted trees; seconds on a CPU)."""
    from malaria_screen.smear.rescore import CellRescorer, collect_rescorer_data

    check_out_dir(out)
    ann = _load_annotations(annotations)
    names = None
    if fields is not None:
        try:
            names = [ln.strip() for ln in fields.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read {fields}: {error_text(exc)}", param_hint="'--fields'") from exc
        unknown = [n for n in names if n not in ann]
        if unknown:
            raise typer.BadParameter(f"--fields lists {len(unknown)} field(s) without annotation, e.g. {unknown[0]}")
    if names is None:
        names = _present_fields(field_dir, ann)
    predictor = None if no_model_logit else _load_model(model, False)
    segment_config = SegmentConfig(pixel_size_um=pixel_size_um)
    data = collect_rescorer_data(field_dir, ann, predictor, names=names, unmatched=unmatched.value,
                                 segment_config=segment_config)
    for name, err in data.errors.items():
        typer.echo(f"{name}: ERROR {err}", err=True)
    try:
        r = CellRescorer(use_model_logit=predictor is not None, relative=data.relative).fit(
            data.X, data.y, data.groups, model=model or "default", segment_config=segment_config)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    r.save(out)
    c = r.config
    typer.echo(f"{c.n_fields} field(s), {c.n_cells} cells ({c.n_parasitized} Parasitized): fitted in {c.fit_seconds:.1f} s, "
               f"threshold {c.threshold:.3f}. Saved: {out}")


def register(app: typer.Typer) -> None:
    """Add ``smear``, ``smear-slides``, ``smear-eval``, ``crops`` and ``rescorer`` to the main Typer app."""
    app.command("smear")(smear)
    app.command("smear-slides")(smear_slides)
    app.command("smear-eval")(smear_eval)
    app.command("crops")(crops)
    app.command("rescorer")(fit_rescorer)
