"""Learning-rate range test (Smith 2017, "Cyclical learning rates for training neural networks", WACV).

The learning rate grows exponentially from ``min_lr`` to ``max_lr`` over ``num_training``
mini-batches of the training patients while the (exponentially smoothed) training loss is
recorded; the run stops early once the loss exceeds 4x its best. A good peak rate for one-cycle
training sits where the loss falls fastest, somewhat below the minimum; Lightning's
``Tuner.lr_find`` suggests the point of steepest negative gradient. Model weights are restored
afterwards (Lightning saves and reloads a temporary checkpoint).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import CellSet
from malaria_screen.data.split import SplitIndices
from malaria_screen.fileio import atomic_write_json
from malaria_screen.research.plots import save_lr_find_plot

__all__ = ["LRFindResult", "lr_range_test", "write_lr_find"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRFindResult:
    """Result of :func:`lr_range_test`.

    Attributes
    ----------
    lrs, losses : list of float
        Learning rate and smoothed training loss of each step (same length).
    suggestion : float or None
        Steepest-descent learning rate (None if the curve is too short).
    meta : dict
        Model, input size, min/max rate, steps, batch size, training patients and cells, and
        ``min_loss_lr`` / ``min_loss_lr_div10`` (the rate of lowest smoothed loss, and a tenth
        of it: a cross-check, since the steepest point can sit in the noisy start of the curve).
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    meta: dict


def lr_range_test(
    cells: CellSet,
    split: SplitIndices,
    config: TrainConfig,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
    accelerator: str = "cpu",
) -> LRFindResult:
    """Run Lightning's LR range test on the training patients.

    Parameters
    ----------
    cells : CellSet
        At ``config.input_size``.
    split : SplitIndices
        Only ``split.train`` is used.
    config : TrainConfig
        Model, batch size, optimiser, weight decay, augmentation, transfer settings
        (``pretrained_weights``, ``freeze_backbone``, ``backbone_lr_scale``: all parameter groups
        sweep the same rate). The scheduler is replaced by the exponential sweep.
    min_lr, max_lr : float, default=1e-6, 1.0
    num_training : int, default=100
        Mini-batches (the loader is cycled if the training set is smaller).
    accelerator : str, default="cpu"

    Returns
    -------
    LRFindResult

    Raises
    ------
    ValueError
        If ``min_lr >= max_lr``, ``num_training < 2`` or the split has no training cells.
    """
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    # Lightning, torchvision and matplotlib come with these: only when the test runs
    from malaria_screen.data.datamodule import CellDataModule, channel_stats
    from malaria_screen.training.module import CellClassifier
    from malaria_screen.training.run import build_net

    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got {min_lr}, {max_lr}")
    if num_training < 2:
        raise ValueError(f"num_training must be >= 2, got {num_training}")
    if len(split.train) == 0:
        raise ValueError("the split has no training cells")
    mean, std = channel_stats(cells.images[split.train])
    cfg = config.replace(class_names=tuple(cells.class_names), mean=mean, std=std, scheduler="none")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    net = build_net(cfg, cfg.pretrained_weights)
    pos = cfg.positive_index if cfg.positive_index is not None else 0
    system = CellClassifier(net, num_classes=cfg.num_classes, positive_index=pos, optimizer=cfg.optimizer, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, scheduler="none", label_smoothing=cfg.label_smoothing,
                            freeze_backbone=cfg.freeze_backbone, backbone_lr_scale=cfg.backbone_lr_scale)
    dm = CellDataModule(cells, split, mean, std, batch_size=cfg.batch_size, augment=cfg.augment,
                        num_workers=cfg.num_workers, seed=cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(split.train) / cfg.batch_size))
    with tempfile.TemporaryDirectory(prefix="lr_find_") as tmp:
        trainer = L.Trainer(default_root_dir=tmp, accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            max_epochs=math.ceil(num_training / steps_per_epoch) + 1, num_sanity_val_steps=0,
                            limit_val_batches=0, gradient_clip_val=cfg.grad_clip or None, gradient_clip_algorithm="value")
        finder = Tuner(trainer).lr_find(system, datamodule=dm, min_lr=min_lr, max_lr=max_lr, num_training=num_training,
                                        mode="exponential", update_attr=False)
    if finder is None:  # pragma: no cover - only on non-zero ranks
        raise RuntimeError("lr_find returned no result")
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) for v in finder.results["loss"]]
    suggestion = finder.suggestion()
    i_min = int(min(range(len(losses)), key=losses.__getitem__)) if losses else None
    meta = {
        "method": "LR range test (Smith 2017), exponential sweep, Lightning Tuner.lr_find; suggestion = steepest loss descent",
        "model": cfg.model, "input_size": cfg.input_size, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay, "min_lr": min_lr, "max_lr": max_lr, "num_training": num_training,
        "steps_run": len(lrs), "pretrained_weights": cfg.pretrained_weights, "freeze_backbone": cfg.freeze_backbone,
        "n_train_patients": len({cells.patients[i] for i in split.train}), "n_train_cells": int(len(split.train)),
        # Smith's (2017) rule of thumb, as a cross-check of the steepest-descent suggestion:
        "min_loss_lr": lrs[i_min] if i_min is not None else None,
        "min_loss_lr_div10": lrs[i_min] / 10 if i_min is not None else None,
    }
    return LRFindResult(lrs=lrs, losses=losses, suggestion=float(suggestion) if suggestion is not None else None, meta=meta)


def write_lr_find(result: LRFindResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``lr_find.json`` (suggested rate, curve, settings) and ``lr_find.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{result.meta.get('model')} @ {result.meta.get('input_size')} px, {result.meta.get('n_train_patients')} training patients"
    return {
        "json": atomic_write_json(out / "lr_find.json", {"suggested_lr": result.suggestion, **result.meta,
                                                         "lr": result.lrs, "loss": result.losses}),
        "plot": save_lr_find_plot(result.lrs, result.losses, result.suggestion, out / "lr_find.png", title=title),
    }
