"""``malaria-screen adapt``: a site model from a lab's own labelled cells (:mod:`malaria_screen.smear.adapt`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

__all__ = ["adapt", "register"]


class Method(str, Enum):
    """``--method``: what to fit (``auto`` chooses by the amount of labels)."""

    auto = "auto"
    calibration = "calibration"
    linear = "linear"
    trees = "trees"


def adapt(
    labels: Optional[Path] = typer.Option(
        None, "--labels", "-l", exists=True, dir_okay=False,
        help="Labels CSV: field,x,y,w,h,label (boxes in px) or crop,label; label = Parasitized | Uninfected | not a cell."),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", "-a", exists=True, dir_okay=False, help="Or: IML annotations.json of annotated fields."),
    fields: Optional[Path] = typer.Option(
        None, "--fields", exists=True, file_okay=False, help="Folder of the annotated fields (with --annotations)."),
    out: Path = typer.Option(..., "--out", "-o", help="Site folder to write; use it as --model in every command."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Cell model run folder to adapt; default: the bundled model."),
    method: Method = typer.Option(Method.auto, "--method", help="calibration | linear | trees; auto: by the amount of labels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder (once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print the final summary."),
) -> None:
    """Fit a site model on labelled cells of your microscope and stain (seconds to a minute on a CPU).

    Annotated fields (--annotations + --fields) count as exhaustively labelled: their unboxed
    cells become Uninfected. A labels CSV labels only the cells it lists (e.g. from the web app's
    labelling tab). Exit status 2 on labels that cannot be used (every bad row is named), 1 on a
    fit that fails; no half folder is ever left.
    """
    from malaria_screen.smear.adapt import LabelsError, adapt as run_adapt, labels_from_annotations, read_labels_csv
    from malaria_screen.smear.labels import load_iml_annotations

    if (labels is None) == (annotations is None):
        raise typer.BadParameter("give either --labels CSV or --annotations JSON (with --fields)", param_hint="'--labels'")
    if annotations is not None and fields is None:
        raise typer.BadParameter("--annotations needs --fields (the folder of the annotated images)", param_hint="'--fields'")
    say = (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))
    try:
        if labels is not None:
            cells, exhaustive, source = read_labels_csv(labels), False, labels
        else:
            cells, exhaustive, source = labels_from_annotations(fields, load_iml_annotations(annotations)), True, annotations
        res = run_adapt(cells, out, model=model, method=method.value, exhaustive=exhaustive, labels_source=source,
                        overwrite=overwrite, progress=say)
    except LabelsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    r, s = res.report, res.site
    for msg in r["skipped_rows"][:20]:
        typer.echo(f"warning: {msg}", err=True)
    if len(r["skipped_rows"]) > 20:
        typer.echo(f"warning: ... {len(r['skipped_rows']) - 20} more rows left out (adapt_report.json)", err=True)
    m = r["fit_metrics_calibration"]
    mined = f", {r['mined_uninfected']} unboxed cells as Uninfected" if r["mined_uninfected"] else ""
    typer.echo(f"site model ({s.method}: {r['why']}) -> {res.out}\n"
               f"labels: {s.n_parasitized} Parasitized, {s.n_uninfected} Uninfected, {s.n_not_a_cell} not a cell{mined}; "
               f"{s.n_rows_skipped} rows left out. Calibrated threshold {s.threshold:.3f} "
               f"(on the labels, in-sample: sensitivity {m['sensitivity']:.2f}, PPV {m['ppv']:.2f}). "
               f"Use it: malaria-screen smear FIELDS --model {res.out} --out RESULTS")


def register(app: typer.Typer) -> None:
    """Add ``adapt`` to the main Typer app."""
    app.command("adapt")(adapt)
