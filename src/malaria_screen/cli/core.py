"""Core commands: ``train``, ``evaluate``, ``predict``, ``models``.

The package modules that pull in heavy libraries (torch, Lightning, scikit-learn, Pillow, OpenCV)
are imported inside the commands, so ``--help`` is instant; light ones are imported at the top.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from malaria_screen.config import TrainConfig
from malaria_screen.data.patients import patient_ids_from_names
from malaria_screen.data.ray_map import RayUnavailableError, connect
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv
from malaria_screen.inference import BACKENDS, load_model
from malaria_screen.inference.known_labels import folder_labels, score_line, seen_flags

log = logging.getLogger("malaria_screen.cli")


# Tables on a pipe or in a file: plain ASCII, columns two spaces apart, a dashed rule under the
# header, never wrapped (scripts split them on runs of spaces).
_PLAIN_BOX = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


class Backend(str, Enum):
    """``--backend``: what runs the cell model (see :data:`BACKEND_HELP`)."""

    onnx = "onnx"
    torch = "torch"
    auto = "auto"


BACKEND_HELP = ("What runs the cell model: onnx (ONNX Runtime; for the bundled model its model.onnx, the same "
                "probabilities as PyTorch to float rounding, without importing torch: a faster start and less memory), "
                "torch, or auto (torch for a run folder, ONNX Runtime for an .onnx file). Default: onnx for the bundled "
                "model, auto with --model.")


def screening_backend(model: Optional[object], backend: Optional[str]) -> str:
    """The back-end ``predict``, ``smear``, ``smear-slides`` and ``serve`` load: ``--backend``, else
    ONNX Runtime for the bundled model (``model`` None: its ``model.onnx``, PyTorch's probabilities to
    float rounding, and ``predict``'s workers can run it) and ``"auto"`` for a given one."""
    backend = backend.value if isinstance(backend, Backend) else backend
    return backend or ("onnx" if model is None else "auto")


def echo_table(rows: list[list[str]], header: list[str]) -> None:
    """Print ``rows`` under ``header`` as a table (``rich.table.Table``) on standard output.

    On a terminal: rich's simple box, bold header, cells wrapped to the terminal's width. Otherwise
    (a pipe, a file, a test's captured output): plain ASCII, columns two spaces apart, a dashed
    rule under the header, lines never wrapped, so the text stays the same whatever the width.
    """
    console = Console(file=sys.stdout, markup=False, emoji=False, highlight=False)
    plain = not console.is_terminal
    if plain:
        console = Console(file=sys.stdout, width=1 << 16, no_color=True, markup=False, emoji=False, highlight=False)
    table = Table(box=_PLAIN_BOX if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0) if plain else (0, 1), header_style="" if plain else "bold", highlight=False)
    for h in header:
        table.add_column(h, no_wrap=plain)
    for r in rows:
        table.add_row(*(Text(str(x)) for x in r))  # literal text: no markup, emoji codes or highlighting
    console.print(table, crop=False, soft_wrap=plain)


def check_out_dir(out: Path, param_hint: str = "'--out'") -> Path:
    """Refuse an ``--out`` folder that cannot be created or written, before any work is done.

    Parameters
    ----------
    out : Path
        Output folder; it may exist (a folder) or not (then it is created later, with its
        missing parents).
    param_hint : str, default="'--out'"
        The option named in the error message.

    Returns
    -------
    Path
        ``out``, unchanged.

    Raises
    ------
    typer.BadParameter
        If ``out`` or its nearest existing parent is not a folder, or nothing can be created in
        that folder. Writability is tried (a temporary folder made and removed there), not only
        read from the permission bits: root passes ``os.access`` on ``/proc`` or a read-only
        mount, where creating fails.
    """
    for p in (out, *out.absolute().parents):
        if p.exists():
            if not p.is_dir():
                what = "exists and is not a folder" if p == out else f"cannot be created: {p} is a file, not a folder"
                raise typer.BadParameter(f"{out} {what}", param_hint=param_hint)
            if not os.access(p, os.W_OK | os.X_OK):
                raise typer.BadParameter(f"{out} cannot be written: no write permission on {p}", param_hint=param_hint)
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".malaria-screen-probe-", dir=p))
            except OSError as exc:
                raise typer.BadParameter(f"{out} cannot be written: creating a file in {p} failed ({exc.strerror})",
                                         param_hint=param_hint) from exc
            return out
    return out  # pragma: no cover - the root always exists


def check_out_file(out: Path, param_hint: str = "'--out'") -> Path:
    """Refuse an ``--out`` file that cannot be written, before any work is done.

    ``param_hint`` is the option named in the error message.

    Returns
    -------
    Path
        ``out``, unchanged.

    Raises
    ------
    typer.BadParameter
        If ``out`` is an existing folder, or its folder cannot be created or written
        (:func:`check_out_dir`).
    """
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give a file name", param_hint=param_hint)
    check_out_dir(out.absolute().parent, param_hint)
    return out


def list_inputs(paths: List[Path]) -> List[Path]:
    """Image files named by ``paths`` (:func:`~malaria_screen.data.dataset.list_image_files`),
    refusing an input that gives none.

    A folder without image files is reported on stderr ("warning: no image files found in ...")
    and the other paths go on; when no path gives a file, the command stops with the message and
    exit status 1, as when every file failed (``smear`` does the same with no field). A missing
    path is kept: it is one file's error row.

    Returns
    -------
    list of Path
        The files, in the order of ``paths``; never empty.

    Raises
    ------
    typer.Exit
        With code 1, if no path gives a file.
    """
    from malaria_screen.data.dataset import list_image_files

    files: List[Path] = []
    empty: List[Path] = []
    for p in paths:
        got = list_image_files([p])
        if not got:
            empty.append(p)
        files += got
    if not files:
        typer.echo(f"error: no image files found in {', '.join(map(str, empty)) or 'the given paths'}", err=True)
        raise typer.Exit(1)
    for p in empty:
        typer.echo(f"warning: no image files found in {p}; skipped", err=True)
    return files


class ThresholdRule(str, Enum):
    """``train --threshold-rule``: keep 0.5, or count-match the threshold on the validation cells."""

    fixed = "fixed"
    val_count = "val-count"


def _run_folder(name: Optional[str]) -> Optional[str]:
    """``--init-from``: None, the bundled default model's folder for "default", else the path as given."""
    if name != "default":
        return name
    from malaria_screen.inference.base import default_model_dir

    return str(default_model_dir())


def train(
    ctx: typer.Context,
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout: DATA_DIR/<Class>/*"),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (weights, config, split, logs, plots, metrics)"),
    model: str = typer.Option("cellnet", help="Architecture (see `malaria-screen models`)"),
    input_size: Optional[int] = typer.Option(None, help="Square input side, pixels. Default: the model's own"),
    epochs: int = typer.Option(20, min=1, help="Maximum epochs"),
    batch_size: int = typer.Option(128, help="Cells per batch"),
    optimizer: str = typer.Option("adamw", help="adam | adamw"),
    lr: float = typer.Option(4e-3, help="Peak (one-cycle) or initial (plateau) learning rate"),
    weight_decay: float = typer.Option(5e-4, help="Decoupled weight decay"),
    scheduler: str = typer.Option("onecycle", help="onecycle (seed 003) | plateau (factor 0.5, patience 2, min_lr 1e-6; seed 000) | none"),
    grad_clip: float = typer.Option(0.1, help="Clip gradients by value; 0 disables"),
    augment: bool = typer.Option(True, help="Flips, 90-degree rotations, padded random crop, colour jitter"),
    color_jitter: float = typer.Option(
        0.1, min=0.0, max=0.99, help="Colour jitter strength: brightness/contrast/saturation +- this, hue +- a fifth of it "
        "(0.3 imitates slide-to-slide stain differences when adapting to another microscope)"),
    color_augment: str = typer.Option(
        "jitter", help="jitter (the colour jitter above) | stain (strong stain augmentation for training across "
        "microscopes and stains: brightness/contrast/hue jitter, saturation x1/5..5, a tenth of cells in grey) | hed "
        "(Tellez et al. 2019 HED stain augmentation, --hed-sigma, plus brightness/contrast +- --color-jitter; batched)"),
    hed_sigma: float = typer.Option(
        0.05, min=0.0, max=0.99, help="--color-augment hed: stain scale U(1-s,1+s) and shift U(-s,s) per HED channel "
        "(Tellez et al. 2019: 0.05 light, 0.2 strong)"),
    blur_sigma: float = typer.Option(
        0.0, min=0.0, max=4.0, help="--color-augment hed: blur each training cell by a Gaussian of sigma U(0, s) px "
        "at the input size (Tellez et al. 2019's morphology augmentation); 0: off"),
    test_patients: Optional[str] = typer.Option(
        None, help="Patients forced into the TEST split: comma-separated ids, or a folder whose image file names give "
        "them (e.g. the bundled samples, so that the demo runs on held-out patients)"),
    extra_negatives: Optional[Path] = typer.Option(
        None, exists=True, file_okay=False, help="Folder of fields without malaria in Chula-RBC-12 layout (images/N.jpg, "
        "labels/N.txt, a point per red cell): its cells join the TRAINING split as Uninfected, one group per field"),
    extra_negative_fields: Optional[str] = typer.Option(
        None, help="Comma-separated field stems of --extra-negatives to use (default all); the rest stay unseen"),
    synthetic_positives: float = typer.Option(
        0.0, help="Share of the --extra-negatives cells that also join training as a synthetic Parasitized copy "
        "(an NIH training parasite pasted in optical density); 0 adds none"),
    early_stopping: int = typer.Option(0, help="Stop after N epochs without val-loss improvement; 0 disables"),
    val_fraction: float = typer.Option(0.1, help="Share of PATIENTS for validation"),
    test_fraction: float = typer.Option(0.2, help="Share of PATIENTS for test"),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and augmentation, and of the split unless --split-seed"),
    split_seed: Optional[int] = typer.Option(
        None, help="Seed of the patient split only (default: --seed): runs with other --seed values and the same "
        "--split-seed train on the same patients (an ensemble, distillation teachers)"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="CSV path,patient for non-NIH file names"),
    group_per_image: bool = typer.Option(False, help="Group per image when no patient is known (LEAKY; warned)"),
    resume: bool = typer.Option(False, help="Continue a killed run from OUT/checkpoints/last.ckpt"),
    devices: str = typer.Option("1", help="Devices (Lightning), e.g. 2 for 2-process DDP"),
    strategy: str = typer.Option("auto", help="Lightning strategy, e.g. ddp"),
    accelerator: str = typer.Option("auto", help="cpu | gpu | auto"),
    precision: Optional[str] = typer.Option(None, help="Lightning precision, e.g. 16-mixed on GPU"),
    num_workers: int = typer.Option(0, help="DataLoader worker processes"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder. Default: $MALARIA_SCREEN_CACHE or ~/.cache/malaria-screen"),
    progress: bool = typer.Option(True, help="Progress bars"),
    weights: Optional[str] = typer.Option(
        None, help="Pretrained weights: 'imagenet' (EfficientNet-Lite0's bundled ImageNet weights) or PATH to a local "
        "ImageNet file (.safetensors, or a torch state dict read weights-only). Default: random initialisation"),
    freeze: bool = typer.Option(False, help="Transfer: frozen pretrained backbone (BatchNorm statistics fixed), train the head only"),
    backbone_lr_scale: float = typer.Option(1.0, help="Fine-tuning: backbone learning rate = lr x this (e.g. 0.1); head gets lr"),
    unfreeze_at_epoch: Optional[int] = typer.Option(
        None, help="With --freeze: unfreeze the backbone at this 0-based epoch and fine-tune it (gradual unfreezing)"),
    init_from: Optional[str] = typer.Option(
        None, help="Fine-tune a trained run folder, or 'default' for the bundled default model (to adapt it to another "
        "microscope's crops): its weights and input normalisation are the start"),
    distill_from: Optional[list[str]] = typer.Option(
        None, metavar="RUN_DIR", help="Knowledge distillation (Hinton et al. 2015): a teacher run folder (repeat for several; trained on "
        "this run's training patients only, e.g. same --split-seed): targets mix each cell's label with the teachers' "
        "mean probabilities"),
    distill_weight: float = typer.Option(0.5, min=0.0, max=1.0, help="--distill-from: weight of the teachers' "
                                         "probabilities in the targets (1 - this: the label)"),
    weight_average_from: Optional[float] = typer.Option(
        None, min=0.0, max=0.999, help="Weight averaging (SWA, Izmailov et al. 2018; dense as in SWAD): average the weights "
        "of every step from this share of training on (e.g. 0.5) and keep the average"),
    mixstyle: float = typer.Option(
        0.0, min=0.0, max=1.0, help="MixStyle (Zhou et al. 2021, domain generalisation): mix the cells' feature statistics "
        "after the --mixstyle-layers with this probability per batch while training (e.g. 0.5); 0: off"),
    mixstyle_layers: str = typer.Option(
        "features.0,features.2", help="--mixstyle: comma-separated sub-module names (cellnet: stem and first stage)"),
    threshold_rule: ThresholdRule = typer.Option(
        ThresholdRule.fixed, help="fixed: threshold 0.5 | val-count: the threshold at which as many validation cells are called "
        "Parasitized as are Parasitized (count calibration for parasitemia on a low-prevalence site; with --groups, "
        "only the validation cells listed there count: the target site's crops, not NIH cells mixed in)"),
    limit_train_batches: Optional[float] = typer.Option(None, help="Batches (>1) or share (<=1) per epoch: smoke runs"),
) -> None:
    """Train a cell classifier with a patient-level split, then evaluate it on the test patients.

    Transfer learning: --weights with --freeze (feature extractor) or without it (fine-tuning,
    optionally with --backbone-lr-scale and, after --freeze, --unfreeze-at-epoch). Any image folder
    with two or more classes trains; data without a Parasitized class get multi-class metrics.
    """
    from malaria_screen.models import default_input_size
    from malaria_screen.training.run import train as run_train

    check_out_dir(out)
    if out.resolve() == data_dir.resolve() or data_dir.resolve() in out.resolve().parents:
        raise typer.BadParameter(f"{out} is inside DATA_DIR {data_dir}: its plots would be read as cells by the next "
                                 "run; choose a folder outside it", param_hint="'--out'")
    if val_fraction == 0 and (scheduler == "plateau" or threshold_rule is ThresholdRule.val_count):
        raise typer.BadParameter("--scheduler plateau and --threshold-rule val-count need validation patients: "
                                 "set --val-fraction above 0", param_hint="'--val-fraction'")
    if resume:
        _warn_ignored_on_resume(ctx)
    try:
        cfg = TrainConfig(
            model=model, input_size=input_size or default_input_size(model), epochs=epochs, batch_size=batch_size,
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, grad_clip=grad_clip, augment=augment,
            color_jitter=color_jitter, color_augment=color_augment, hed_sigma=hed_sigma, blur_sigma=blur_sigma,
            test_patients=_patient_list(test_patients),
            extra_negatives=str(extra_negatives) if extra_negatives is not None else None,
            extra_negative_fields=_comma_list(extra_negative_fields),
            synthetic_positives=synthetic_positives,
            early_stopping_patience=early_stopping, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
            num_workers=num_workers, pretrained_weights=weights, freeze_backbone=freeze,
            backbone_lr_scale=backbone_lr_scale, unfreeze_at_epoch=unfreeze_at_epoch,
            init_from=_run_folder(init_from), split_seed=split_seed,
            distill_from=tuple(_run_folder(t) for t in distill_from or ()), distill_weight=distill_weight,
            weight_average_from=weight_average_from, mixstyle=mixstyle,
            mixstyle_layers=_comma_list(mixstyle_layers),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    dev: int | str = int(devices) if devices.isdigit() else devices
    ltb = None if limit_train_batches is None else (int(limit_train_batches) if limit_train_batches > 1 else limit_train_batches)
    try:
        res = run_train(data_dir, out, cfg, resume=resume, groups_csv=groups, group_per_image=group_per_image,
                        cache_dir=cache_dir, accelerator=accelerator, devices=dev, strategy=strategy, precision=precision,
                        progress=progress, limit_train_batches=ltb)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # bad data, split, weights file, --out, options
        raise typer.BadParameter(str(exc)) from exc
    if not res.is_global_zero:  # other DDP ranks: rank zero evaluates and writes
        return
    typer.echo(f"trained {res.config.model} in {res.seconds:.1f} s ({res.epochs_run} epochs); run folder: {out}")
    if res.config.positive_index is None or res.config.num_classes != 2:
        from malaria_screen.research.multiclass import evaluate_multiclass_split

        mm = evaluate_multiclass_split(out, res.cells, res.split.test)
        typer.echo(f"\ntest: {mm['n_groups']} groups, {mm['n_cells']} images (95% CI: bootstrap over groups)")
        echo_table([[k, f"{mm[k]:.4f}", f"[{mm['ci95'][k][0]:.4f}, {mm['ci95'][k][1]:.4f}]"]
                    for k in ("accuracy", "macro_f1", "roc_auc_ovr_macro")], ["metric", "value", "95% CI"])
        typer.echo(f"chance (commonest class): {mm['chance_accuracy']:.4f}")
        return
    from malaria_screen.inference.run_evaluation import calibrate_count_threshold, evaluate_split

    try:
        if threshold_rule is ThresholdRule.val_count:
            c = calibrate_count_threshold(out, res.cells, res.split.val, groups_csv=groups)
            typer.echo(f"threshold {c.threshold:.4f}: {c.n_called} of {c.n_cells} validation cells called Parasitized "
                       f"({c.n_parasitized} are)")
        m = evaluate_split(out, res.cells, res.split.test, split_name="test")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _print_metrics(m)


#: ``train`` options that ``--resume`` takes from the command line; every other comes from the run's config.json.
_RESUME_OPTIONS = frozenset({"data_dir", "out", "resume", "groups", "group_per_image", "devices", "strategy", "accelerator",
                             "precision", "num_workers", "cache_dir", "progress", "limit_train_batches", "threshold_rule"})


def _warn_ignored_on_resume(ctx: typer.Context) -> None:
    """Name the recipe options given on the command line that ``--resume`` ignores (the saved
    config.json decides: a resumed run is the run that was started)."""
    given = sorted(k for k in ctx.params if k not in _RESUME_OPTIONS
                   and getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE")
    if given:
        typer.echo(f"warning: --resume continues the run as its config.json says; ignored: "
                   f"{', '.join('--' + k.replace('_', '-') for k in given)}", err=True)


def _comma_list(spec: Optional[str]) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated option, in order (``()`` for None or "")."""
    return tuple(item.strip() for item in (spec or "").split(",") if item.strip())


def _patient_list(spec: Optional[str]) -> tuple[str, ...]:
    """Patient ids from ``--test-patients``: a folder (ids parsed from its image file names) or a comma list."""
    if not spec:
        return ()
    if Path(spec).is_dir():
        from malaria_screen.data.dataset import list_image_files

        names = [p.name for p in list_image_files([Path(spec)])]
        if not names:
            raise typer.BadParameter(f"--test-patients: no images in {spec}")
        try:
            return tuple(sorted(set(patient_ids_from_names(names))))
        except ValueError as exc:
            raise typer.BadParameter(f"--test-patients: {exc}") from exc
    return tuple(sorted({p.strip() for p in spec.split(",") if p.strip()}))


def _print_metrics(m: dict) -> None:
    rows = []
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        lo, hi = m["ci95"][k]
        rows.append([k, f"{m[k]:.4f}", f"[{lo:.4f}, {hi:.4f}]"])
    typer.echo(f"\n{m.get('split', '')}: {m['n_patients']} patients, {m['n_cells']} cells (95% CI: bootstrap over patients)")
    echo_table(rows, ["metric", "value", "95% CI"])


RAY_HELP = ("Run the per-file work on a Ray cluster: 'local' (a runtime on this machine), 'auto' (the cluster this "
            "node joined with `ray start`) or HEAD:PORT. Inputs and model must be at the same paths on every node. "
            "Needs malaria-screen[ray]")


def connect_ray(address: str) -> None:
    """Start or join the Ray runtime for ``--ray``; a usage error if Ray is missing or unreachable."""
    try:
        connect(address)
    except RayUnavailableError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--ray'") from exc


def _load_predictor(model: Optional[Path], backend: str, **kwargs):
    """Load the model for ``predict``/``evaluate``; torch is imported only for the torch back-end."""
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        return load_model(model, backend=backend, **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    except ImportError as exc:
        raise typer.BadParameter(f"the {backend} back-end is not installed ({exc}); install malaria-screen[runtime] "
                                 "and pass an .onnx model, or install the full package") from exc


def _seen_patients(pred) -> set[str]:
    """Patients a model was trained or validated on (run folder's ``split.json``, ONNX metadata,
    or an ensemble's members)."""
    from malaria_screen.inference.base import seen_patients

    seen = seen_patients(pred)
    return seen["train"] | seen["val"]


def evaluate(
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for metrics.json, per_patient.csv, predictions.csv, plots"),
    model: Optional[Path] = typer.Option(None, help="Run folder or .onnx file; default: the bundled model"),
    backend: str = typer.Option("auto", help="torch | onnx | auto (onnx for .onnx files, else torch)"),
    include_train_patients: bool = typer.Option(
        False, help="Also score patients the model was trained or validated on (LEAKY; flagged in metrics.json)"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="CSV path,patient for non-NIH names"),
    group_per_image: bool = typer.Option(False, help="Group per image (leaky; warned)"),
    n_boot: int = typer.Option(1000, help="Bootstrap replicates over patients for the 95% CIs"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder"),
    progress: bool = typer.Option(True, help="Progress bars"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
) -> None:
    """Evaluate a model on a dataset, by patient, with 95% bootstrap CIs.

    Patients the model was trained or validated on (from its split.json) are left out unless
    --include-train-patients is given: a benchmark cannot leak by accident.
    """
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.evaluation.report import write_evaluation

    check_out_dir(out)
    pred = _load_predictor(model, backend)
    if pred.positive_index is None:
        raise typer.BadParameter(f"model classes {pred.class_names} have no Parasitized class")
    if ray:
        from malaria_screen.inference.distributed import load_cell_probs_ray

        connect_ray(ray)
        cells = load_cell_probs_ray(data_dir, None if model is None else str(model), backend=backend, groups_csv=groups,
                                    group_per_image=group_per_image)
    else:
        try:
            cells = load_cell_set(data_dir, size_px=pred.input_size, cache_dir=cache_dir, groups_csv=groups,
                                  group_per_image=group_per_image, progress=progress)
        except ValueError as exc:  # not a class-folder layout, one class only, an unreadable groups.csv
            raise typer.BadParameter(str(exc), param_hint="DATA_DIR") from exc
    seen = _seen_patients(pred)
    excluded = sorted({p for p in cells.patients if p in seen})
    keep = np.arange(len(cells)) if include_train_patients else np.asarray([i for i, p in enumerate(cells.patients) if p not in seen], dtype=np.int64)
    if excluded and not include_train_patients:
        typer.echo(f"left out {len(cells) - len(keep)} cells of {len(excluded)} patients the model was trained/validated on", err=True)
    if len(keep) == 0:
        typer.echo("no cells left to evaluate (all patients were seen in training)", err=True)
        raise typer.Exit(2)
    sub = cells.subset(keep)
    positive = pred.class_names[pred.positive_index]
    if positive not in sub.class_names:
        raise typer.BadParameter(f"dataset classes {sub.class_names} have no {positive!r} folder")
    y = (np.asarray(sub.labels) == sub.class_names.index(positive)).astype(int)
    probs = (sub.probs if ray else pred.predict_proba_prepared(sub.images))[:, pred.positive_index]
    leaky = bool(include_train_patients and excluded)
    m = write_evaluation(out, y_true=y, p_pos=probs, patients=sub.patients, relpaths=sub.relpaths, threshold=pred.threshold,
                         split_name="all patients (LEAKY: includes training patients)" if leaky else "held-out patients",
                         n_boot=n_boot, extra={"model": pred.source, "backend": pred.backend, "data": str(cells.root), "leaky": leaky,
                                               "excluded_seen_patients": len(excluded) if not include_train_patients else 0,
                                               "decode_errors": cells.errors})
    _print_metrics(m)
    typer.echo(f"wrote {out}/metrics.json")


#: Most rows ``predict`` prints (failed files first); every row is in its ``--out`` file. Printing
#: all of them cost more than classifying them: rich renders a 4,096-row table in about 4 s of CPU,
#: against 1.5 s to classify the cells on 2 cores (cProfile, twenty-fourth stop).
PREDICT_TABLE_ROWS: int = 50


def predict(
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (recursive)"),
    out: Path = typer.Option(..., "--out", "-o", help="Results file: .csv or .json"),
    model: Optional[Path] = typer.Option(None, help="Run folder or .onnx file; default: the bundled model"),
    backend: Optional[Backend] = typer.Option(None, "--backend", help=BACKEND_HELP),
    batch_size: int = typer.Option(256, min=1, help="Cells per inference batch"),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes that decode (and, with an ONNX model, classify) "
                                          "the files (threads for up to 512 files). "
                                          "Default: the usable CPU cores"),
    quiet: bool = typer.Option(False, help="Do not print the results table (at most 50 rows, failed files first)"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
    device: str = typer.Option("cpu", help="Torch device of the network with --backend torch: cpu, cuda, cuda:1, ... "
                               "(decoding stays on the CPU cores)"),
    precision: str = typer.Option("32", help="Inference precision with --backend torch: 32, or 16-mixed / bf16-mixed "
                                  "on a GPU (a few cells near the threshold may change label)"),
) -> None:
    """Classify cell images; one row per file: path, label, p_parasitized, error.

    The rows go to ``--out``; the table printed shows at most 50 of them, failed files first.

    Beside ``--out r.csv`` goes ``r.summary.json``: ``n``, the count per class and the estimated
    prevalence of Parasitized with its 95 % CI and ``method`` (EM, Saerens et al. 2002; see
    docs/quantification.md). A file that cannot be read gets an error row and the rest go on; the
    exit status is 1 if any file failed (or no image file was found), 0 otherwise. Both files are
    written atomically.

    A file named twice (by two spellings, or a symbolic link) gets one row, under its first name.
    """
    from malaria_screen.data.dataset import unique_real_paths
    from malaria_screen.data.parallel import default_workers, start_fork_server
    from malaria_screen.evaluation.quantify import bag_summary
    from malaria_screen.inference.base import CellClassifierBase

    if out.suffix.lower() not in (".csv", ".json"):
        raise typer.BadParameter(f"--out must end in .csv or .json, got {out.name}")
    check_out_file(out)
    listed = list_inputs(paths)  # missing paths stay in: each is one file's error row
    files = unique_real_paths(listed)  # one row per file, however many spellings or links name it
    if len(files) < len(listed):
        typer.echo(f"note: {len(listed) - len(files)} path(s) named a file already given by another path: "
                   "each file is classified once", err=True)
    on_device = {"device": device, "precision": precision} if (device, precision) != ("cpu", "32") else {}
    backend = screening_backend(model, backend)  # the bundled model: its model.onnx, which the workers can run
    if on_device and (backend != "torch" or ray):
        raise typer.BadParameter("--device and --precision apply to --backend torch, without --ray")
    if not ray and len(files) > CellClassifierBase.PROCESS_MIN_FILES and (workers or default_workers()) > 1:
        # the workers' fork server imports its modules on another core while the model loads here
        start_fork_server(["malaria_screen.inference.onnx_predictor"])
    pred = _load_predictor(model, backend, batch_size=batch_size, **on_device)
    if ray:
        from malaria_screen.inference.distributed import predict_files_ray

        connect_ray(ray)
        results = predict_files_ray(None if model is None else str(model), files, backend=backend, batch_size=batch_size)
    else:
        results = pred.predict_files(files, workers=workers)
    rows = [r.__dict__ for r in results]
    cols = ["path", "label", "p_parasitized", "error"]
    for r in rows:
        if r["p_parasitized"] is not None:
            r["p_parasitized"] = round(r["p_parasitized"], 6)
    if out.suffix.lower() == ".csv":
        atomic_write_text(out, rows_to_csv(rows, cols))
    else:
        atomic_write_json(out, {"model": pred.source, "backend": pred.backend, "threshold": pred.threshold, "results": rows})
    summary = bag_summary([r["label"] for r in rows], [r["p_parasitized"] for r in rows], pred)
    atomic_write_json(out.with_name(out.stem + ".summary.json"), {"model": pred.source, **summary})
    n_bad = sum(1 for r in rows if r["error"])

    truth = folder_labels([r["path"] for r in rows], pred.class_names)
    has_truth = any(t is not None for t in truth)
    if not quiet:
        order = sorted(range(len(rows)), key=lambda i: rows[i]["error"] is None)[:PREDICT_TABLE_ROWS]  # failed first
        table = [[Path(rows[i]["path"]).name[:48], *([truth[i] or "-"] if has_truth else []), rows[i]["label"] or "-",
                  "-" if rows[i]["p_parasitized"] is None else f"{rows[i]['p_parasitized']:.3f}", (rows[i]["error"] or "")[:60]]
                 for i in sorted(order)]
        echo_table(table, ["file", *(["true (folder)"] if has_truth else []), "label", "p_parasitized", "error"])
        if len(rows) > len(table):
            typer.echo(f"(the table shows {len(table)} of {len(rows):,} rows, failed files first; all rows are in {out})")
    per_class = ", ".join(f"{sum(1 for r in rows if r['label'] == c)} {c}" for c in pred.class_names)
    typer.echo(f"\n{len(rows)} files: {per_class}, {n_bad} failed -> {out}")
    if summary["prevalence"] is not None:
        lo, hi = summary["prevalence_ci95"]
        typer.echo(f"prevalence of Parasitized: {100 * summary['prevalence']:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}%, "
                   f"{summary['method']}) -> {out.stem}.summary.json")
    if has_truth:
        line = score_line(truth, [r["label"] for r in rows], seen_flags(pred, [r["path"] for r in rows]))
        if line:
            typer.echo(line)
    if n_bad:
        raise typer.Exit(1)


def models() -> None:
    """List the registered architectures with parameters and MFLOPs per cell."""
    from malaria_screen.models import build_model, count_flops, count_parameters, default_input_size, list_models

    rows = []
    for name in list_models():
        s = default_input_size(name)
        m = build_model(name, input_size=s)
        rows.append([name, str(s), f"{count_parameters(m):,}", f"{count_flops(m, s) / 1e6:.1f}"])
    echo_table(rows, ["model", "input px", "parameters", "MFLOPs/cell"])


def register(app: typer.Typer) -> None:
    """Add the core commands to ``app``."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("models")(models)
