"""Research commands: ``features`` (feature-layer sweep), ``lr-find``, ``cv``, ``compare``.

The package modules that pull in heavy libraries (torch, Lightning, scikit-learn) are imported
inside the commands, so ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from malaria_screen.config import TrainConfig

__all__ = ["register"]


def _cells(data_dir: Path, size: int, cache_dir: Optional[Path], groups: Optional[Path], group_per_image: bool, progress: bool):
    from malaria_screen.data.dataset import load_cell_set

    return load_cell_set(data_dir, size_px=size, cache_dir=cache_dir, groups_csv=groups, group_per_image=group_per_image,
                         progress=progress)


def features(
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout: DATA_DIR/<Class>/*"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for feature_layers.{md,csv,json,png}"),
    backbone: str = typer.Option("efficientnet_lite0", help="Registered model with stages (see `malaria-screen models`)"),
    weights: Optional[str] = typer.Option("imagenet", help="'imagenet' (EfficientNet-Lite0's bundled weights) or PATH to a "
                                          "local ImageNet weights file (.safetensors or torch state dict); 'none' = random"),
    input_size: int = typer.Option(64, help="Cell side, pixels"),
    seed: int = typer.Option(0, help="Seed of the patient split (as `train --seed`)"),
    val_fraction: float = typer.Option(0.1, help="Share of PATIENTS for validation (fitted on here)"),
    test_fraction: float = typer.Option(0.2, help="Share of PATIENTS for test"),
    c: float = typer.Option(1.0, "--C", help="Inverse L2 regularisation of the logistic regression"),
    n_boot: int = typer.Option(500, help="Patient-bootstrap replicates for the 95% CIs"),
    batch_size: int = typer.Option(256, help="Cells per forward batch"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="CSV path,patient for non-NIH names"),
    group_per_image: bool = typer.Option(False, help="Group per image (LEAKY; warned)"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder"),
    progress: bool = typer.Option(True, help="Progress bars"),
) -> None:
    """Which layer of a frozen pretrained backbone classifies cells best? (Rajaraman et al. 2018)

    Pools each stage's features, fits a standardised logistic regression on the training
    patients and reports test-patient accuracy and ROC-AUC per layer.
    """
    from malaria_screen.data.datamodule import channel_stats
    from malaria_screen.data.split import patient_split
    from malaria_screen.models import build_model
    from malaria_screen.research.features import feature_sweep, write_feature_sweep

    cells = _cells(data_dir, input_size, cache_dir, groups, group_per_image, progress)
    split = patient_split(cells.labels, cells.patients, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    w = None if weights in (None, "none") else weights
    try:
        net = build_model(backbone, num_classes=len(cells.class_names), input_size=input_size, weights=w)
    except TypeError as exc:
        raise typer.BadParameter(f"model {backbone!r} takes no pretrained weights; use --weights none") from exc
    mean, std = channel_stats(cells.images[split.train])
    res = feature_sweep(net, cells, split, mean=mean, std=std, C=c, n_boot=n_boot, seed=seed, batch_size=batch_size)
    res.meta.update(backbone=backbone, weights=w, data=str(cells.root), seed=seed)
    files = write_feature_sweep(res, out, title=f"{backbone} ({w or 'random init'}) @ {input_size} px")
    typer.echo(files["markdown"].read_text())
    typer.echo(f"wrote {out}")


def lr_find(
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for lr_find.json and lr_find.png"),
    model: str = typer.Option("cellnet", help="Architecture"),
    input_size: Optional[int] = typer.Option(None, help="Input side, pixels. Default: the model's own"),
    batch_size: int = typer.Option(128, help="Cells per batch"),
    optimizer: str = typer.Option("adamw", help="adam | adamw"),
    weight_decay: float = typer.Option(5e-4, help="Decoupled weight decay"),
    weights: Optional[str] = typer.Option(None, help="Pretrained weights: 'imagenet' (EfficientNet-Lite0) or PATH"),
    freeze: bool = typer.Option(False, help="Frozen backbone: sweep the head's rate"),
    min_lr: float = typer.Option(1e-6, help="Start of the sweep"),
    max_lr: float = typer.Option(1.0, help="End of the sweep"),
    num_training: int = typer.Option(100, help="Mini-batches in the sweep"),
    seed: int = typer.Option(0, help="Seed of split and initialisation"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="CSV path,patient for non-NIH names"),
    group_per_image: bool = typer.Option(False, help="Group per image (LEAKY; warned)"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder"),
    progress: bool = typer.Option(True, help="Progress bars"),
) -> None:
    """LR range test (Smith 2017): loss against an exponentially growing learning rate; suggests a peak rate."""
    from malaria_screen.data.split import patient_split
    from malaria_screen.models import default_input_size
    from malaria_screen.research.lr_find import lr_range_test, write_lr_find

    try:
        size = input_size or default_input_size(model)
        cfg = TrainConfig(model=model, input_size=size, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                          seed=seed, pretrained_weights=weights, freeze_backbone=freeze)
    except ValueError as exc:  # an unknown model or optimizer
        raise typer.BadParameter(str(exc)) from exc
    cells = _cells(data_dir, size, cache_dir, groups, group_per_image, progress)
    split = patient_split(cells.labels, cells.patients, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed)
    res = lr_range_test(cells, split, cfg, min_lr=min_lr, max_lr=max_lr, num_training=num_training, accelerator="cpu")
    write_lr_find(res, out)
    sug = "none (curve too short)" if res.suggestion is None else f"{res.suggestion:.3g}"
    typer.echo(f"suggested learning rate (steepest descent): {sug}; lowest loss at {res.meta['min_loss_lr'] or float('nan'):.3g} "
               f"({len(res.lrs)} steps); wrote {out}/lr_find.json and lr_find.png")


def cv(
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: fold<k>/ runs, cv_summary.{md,json}, cv_folds.csv, oof_predictions.csv"),
    folds: int = typer.Option(5, help="Patient-grouped folds"),
    model: str = typer.Option("cellnet", help="Architecture"),
    input_size: Optional[int] = typer.Option(None, help="Input side, pixels. Default: the model's own"),
    epochs: int = typer.Option(20, help="Epochs per fold"),
    batch_size: int = typer.Option(128, help="Cells per batch"),
    lr: float = typer.Option(4e-3, help="Peak learning rate"),
    weights: Optional[str] = typer.Option(None, help="Pretrained weights: 'imagenet' (EfficientNet-Lite0) or PATH"),
    freeze: bool = typer.Option(False, help="Frozen pretrained backbone, trained head"),
    backbone_lr_scale: float = typer.Option(1.0, help="Fine-tuning: backbone lr = lr x this"),
    val_fraction: float = typer.Option(0.1, help="Share of PATIENTS for validation inside each fold"),
    seed: int = typer.Option(0, help="Seed of folds, initialisation and shuffling"),
    n_boot: int = typer.Option(1000, help="Patient-bootstrap replicates for the pooled CIs"),
    limit_train_batches: Optional[float] = typer.Option(None, help="Batches (>1) or share (<=1) per epoch: smoke runs"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="CSV path,patient for non-NIH names"),
    group_per_image: bool = typer.Option(False, help="Group per image (LEAKY; warned)"),
    accelerator: str = typer.Option("auto", help="cpu | gpu | auto"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder"),
    progress: bool = typer.Option(True, help="Progress bars"),
) -> None:
    """Patient-grouped k-fold cross-validation: per-fold metrics, mean ± std, out-of-fold predictions.

    Resumable: folds whose results exist are read back, not retrained (only into the same folds, recipe and cells).
    """
    from malaria_screen.models import default_input_size
    from malaria_screen.research.cv import cross_validate, write_cv

    try:
        size = input_size or default_input_size(model)
        cfg = TrainConfig(model=model, input_size=size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          val_fraction=val_fraction, pretrained_weights=weights, freeze_backbone=freeze,
                          backbone_lr_scale=backbone_lr_scale)
    except ValueError as exc:  # an unknown model, a bad value
        raise typer.BadParameter(str(exc)) from exc
    cells = _cells(data_dir, size, cache_dir, groups, group_per_image, progress)
    ltb = None if limit_train_batches is None else (int(limit_train_batches) if limit_train_batches > 1 else limit_train_batches)
    try:
        res = cross_validate(cells, cfg, out, n_folds=folds, n_boot=n_boot, progress=progress, accelerator=accelerator,
                             limit_train_batches=ltb)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    files = write_cv(res, out, title=f"{model} @ {size} px, {epochs} epochs")
    typer.echo(files["markdown"].read_text())


def compare(
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Image folder in NIH layout"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: runs/<label>/, split.json, compare.md, compare.csv"),
    models: Optional[List[str]] = typer.Option(None, "--models", help="Entry labels to run (default: all of the issue's list)"),
    epochs: int = typer.Option(3, help="Epochs per model"),
    input_size: int = typer.Option(64, help="Input side of the CNNs trained from scratch, pixels"),
    transfer_input_size: int = typer.Option(64, help="Input side of the pretrained backbones, pixels"),
    mobilenet_weights: Optional[str] = typer.Option(None, help="Local ImageNet weights for mobilenet_v3_small (else from scratch)"),
    seed: int = typer.Option(0, help="Seed of split and initialisation"),
    n_boot: int = typer.Option(1000, help="Patient-bootstrap replicates"),
    limit_train_batches: Optional[float] = typer.Option(None, help="Batches (>1) or share (<=1) per epoch: smoke runs"),
    accelerator: str = typer.Option("auto", help="cpu | gpu | auto"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cell store folder"),
    progress: bool = typer.Option(True, help="Progress bars"),
) -> None:
    """Compare models on one patient split: size, MFLOPs, CPU latency, test-patient metrics with CIs.

    Resumable per model: rows whose results exist are read back, not retrained.
    """
    from malaria_screen.research.model_comparison import compare_models, default_entries

    entries = default_entries(input_size=input_size, transfer_input_size=transfer_input_size, mobilenet_weights=mobilenet_weights)
    if models:
        known = {e.label: e for e in entries}
        unknown = [m for m in models if m not in known]
        if unknown:
            raise typer.BadParameter(f"unknown entries {unknown}; choose from {sorted(known)}")
        entries = [known[m] for m in models]
    ltb = None if limit_train_batches is None else (int(limit_train_batches) if limit_train_batches > 1 else limit_train_batches)
    try:
        compare_models(data_dir, out, entries, base_config=TrainConfig(epochs=epochs, seed=seed), cache_dir=cache_dir,
                       progress=progress, accelerator=accelerator, limit_train_batches=ltb, n_boot=n_boot)
    except ValueError as exc:  # rows of another recipe in --out, data without the positive class
        raise typer.BadParameter(str(exc)) from exc
    typer.echo((out / "compare.md").read_text())


def register(app: typer.Typer) -> None:
    """Add the research commands to ``app``."""
    app.command("features")(features)
    app.command("lr-find")(lr_find)
    app.command("cv")(cv)
    app.command("compare")(compare)
