"""Benchmark: the held-out figures of a cell model for its model card (``docs/model-card.md``).

Usage::

    python benchmarks/bench_model_card.py --data ../shared/data [--model RUN_DIR] [--compare RUN_DIR]
        [--iml-crops DIR] [--record model_card]

For ``--model`` (default: the bundled model) and, for comparison, ``--compare`` (e.g. the
previously bundled model), on data none of them was trained on unless said:

- NIH validation and test patients of ``--model``'s own ``split.json`` (cells decoded from
  ``<data>/nih_cell_images``): accuracy, sensitivity, specificity, ROC-AUC with 95 % percentile
  bootstrap CIs over patients. Validation patients helped choose the recipe; test patients did not.
- Chula-RBC-12 red cells (no malaria; cut as in training by
  :func:`malaria_screen.data.extra_negatives.point_cell_set`): specificity on the fields left out of
  the model's training (``extra_negative_fields``), CI by bootstrap over fields.
- IML_Malaria dev box crops, black outside the cell (``--iml-crops``: an NIH-layout folder written
  by ``malaria_screen.smear.crops.export_annotation_crops`` with ``mask_cells=True``; written to a
  temporary folder when not given; never into the repo): cell ROC-AUC with a CI by bootstrap over
  fields, and sensitivity at specificity 0.95. No IML data chose anything.

The record (``benchmarks/results/<record>.json``) is marked ``uses_bundled_model`` when ``--model``
is the bundled model. The constant-answer baseline is printed beside each figure (accuracy of
always answering the majority class; ROC-AUC 0.5; specificity 1.0 of always "Uninfected").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402


def _field_bootstrap(values_by_group: list[np.ndarray], stat, *, n_boot: int = 1000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    n = len(values_by_group)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        v = stat([values_by_group[i] for i in pick])
        if v is not None and np.isfinite(v):
            out.append(v)
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))] if len(out) >= 10 else [float("nan")] * 2


def _auc_groups(groups):
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([g[0] for g in groups])
    p = np.concatenate([g[1] for g in groups])
    return roc_auc_score(y, p) if 0 < y.sum() < len(y) else None


def sens_at_spec(y: np.ndarray, p: np.ndarray, spec: float = 0.95) -> float:
    """Sensitivity at the threshold where specificity first reaches ``spec``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    ok = fpr <= 1 - spec
    return float(tpr[ok].max()) if ok.any() else 0.0


def run_dirs(model_dir: Path) -> list[Path]:
    """The run folders behind a model folder: itself, or an ensemble folder's members
    (``malaria-screen ensemble``)."""
    from malaria_screen.inference.ensemble import is_ensemble_dir

    if is_ensemble_dir(model_dir):
        spec = json.loads((model_dir / "ensemble.json").read_text())
        return [model_dir / m for m in spec["members"]]
    return [model_dir]


def heldout_chula_fields(model_dir: Path, chula: Path) -> list[str]:
    """Chula fields a model (every member of an ensemble) was not trained on (all, for a model
    trained without them)."""
    from malaria_screen.config import TrainConfig
    from malaria_screen.data.extra_negatives import list_point_fields, trained_fields

    used = {f for d in run_dirs(model_dir) for f in trained_fields(TrainConfig.from_json(d / "config.json"), chula)}
    return [s for s in list_point_fields(chula) if s not in used]


def _split_manifest(model_dir: Path) -> dict:
    """The model's ``split.json``; an ensemble's members must share their validation and test patients."""
    mans = [json.loads((d / "split.json").read_text()) for d in run_dirs(model_dir)]
    for m in mans[1:]:
        for name in ("val", "test"):
            if set(m["splits"][name]["patients"]) != set(mans[0]["splits"][name]["patients"]):
                raise ValueError(f"{model_dir}: the members' {name} patients differ; no common held-out split")
    return mans[0]


def evaluate_model(model_dir: Path, data: Path, iml_crops, cache_dir: str | None, chula_fields: list[str] | None = None) -> dict:
    """All figures of one model folder (see the module docstring); Chula on ``chula_fields``
    (default: the fields it was not trained on); ``iml_crops``: ``size_px -> CellSet`` of the IML
    crops at the model's input size, or None."""
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.data.extra_negatives import point_cell_set
    from malaria_screen.evaluation.metrics import evaluate_predictions
    from malaria_screen.inference import load_model
    from malaria_screen.training.run import split_from_manifest

    pred = load_model(model_dir, backend="torch")  # a run folder, or an ensemble of run folders
    pos = pred.positive_index
    fig: dict = {}
    cells = load_cell_set(data / "nih_cell_images", size_px=pred.input_size, cache_dir=cache_dir, progress=False)
    manifest = _split_manifest(model_dir)
    split = split_from_manifest(manifest, cells.relpaths)
    for name in ("val", "test"):
        idx = getattr(split, name)
        sub = cells.subset(idx)
        p = pred.predict_proba_prepared(sub.images)[:, pos]
        y = (np.asarray(sub.labels) == sub.class_names.index(pred.class_names[pos])).astype(int)
        m = evaluate_predictions(y, p, sub.patients, threshold=pred.threshold)
        for k in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            fig[f"nih_{name}.{k}"] = m[k]
            fig[f"nih_{name}.{k}_ci_lo"], fig[f"nih_{name}.{k}_ci_hi"] = m["ci95"][k]
        fig[f"nih_{name}.n_patients"], fig[f"nih_{name}.n_cells"] = m["n_patients"], m["n_cells"]
        fig[f"nih_{name}.majority_accuracy"] = max(y.mean(), 1 - y.mean())
    chula = data / "chula_rbc"
    held = chula_fields if chula_fields is not None else heldout_chula_fields(model_dir, chula)
    if set(held) - set(heldout_chula_fields(model_dir, chula)):
        raise ValueError(f"{model_dir} was trained on some of the Chula fields to evaluate")
    cs = point_cell_set(chula, size_px=pred.input_size, class_names=pred.class_names, fields=held)
    if len(cs):
        p = pred.predict_proba_prepared(cs.images)[:, pos]
        neg = p < pred.threshold
        groups = [neg[np.asarray(cs.patients) == g] for g in sorted(set(cs.patients))]
        fig["chula_heldout.specificity"] = float(neg.mean())
        fig["chula_heldout.specificity_ci_lo"], fig["chula_heldout.specificity_ci_hi"] = _field_bootstrap(
            groups, lambda gs: float(np.concatenate(gs).mean()))
        fig["chula_heldout.n_fields"], fig["chula_heldout.n_cells"] = len(groups), int(len(cs))
    if iml_crops is not None:
        iml_cells = iml_crops(pred.input_size)
        p = pred.predict_proba_prepared(iml_cells.images)[:, pos]
        y = (np.asarray(iml_cells.labels) == iml_cells.class_names.index("Parasitized")).astype(int)
        pats = np.asarray(iml_cells.patients)
        groups = [(y[pats == g], p[pats == g]) for g in sorted(set(pats.tolist()))]
        fig["iml_crops.roc_auc"] = _auc_groups(groups)
        fig["iml_crops.roc_auc_ci_lo"], fig["iml_crops.roc_auc_ci_hi"] = _field_bootstrap(groups, _auc_groups)
        fig["iml_crops.sens_at_spec95"] = sens_at_spec(y, p, 0.95)
        fig["iml_crops.specificity_at_threshold"] = float((p[y == 0] < pred.threshold).mean())
        fig["iml_crops.sensitivity_at_threshold"] = float((p[y == 1] >= pred.threshold).mean())
        fig["iml_crops.n_fields"], fig["iml_crops.n_cells"], fig["iml_crops.n_parasitized"] = len(groups), int(len(y)), int(y.sum())
    return fig


def model_figures(model_dir: Path) -> dict:
    """Parameters, split counts (NIH patients/cells per split, Chula cells/fields in training) and training time."""
    from malaria_screen.config import TrainConfig
    from malaria_screen.models import build_model, count_parameters

    cfg = TrainConfig.from_json(model_dir / "config.json")
    out: dict = {"params": count_parameters(build_model(cfg.model, input_size=cfg.input_size)), "baseline.roc_auc": 0.5}
    splits = json.loads((model_dir / "split.json").read_text())["splits"]
    for name, part in splits.items():
        extra = [f for f in part["files"] if "#" in f]
        nih_pats = [pt for pt in part["patients"] if ":" not in pt]
        key = "train_nih" if name == "train" else name
        out[f"split.{key}_patients"], out[f"split.{key}_cells"] = len(nih_pats), part["n_cells"] - len(extra)
        if name == "train":
            out["split.chula_train_cells"] = len(extra)
            out["split.chula_train_fields"] = len([pt for pt in part["patients"] if ":" in pt])
    info = json.loads((model_dir / "train_info.json").read_text())
    if "seconds_per_epoch" in info:
        out["train.seconds_per_epoch"] = info["seconds_per_epoch"]
    return out


def sample_score() -> dict:
    """The demo's count on the bundled samples with the bundled model (as ``make demo`` loads it)."""
    import malaria_screen
    from malaria_screen.inference.base import seen_patients
    from malaria_screen.data.patients import parse_nih_patient_id

    samples = Path(malaria_screen.__file__).parent / "assets" / "samples"
    files = sorted(samples.glob("*/*.png"))
    model = malaria_screen.load_model()
    p = model.predict(files)
    calls = np.where(p >= model.threshold, "Parasitized", "Uninfected")
    truth = np.asarray([f.parent.name for f in files])
    seen = seen_patients(model)
    held = np.asarray([parse_nih_patient_id(f.name) not in (seen["train"] | seen["val"]) for f in files])
    return {"samples.k_right_held_out": int((calls == truth)[held].sum()), "samples.n_held_out": int(held.sum()),
            "samples.n": len(files), "samples.n_from_seen_patients": int((~held).sum()),
            "samples.n_held_out_patients": len({parse_nih_patient_id(f.name) for f, h in zip(files, held) if h}),
            "samples.n_patients": len({parse_nih_patient_id(f.name) for f in files})}


def load_iml_crops(data: Path, crops_dir: str | None):
    """The IML dev box crops (masked black outside the cell): a function ``size_px -> CellSet``
    (grouped by field, loaded once per size), the crops written once."""
    from malaria_screen.data.dataset import load_cell_set

    if crops_dir is None:
        from malaria_screen.smear.crop_export import export_annotation_crops
        from malaria_screen.smear.labels import load_iml_annotations

        crops_dir = tempfile.mkdtemp(prefix="iml_crops_")
        iml = data / "iml_malaria_dev"
        export_annotation_crops(iml / "images", load_iml_annotations(iml / "annotations.json"), crops_dir, mask_cells=True)
    d = Path(crops_dir)
    sets: dict = {}

    def at(size_px: int):
        if size_px not in sets:
            sets[size_px] = load_cell_set(d, size_px=size_px, cache_dir="", groups_csv=d / "groups.csv", progress=False)
        return sets[size_px]

    return at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MALARIA_SCREEN_DATA", "../shared/data"))
    ap.add_argument("--model", default=None, help="Run folder; default the bundled model")
    ap.add_argument("--compare", action="append", default=[], help="NAME=RUN_DIR of a model to compare (repeatable)")
    ap.add_argument("--iml-crops", default=None)
    ap.add_argument("--record", default=None, help="Record name to write (default: none)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="Also write the figures to this JSON file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from malaria_screen.inference import default_model_dir

    data = Path(args.data)
    bundled = args.model is None
    model = default_model_dir() if bundled else Path(args.model)
    iml = load_iml_crops(data, args.iml_crops) if (data / "iml_malaria_dev").is_dir() else None
    figures = evaluate_model(model, data, iml, args.cache_dir)
    figures.update(model_figures(model))
    if bundled:
        figures.update(sample_score())
    for spec in args.compare:
        name, _, path = spec.partition("=")
        fields = heldout_chula_fields(model, data / "chula_rbc")
        for k, v in evaluate_model(Path(path), data, iml, args.cache_dir, chula_fields=fields).items():
            figures[f"{name}.{k}"] = v
    for k, v in figures.items():
        print(f"{k:48s} {v:.4f}" if isinstance(v, float) else f"{k:48s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if args.record:
        notes = ("NIH: the model's own split.json (patient-level); val patients chose the recipe, test patients did not; "
                 "95% CIs: percentile bootstrap over patients (NIH) or fields (Chula, IML), 1000 replicates, seed 0. "
                 "Chula: fields left out of training only. IML: 120 dev fields' annotation boxes, black outside the cell "
                 "(box_cell_mask), never trained on; docs/model-card.md says which choices they informed (development figures). "
                 "An ensemble folder (malaria-screen ensemble) is scored as one model on its members' common split. Baselines: ROC-AUC 0.5; majority-class "
                 "accuracy given as *.majority_accuracy. Machine shared by other jobs (no timings here).")
        write_record(args.record, figures, notes=notes, uses_bundled_model=bundled)


if __name__ == "__main__":
    main()
