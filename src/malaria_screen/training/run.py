"""One training run: data -> patient-level split -> Lightning fit -> run folder.

The run folder holds everything needed to use, audit or resume the model:

- ``config.json``: :class:`~malaria_screen.config.TrainConfig` (architecture, input size, mean/std
  of training patients, class names, threshold, optimiser settings);
- ``weights.safetensors``: the best-validation-loss network weights (no pickle);
- ``split.json``: patients and files per split, checked leak-free;
- ``checkpoints/last.ckpt`` (after every epoch) and ``checkpoints/best*.ckpt``: Lightning checkpoints, for ``--resume``;
- ``tb/`` (TensorBoard) and ``csv/`` (CSV) logs; ``samples_grid.png``; ``training_curves.png``.

Evaluation on the test patients is a separate step (``malaria_screen.evaluation``), which the CLI
runs right after training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import CellSet, load_cell_set
from malaria_screen.data.extra_negatives import point_cell_set
from malaria_screen.data.patients import read_groups_csv
from malaria_screen.data.split import SplitIndices, check_leak_free, patient_split, split_manifest
from malaria_screen.data.synthetic import synthetic_positives
from malaria_screen.fileio import atomic_write_json
from malaria_screen.models.mixstyle import mixstyle_layers
from malaria_screen.models.registry import build_model
from malaria_screen.models.weights import load_weights, save_weights
from malaria_screen.plotting import save_cell_grid, save_training_curves

__all__ = ["train", "TrainResult", "build_net", "distill_targets", "split_from_manifest", "concat_cell_sets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes
    ----------
    run_dir : Path
    config : TrainConfig
    cells : CellSet
        The decoded dataset (for evaluation without decoding again).
    split : SplitIndices
    seconds : float
        Wall time of ``Trainer.fit``, seconds.
    epochs_run : int
    is_global_zero : bool
        False in the other processes of a multi-process (DDP) run, which write no files.
    """

    run_dir: Path
    config: TrainConfig
    cells: CellSet
    split: SplitIndices
    seconds: float
    epochs_run: int
    is_global_zero: bool = True


def split_from_manifest(manifest: dict, relpaths: list[str]) -> SplitIndices:
    """Indices of a saved split in the current cell list (files missing now are dropped)."""
    pos = {rp: i for i, rp in enumerate(relpaths)}
    parts = {}
    for name in ("train", "val", "test"):
        files = manifest["splits"].get(name, {}).get("files", [])
        parts[name] = np.asarray(sorted(pos[f] for f in files if f in pos), dtype=np.int64)
    return SplitIndices(**parts)


def _history_from_csv(csv_dir: Path) -> dict[str, list[float]]:
    """Per-epoch metrics merged over every CSV log version (a resumed run adds a version)."""
    files = sorted(csv_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    per_epoch: dict[int, dict[str, float]] = {}
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                if not row.get("epoch"):
                    continue
                e = int(float(row["epoch"]))
                for k, v in row.items():
                    if k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auroc") and v not in ("", None):
                        per_epoch.setdefault(e, {})[k] = float(v)
    if not per_epoch:
        return {}
    n = max(per_epoch) + 1
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_auroc")
    return {k: [per_epoch.get(e, {}).get(k, math.nan) for e in range(n)] for k in keys}


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    groups_csv: str | Path | None = None,
    group_per_image: bool = False,
    cache_dir: str | Path | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str | None = None,
    progress: bool = True,
    limit_train_batches: float | int | None = None,
    cells: CellSet | None = None,
    split: SplitIndices | None = None,
) -> TrainResult:
    """Train a cell classifier on an NIH-layout folder with a patient-level split.

    Parameters
    ----------
    data_dir : path
        ``<data_dir>/<ClassName>/*`` images.
    out_dir : path
        Run folder (created). With ``resume=True`` it must hold an earlier run's
        ``config.json``, ``split.json`` and ``checkpoints/last.ckpt``.
    config : TrainConfig, optional
        Hyper-parameters; ``class_names``, ``mean`` and ``std`` are filled from the data.
        Ignored on resume (the saved one is used).
    resume : bool, default=False
        Continue a killed run from ``checkpoints/last.ckpt`` (same split, same config).
    groups_csv, group_per_image :
        Patient grouping for non-NIH names (see :func:`malaria_screen.data.load_cell_set`).
    cache_dir : path, optional
        Cell store folder.
    accelerator, devices, strategy, precision :
        Passed to :class:`lightning.Trainer` (``devices=2, strategy="ddp"`` for data-parallel).
    progress : bool, default=True
    limit_train_batches : float or int, optional
        Passed to the Trainer (short smoke runs).
    cells : CellSet, optional
        Already decoded cells of ``data_dir`` at ``config.input_size`` (cross-validation and
        model comparison decode once); default: :func:`load_cell_set`.
    split : SplitIndices, optional
        A patient-level split of ``cells`` to use instead of :func:`patient_split` (checked
        leak-free); e.g. one fold of :func:`~malaria_screen.data.split.patient_folds`.

    Notes
    -----
    Only the global-zero process writes files (``config.json``, ``split.json``, plots, weights);
    with ``strategy="ddp"`` Lightning starts the other processes by running the same command
    again, and they write nothing.

    Transfer learning comes from ``config``: ``pretrained_weights`` initialises the model
    (passed to the builder as ``weights``), ``freeze_backbone``, ``backbone_lr_scale`` and
    ``unfreeze_at_epoch`` go to :class:`~malaria_screen.training.module.CellClassifier`.

    Returns
    -------
    TrainResult

    Raises
    ------
    FileNotFoundError
        On resume without a checkpoint (before the run folder is made).
    FileExistsError
        If ``out_dir`` is a file, or, without ``resume``, already holds a run (``config.json`` or
        ``checkpoints/``): a new run never mixes with an old one's weights and checkpoints.
    ValueError
        If the split leaks patients or the data cannot be grouped; if ``pretrained_weights`` is
        set for a model that takes no weights; if gradual unfreezing is combined with DDP; if
        ``mixstyle_layers`` names no sub-module of the model (before the run folder is made).
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning.pytorch.utilities import rank_zero_only

    # Lightning, torchvision and matplotlib: only when training
    from malaria_screen.data.datamodule import CellDataModule, channel_stats
    from malaria_screen.training.module import CellClassifier

    if not log.isEnabledFor(logging.INFO):  # Lightning sets its own loggers to INFO on import
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)

    # Lightning's DDP launcher re-runs the command with LOCAL_RANK/RANK set: known before the
    # Trainer exists, so the other ranks can keep their hands off the run folder from the start.
    is_zero = getattr(rank_zero_only, "rank", 0) == 0
    if config is not None and config.mixstyle and not resume:  # a wrong layer name fails before any cell is read
        mixstyle_layers(build_net(config, None), config.mixstyle_layers)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run folder")
    if resume and not last_ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {last_ckpt}")
    if not resume and is_zero and ((out / "config.json").exists() or ckpt_dir.exists()):
        # a new run would mix its config and split with the old run's weights and checkpoints (and a
        # later --resume would continue the old run under the new split)
        raise FileExistsError(f"{out} already holds a training run (config.json or checkpoints/): continue it with "
                              "--resume, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    if resume:
        cfg = TrainConfig.from_json(out / "config.json")
        manifest = json.loads((out / "split.json").read_text())
        check_leak_free(manifest, groups=_read_groups(groups_csv), per_image=group_per_image)
        if cells is None:
            cells = load_cell_set(data_dir, size_px=cfg.input_size, cache_dir=cache_dir, groups_csv=groups_csv,
                                  group_per_image=group_per_image, progress=progress)
        cells, extra_idx = _with_extra_negatives(cells, cfg)
        if cfg.synthetic_positives:  # rebuilt from the saved split's training donors: the same cells
            cells, _ = _with_synthetic_positives(cells, split_from_manifest(manifest, cells.relpaths).train, extra_idx, cfg)
        split = split_from_manifest(manifest, cells.relpaths)
        log.info("resuming %s from %s", out, last_ckpt)
    else:
        cfg = config or TrainConfig()
        if cells is None:
            cells = load_cell_set(data_dir, size_px=cfg.input_size, cache_dir=cache_dir, groups_csv=groups_csv,
                                  group_per_image=group_per_image, progress=progress)
        elif cells.size_px != cfg.input_size:
            raise ValueError(f"cells are {cells.size_px} px but config.input_size is {cfg.input_size}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        if split is None:
            split = patient_split(cells.labels, cells.patients, val_fraction=cfg.val_fraction,
                                  test_fraction=cfg.test_fraction, seed=split_seed, force_test=cfg.test_patients)
        elif cfg.test_patients:
            in_test = {cells.patients[i] for i in split.test}
            if not set(cfg.test_patients) <= in_test:
                raise ValueError(f"the given split leaves test_patients out of test: {sorted(set(cfg.test_patients) - in_test)[:5]}")
        cells, extra_idx = _with_extra_negatives(cells, cfg)
        if len(extra_idx):
            split = SplitIndices(train=np.concatenate([split.train, extra_idx]), val=split.val, test=split.test)
        syn_idx = np.zeros(0, np.int64)
        if cfg.synthetic_positives:
            cells, syn_idx = _with_synthetic_positives(cells, split.train, extra_idx, cfg)
            split = SplitIndices(train=np.concatenate([split.train, syn_idx]), val=split.val, test=split.test)
        manifest = split_manifest(split, patients=cells.patients, relpaths=cells.relpaths, labels=cells.labels,
                                  class_names=cells.class_names, seed=split_seed, forced_test_patients=cfg.test_patients)
        if len(extra_idx):
            manifest["extra_negatives"] = {"folder": cfg.extra_negatives, "split": "train", "n_cells": int(len(extra_idx)),
                                           "n_fields": len({cells.patients[i] for i in extra_idx})}
        if len(syn_idx):
            manifest["synthetic_positives"] = {"split": "train", "n_cells": int(len(syn_idx)),
                                               "fraction": cfg.synthetic_positives}
        check_leak_free(manifest, groups=_read_groups(groups_csv), per_image=group_per_image)
        mean, std = channel_stats(cells.images[split.train])
        cfg = cfg.replace(class_names=tuple(cells.class_names), mean=mean, std=std)
        if cfg.init_from is not None:
            cfg = _inherit_init_run(cfg)

    if cfg.unfreeze_at_epoch is not None and "ddp" in str(strategy):
        raise ValueError("gradual unfreezing (unfreeze_at_epoch) is not supported with DDP: parameters unfrozen "
                         "after DDP starts are not synchronised; freeze for good or fine-tune from the start")

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # On resume the checkpoint holds every weight: the pretrained file is not read again.
    weights = None if resume else cfg.pretrained_weights
    net = build_net(cfg, weights)
    if cfg.init_from is not None and not resume:
        load_weights(net, _init_run_dir(cfg.init_from) / "weights.safetensors").train()
    pos = cfg.positive_index if cfg.positive_index is not None else 0
    system = CellClassifier(net, num_classes=cfg.num_classes, positive_index=pos, optimizer=cfg.optimizer, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, label_smoothing=cfg.label_smoothing,
                            freeze_backbone=cfg.freeze_backbone, backbone_lr_scale=cfg.backbone_lr_scale,
                            unfreeze_at_epoch=cfg.unfreeze_at_epoch, mixstyle=cfg.mixstyle,
                            mixstyle_layers=cfg.mixstyle_layers)
    train_targets = distill_targets(cfg, cells, split, manifest)  # teachers checked before anything is written
    if not resume and is_zero:  # written once the model is known to build (bad weights fail first)
        atomic_write_json(out / "split.json", manifest)
        cfg.to_json(out / "config.json")
        _save_sample_grid(cells, split, out / "samples_grid.png", seed=cfg.seed)
    dm = CellDataModule(cells, split, cfg.mean, cfg.std, batch_size=cfg.batch_size, augment=cfg.augment,
                        color_jitter=cfg.color_jitter, color_augment=cfg.color_augment, hed_sigma=cfg.hed_sigma,
                        blur_sigma=cfg.blur_sigma, num_workers=cfg.num_workers, seed=cfg.seed, train_targets=train_targets)

    has_val = len(split.val) > 0
    monitor = "val_loss" if has_val else "train_loss"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1),
        # last.ckpt after EVERY epoch, for --resume. (Lightning's save_last=True on the callback above
        # writes it only when the monitored loss improves: a killed run then redid every epoch since
        # its best, and resuming a finished run retrained its last epochs and changed its weights.)
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.early_stopping_patience > 0 and has_val:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=cfg.early_stopping_patience))
    if cfg.weight_average_from is not None:
        callbacks.append(_weight_averaging(cfg.weight_average_from))
    trainer = L.Trainer(
        default_root_dir=out,
        max_epochs=cfg.epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        gradient_clip_val=cfg.grad_clip or None,
        gradient_clip_algorithm="value",
        callbacks=callbacks,
        # version=None: a resumed run logs to a new version folder instead of overwriting the old one
        logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
        enable_progress_bar=progress,
        enable_model_summary=progress,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        limit_train_batches=limit_train_batches,
        # None: torch's global setting stands (the tests turn deterministic algorithms on; False would turn them off)
        deterministic=None,
    )
    t0 = time.perf_counter()
    trainer.fit(system, datamodule=dm, ckpt_path=str(last_ckpt) if resume else None, weights_only=True if resume else None)
    seconds = time.perf_counter() - t0

    if trainer.is_global_zero:
        best = callbacks[0].best_model_path or str(last_ckpt)
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        save_weights(net, out / "weights.safetensors")
        hist = _history_from_csv(out / "csv")
        if hist:
            save_training_curves(hist, out / "training_curves.png")
        atomic_write_json(out / "train_info.json", {
            "fit_seconds": round(seconds, 2),
            "epochs_run": int(trainer.current_epoch),
            "best_checkpoint": Path(best).name,
            "best_score": float(callbacks[0].best_model_score) if callbacks[0].best_model_score is not None else None,
            "monitor": monitor,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        })
    return TrainResult(run_dir=out, config=cfg, cells=cells, split=split, seconds=seconds, epochs_run=int(trainer.current_epoch),
                       is_global_zero=bool(trainer.is_global_zero))


def _weight_averaging(start_fraction: float):
    """Lightning's ``WeightAveraging`` (equal weights: SWA) over the steps from ``start_fraction``
    of training on, scored and checkpointed only once it holds at least one step.

    Lightning's callback swaps its average in for every validation and writes it into every
    checkpoint from the start, when it is still the untrained copy made at set-up; before the
    first averaged step this one leaves the model as it is, so early validation losses, ``best``
    and ``last`` hold the trained weights. Resuming restores the average and its count (the
    callback's own checkpoint state). Upstream: Lightning-AI/pytorch-lightning issue #21724 (the
    validation swap; open, with fixes proposed in PRs #21732 and #21754); the checkpoint side is
    guarded here too.
    """
    from lightning.pytorch.callbacks import WeightAveraging

    class _SWA(WeightAveraging):
        start_step = 0
        _swapped = False  # the average is in the model for this validation

        def on_train_start(self, trainer, pl_module):
            self.start_step = int(start_fraction * trainer.estimated_stepping_batches)

        def should_update(self, step_idx=None, epoch_idx=None):
            return step_idx is not None and step_idx >= self.start_step

        def _started(self) -> bool:
            return self._average_model is not None and int(self._average_model.n_averaged) > 0

        def on_validation_epoch_start(self, trainer, pl_module):
            self._swapped = self._started()
            if self._swapped:
                super().on_validation_epoch_start(trainer, pl_module)

        def on_validation_epoch_end(self, trainer, pl_module):
            if self._swapped:
                super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if self._started():
                super().on_save_checkpoint(trainer, pl_module, checkpoint)

        def on_train_end(self, trainer, pl_module):
            if self._started():
                super().on_train_end(trainer, pl_module)

    return _SWA()


def _read_groups(groups_csv: str | Path | None) -> dict[str, str] | None:
    """The ``path -> patient`` map of a groups CSV, or None."""
    return read_groups_csv(groups_csv) if groups_csv is not None else None


def concat_cell_sets(a: CellSet, b: CellSet) -> CellSet:
    """The cells of ``a`` followed by those of ``b`` (same size and classes; ``a``'s root).

    Raises
    ------
    ValueError
        If sizes or class names differ.
    """
    if a.size_px != b.size_px or list(a.class_names) != list(b.class_names):
        raise ValueError(f"cannot join cell sets: {a.size_px} px {a.class_names} vs {b.size_px} px {b.class_names}")
    return CellSet(images=np.concatenate([a.images, b.images]), labels=np.concatenate([a.labels, b.labels]),
                   patients=list(a.patients) + list(b.patients), relpaths=list(a.relpaths) + list(b.relpaths),
                   class_names=list(a.class_names), root=a.root, size_px=a.size_px, errors={**a.errors, **b.errors})


def _with_extra_negatives(cells: CellSet, cfg: TrainConfig) -> tuple[CellSet, np.ndarray]:
    """``cells`` plus ``cfg.extra_negatives``' cells (Uninfected), and the indices of the added cells."""
    if cfg.extra_negatives is None:
        return cells, np.zeros(0, np.int64)

    extra = point_cell_set(cfg.extra_negatives, size_px=cells.size_px, class_names=cells.class_names,
                           fields=cfg.extra_negative_fields)
    log.info("extra negatives: %d cells of %d fields from %s (training split only)", len(extra),
             len(set(extra.patients)), cfg.extra_negatives)
    return concat_cell_sets(cells, extra), np.arange(len(cells), len(cells) + len(extra), dtype=np.int64)


def _with_synthetic_positives(cells: CellSet, train_idx: np.ndarray, extra_idx: np.ndarray,
                              cfg: TrainConfig) -> tuple[CellSet, np.ndarray]:
    """``cells`` plus synthetic Parasitized copies of a share of the extra negatives, and their indices.

    Donors are the training split's Parasitized cells that are not extra negatives (NIH cells of
    training patients only); each synthetic cell keeps its host's field as its group, so it sits
    in the training split with it. Seeded by ``cfg.seed``: a resumed run rebuilds the same cells.
    """
    if cfg.positive_class not in cells.class_names:
        raise ValueError(f"synthetic_positives needs a {cfg.positive_class!r} class, the data has {cells.class_names}")
    pos = cells.class_names.index(cfg.positive_class)
    donors = train_idx[(cells.labels[train_idx] == pos) & ~np.isin(train_idx, extra_idx)]
    images, host = synthetic_positives(cells.images[extra_idx], cells.images[donors],
                                       fraction=cfg.synthetic_positives, seed=cfg.seed)
    hosts = extra_idx[host]
    syn = CellSet(images=images, labels=np.full(len(images), pos, np.int64),
                  patients=[cells.patients[i] for i in hosts],
                  relpaths=[f"{cells.relpaths[i]}+parasite" for i in hosts],
                  class_names=list(cells.class_names), root=cells.root, size_px=cells.size_px)
    log.info("synthetic positives: %d cells (NIH training parasites pasted into extra negatives)", len(syn))
    return concat_cell_sets(cells, syn), np.arange(len(cells), len(cells) + len(syn), dtype=np.int64)


def distill_targets(cfg: TrainConfig, cells: CellSet, split: SplitIndices, manifest: dict, *,
                    batch_size: int = 512) -> np.ndarray | None:
    """Soft targets of the training cells from ``cfg.distill_from``'s teachers (None without).

    Knowledge distillation (Hinton, Vinyals & Dean 2015): each teacher classifies the
    un-augmented training cells once (its own input normalisation); the target of cell ``i`` is
    ``(1 - w) * one_hot(label_i) + w * mean_teachers(probs_i)``, ``w = cfg.distill_weight``.

    Parameters
    ----------
    cfg : TrainConfig
    cells : CellSet
        ``(N, S, S, 3)`` uint8 cells of this run (extra negatives included).
    split : SplitIndices
    manifest : dict
        This run's ``split.json`` (:func:`~malaria_screen.data.split.split_manifest`).
    batch_size : int, default=512

    Returns
    -------
    (len(split.train), C) float32 ndarray or None
        Rows in ``split.train`` order; each sums to 1.

    Raises
    ------
    ValueError
        If a teacher folder lacks ``config.json``, ``weights.safetensors`` or ``split.json``, its
        classes, input size or channels differ, or it trained on a patient of this run's
        validation or test split, or chose its checkpoint on one of its test patients: the student
        would learn those patients through it.
    """
    if not cfg.distill_from:
        return None
    from malaria_screen.data.transforms import eval_transform

    val, test = (set(manifest["splits"][k]["patients"]) for k in ("val", "test"))
    images = torch.from_numpy(np.ascontiguousarray(cells.images[split.train])).permute(0, 3, 1, 2)
    probs = []
    for teacher in cfg.distill_from:
        run = _init_run_dir(teacher)
        missing = [n for n in ("config.json", "weights.safetensors", "split.json") if not (run / n).is_file()]
        if missing:
            raise ValueError(f"distill_from {teacher!r}: no {', '.join(missing)} in {run}")
        tcfg = TrainConfig.from_json(run / "config.json")
        for name in ("input_size", "channels", "class_names"):
            if getattr(tcfg, name) != getattr(cfg, name):
                raise ValueError(f"teacher {run} has {name}={getattr(tcfg, name)!r}, this run {getattr(cfg, name)!r}")
        tsplits = json.loads((run / "split.json").read_text(encoding="utf-8"))["splits"]
        t_train, t_val = set(tsplits["train"]["patients"]), set(tsplits.get("val", {}).get("patients", []))
        leak = (t_train & (val | test)) | (t_val & test)  # its validation patients chose its checkpoint
        if leak:
            raise ValueError(f"teacher {run} trained on (or chose its checkpoint on) {len(leak)} patient(s) of this run's "
                             f"validation/test split "
                             f"(e.g. {sorted(leak)[:5]}): distil only from teachers trained on this run's training patients")
        net = build_net(tcfg, None)
        load_weights(net, run / "weights.safetensors")
        net.eval()
        norm = eval_transform(tcfg.mean, tcfg.std)
        with torch.inference_mode():
            p = torch.cat([net(norm(images[i : i + batch_size])).softmax(-1) for i in range(0, len(images), batch_size)])
        probs.append(p.numpy())
    teacher_p = np.mean(probs, axis=0)
    onehot = np.eye(cfg.num_classes, dtype=np.float64)[np.asarray(cells.labels)[split.train]]
    w = float(cfg.distill_weight)
    log.info("distillation: %d teacher(s), weight %.2f, teachers' accuracy on the training cells %.4f", len(probs), w,
             float((teacher_p.argmax(1) == onehot.argmax(1)).mean()))
    return ((1.0 - w) * onehot + w * teacher_p).astype(np.float32)


def _init_run_dir(init_from: str | Path) -> Path:
    """The run folder named by ``init_from`` (a folder, or a file inside it)."""
    p = Path(init_from)
    return p.parent if p.is_file() else p


def _inherit_init_run(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the input normalisation of the run it fine-tunes (``cfg.init_from``).

    Raises
    ------
    ValueError
        If the run folder lacks ``config.json``/``weights.safetensors`` or its model, input
        size, channels or classes differ from ``cfg``.
    """
    run = _init_run_dir(cfg.init_from)
    if not (run / "config.json").is_file() or not (run / "weights.safetensors").is_file():
        raise ValueError(f"init_from={cfg.init_from!r}: no config.json + weights.safetensors in {run}")
    base = TrainConfig.from_json(run / "config.json")
    for name in ("model", "input_size", "channels", "class_names"):
        if getattr(base, name) != getattr(cfg, name):
            raise ValueError(f"init_from run has {name}={getattr(base, name)!r}, this run {getattr(cfg, name)!r}")
    return cfg.replace(mean=base.mean, std=base.std)


def build_net(cfg: TrainConfig, weights: str | None) -> torch.nn.Module:
    """Build ``cfg.model``, passing ``weights`` only when set (builders without it still work).

    Raises
    ------
    ValueError
        If ``weights`` is set and the model's builder takes no ``weights`` argument.
    """
    kw: dict = dict(num_classes=cfg.num_classes, input_size=cfg.input_size, in_chans=cfg.channels)
    if weights is None:
        return build_model(cfg.model, **kw)
    try:
        return build_model(cfg.model, weights=weights, **kw)
    except TypeError as exc:
        if "weights" in str(exc):
            raise ValueError(f"model {cfg.model!r} takes no pretrained weights (pretrained_weights={weights!r})") from exc
        raise


def _save_sample_grid(cells: CellSet, split: SplitIndices, path: Path, *, seed: int) -> None:
    rng = np.random.default_rng(seed)
    idx = rng.choice(split.train, size=min(16, len(split.train)), replace=False)
    titles = [f"{cells.class_names[cells.labels[i]]}\n{cells.patients[i]}" for i in idx]
    save_cell_grid(cells.images[idx], titles, path)
