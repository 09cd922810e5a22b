"""Benchmark: the same IML cells scored from the annotators' box crops and from `smear`'s own
crops, and where on the ROC curve a cell model's whole-field result is decided.

Usage::

    python benchmarks/bench_same_cell.py [--model RUN] [--compare NAME=RUN ...] \\
        [--quantify-record NAME=RECORD ...] [--record same_cell]

For ``--model`` (default: the bundled model) and every ``--compare`` model, on the 120 IML_Malaria
dev fields (never trained on):

- every field is screened as ``smear`` screens it (:func:`malaria_screen.smear.screen.screen_field`,
  default settings), and every annotated box is cut as the model card's IML crops are
  (:func:`malaria_screen.smear.crop_export.annotation_crop`: box plus 2 px, black outside the cell;
  ``difficult`` boxes left out);
- detections are matched one-to-one to the boxes (:func:`malaria_screen.smear.boxes.match_boxes`,
  IoU >= 0.5).

Figures per model (prefix ``NAME.`` for ``--compare``):

- ``box.roc_auc``: all box crops (the model card's "IML crops ROC-AUC");
  ``box.sens_at_fpr_0.002`` / ``0.005``: their sensitivity where the false-positive rate among the
  Uninfected box crops is 0.2 % / 0.5 %;
- ``matched.box_roc_auc`` / ``matched.seg_roc_auc``: the boxes that have a detection, scored from the
  annotator's crop and from `smear`'s crop of the same cell;
- ``fields.sens_at_fpr_0.002`` / ``0.005``: every detection, positive when matched to an infected
  box, negative otherwise (matched to an uninfected box, or to no box: debris, pieces, cells the
  annotators left out); sensitivity counted over **all** infected boxes, so infected cells without
  a detection count as missed;
- ``n_*`` counts.

At IML's prevalence (about 1.4 % infected cells) a PPV of 0.5 needs a false-positive rate of about
half the prevalence times the sensitivity, i.e. a few tenths of a per cent: the 0.2 % and 0.5 %
points are where `smear`'s result is decided, far left of where a ROC-AUC is made.

With ``--quantify-record NAME=RECORD`` (``bench_quantify.py``'s ``RECORD_iml`` for model ``NAME``;
``model`` for ``--model``) the record also holds the Spearman rank correlation, over the models
given, of each proxy above with the whole-field infected-cell sensitivity out of the box
(``fixed.prior.infected_sensitivity``). No choice is made here: the figures describe models already
chosen or rejected.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

FPRS = (0.002, 0.005)


def sens_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float, n_pos: int | None = None) -> float:
    """Share of ``n_pos`` (default ``len(pos)``) positives scored above the (1 - fpr) quantile of ``neg``."""
    t = float(np.quantile(neg, 1.0 - fpr))
    return float((pos > t).sum() / (len(pos) if n_pos is None else n_pos))


def score_model(model_path: Path | None, iml: Path) -> dict[str, float]:
    """The figures of the module docstring for one model (None: the bundled model)."""
    from sklearn.metrics import roc_auc_score

    from malaria_screen import load_model
    from malaria_screen.data.io import check_colour, decode_image
    from malaria_screen.smear.boxes import match_boxes
    from malaria_screen.smear.crop_export import annotation_crop
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.screen import screen_field

    model = load_model(None if model_path is None else str(model_path))
    ann = load_iml_annotations(iml / "annotations.json")
    y, p_box, p_seg = [], [], []  # per annotated box; p_seg NaN without a detection
    other_dets = []  # detections matched to no box
    for name in sorted(ann):
        rgb = check_colour(decode_image(iml / "images" / name))
        res = screen_field(rgb, model, image_name=name)
        boxes, crops = [], []
        for b in ann[name]:
            c = None if b.ignored else annotation_crop(rgb, b.bbox)
            if c is not None:
                boxes.append(b)
                crops.append(c)
        pb = np.asarray(model.predict(crops), np.float64) if crops else np.zeros(0)
        det_boxes = np.asarray([c.bbox for c in res.cells], np.float64).reshape(-1, 4)
        det_p = np.asarray([c.p_parasitized for c in res.cells], np.float64)
        pairs = dict((g, i) for i, g in match_boxes(det_boxes, np.asarray([b.bbox for b in boxes]).reshape(-1, 4)))
        for g, b in enumerate(boxes):
            y.append(int(b.infected))
            p_box.append(pb[g])
            p_seg.append(det_p[pairs[g]] if g in pairs else np.nan)
        matched = set(pairs.values())
        other_dets += [det_p[i] for i in range(len(det_p)) if i not in matched]
    y, p_box, p_seg, other = np.asarray(y), np.asarray(p_box), np.asarray(p_seg), np.asarray(other_dets)
    m = ~np.isnan(p_seg)
    n_inf = int(y.sum())
    fig: dict[str, float] = {
        "n_fields": len(ann), "n_boxes": int(len(y)), "n_infected_boxes": n_inf,
        "n_infected_detected": int(y[m].sum()), "n_uninfected_detected": int((y[m] == 0).sum()),
        "n_detections_without_box": int(len(other)),
        "box.roc_auc": float(roc_auc_score(y, p_box)),
        "matched.box_roc_auc": float(roc_auc_score(y[m], p_box[m])),
        "matched.seg_roc_auc": float(roc_auc_score(y[m], p_seg[m])),
    }
    neg_fields = np.concatenate([p_seg[m & (y == 0)], other])
    for fpr in FPRS:
        fig[f"box.sens_at_fpr_{fpr}"] = sens_at_fpr(p_box[y == 1], p_box[y == 0], fpr)
        fig[f"fields.sens_at_fpr_{fpr}"] = sens_at_fpr(p_seg[m & (y == 1)], neg_fields, fpr, n_pos=n_inf)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("MALARIA_SCREEN_DATA", "../shared/data"))
    ap.add_argument("--model", default=None, help="Run folder; default the bundled model")
    ap.add_argument("--compare", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--quantify-record", action="append", default=[],
                    help="NAME=RECORD: bench_quantify's record of that model ('model' for --model)")
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    iml = Path(args.data) / "iml_malaria_dev"
    models = {"model": None if args.model is None else Path(args.model)}
    models.update((n, Path(p)) for n, _, p in (s.partition("=") for s in args.compare))
    per: dict[str, dict[str, float]] = {}
    figures: dict[str, float] = {}
    for name, path in models.items():
        per[name] = score_model(path, iml)
        print(name, json.dumps({k: round(v, 4) for k, v in per[name].items()}), flush=True)
        figures.update({(k if name == "model" else f"{name}.{k}"): v for k, v in per[name].items()})
    if args.quantify_record:
        from scipy.stats import spearmanr

        results = Path(__file__).parent / "results"
        oob = {}
        for spec in args.quantify_record:
            n, _, rec = spec.partition("=")
            oob[n] = json.loads((results / f"{rec}_iml.json").read_text())["figures"]["fixed.prior.infected_sensitivity"]
        names = [n for n in models if n in oob]
        figures["rank.n_models"] = len(names)
        target = [oob[n] for n in names]
        for key in ("box.roc_auc", "matched.seg_roc_auc", *(f"{w}.sens_at_fpr_{f}" for w in ("box", "fields") for f in FPRS)):
            figures[f"rank.spearman.{key}"] = float(spearmanr([per[n][key] for n in names], target).statistic)
            print(f"Spearman with whole-field sensitivity out of the box, {key}: {figures[f'rank.spearman.{key}']:.2f}")
    if args.record:
        from records import write_record

        notes = ("120 IML_Malaria dev fields (never trained on), screened with smear's defaults; annotated boxes cut as the "
                 "model card's IML crops (box + 2 px, black outside box_cell_mask), 'difficult' boxes left out; detections "
                 "matched one-to-one to boxes at IoU >= 0.5. fields.sens_at_fpr_*: positives = detections matched to an "
                 "infected box, counted over all infected boxes; negatives = every other detection. rank.spearman.*: over "
                 "the models of this record, against bench_quantify's fixed.prior.infected_sensitivity of each. Models: "
                 + ", ".join(f"{n}={p if p is not None else 'bundled'}" for n, p in models.items())
                 + ". Describes models already chosen or rejected; no choice made on these figures.")
        write_record(args.record, figures, notes=notes, uses_bundled_model=args.model is None)


if __name__ == "__main__":
    main()
