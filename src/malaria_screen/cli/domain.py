"""``malaria-screen domain-fit``: the self-check's reference statistics of a model (``domain.safetensors``).

The package modules it needs pull in Pillow and OpenCV: imported inside the command (fast ``--help``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

__all__ = ["domain_fit", "register"]


def domain_fit(
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder with split.json (default: the bundled default model)"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Data folder holding nih_cell_images/ and chula_rbc/ (default: $MALARIA_SCREEN_DATA)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default: MODEL/domain.safetensors; "
                                       "with --onnx, <FILE stem>.domain.safetensors beside the file)"),
    onnx: Optional[Path] = typer.Option(
        None, "--onnx", exists=True, dir_okay=False,
        help="Fit the reference on this ONNX file's features (e.g. MODEL/model.int8.onnx: an int8 network's features "
             "are not the PyTorch model's); its split is MODEL's. smear/serve/app then use it with that file."),
) -> None:
    """Fit the self-check's reference statistics on the model's NIH training patients and set its threshold.

    Run it again whenever a model's weights or split change (e.g. a new bundled default model):
    `malaria-screen domain-fit --data ../shared/data` rewrites the bundled model's domain.safetensors, and
    `... --onnx MODEL/model.int8.onnx` the int8 file's own model.int8.domain.safetensors.
    """
    from malaria_screen.inference import default_model_dir
    from malaria_screen.smear.domain import DOMAIN_FILE, fit_reference, reference_path_for

    model_dir = model or default_model_dir()
    data = data or (Path(os.environ["MALARIA_SCREEN_DATA"]) if os.environ.get("MALARIA_SCREEN_DATA") else None)
    if data is None:
        raise typer.BadParameter("give --data (or set MALARIA_SCREEN_DATA)", param_hint="'--data'")
    out = out or (reference_path_for(onnx) if onnx is not None else model_dir / DOMAIN_FILE)
    if not out.parent.is_dir():
        raise typer.BadParameter(f"{out.parent} is not a folder", param_hint="'--out'")
    try:
        net = None
        if onnx is not None:
            from malaria_screen.inference.onnx_predictor import OnnxPredictor

            net = OnnxPredictor.from_file(onnx)
        ref = fit_reference(model_dir, data, progress=lambda m: typer.echo(m, err=True), model=net)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    ref.save(out)
    c = ref.calibration
    typer.echo(f"threshold {ref.threshold:.3f} = {ref.threshold_rule}; in-domain: NIH held-out fields "
               f"{c['nih_heldout_fields']['in_domain']}, Chula fields {c['chula_fields']['in_domain']}. Saved: {out}")


def register(app: typer.Typer) -> None:
    """Add ``domain-fit`` to the main Typer app."""
    app.command("domain-fit")(domain_fit)
