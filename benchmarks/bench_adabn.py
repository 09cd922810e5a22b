"""Benchmark: batch-norm statistics re-estimated on each field's own cells (AdaBN) — a test-time
candidate for issue 19, measured on whole IML fields and on NIH bags, and not kept.

Usage::

    python benchmarks/bench_adabn.py [--compare NAME=RUN ...] [--record adabn_candidates]

AdaBN (Li, Wang, Shi, Hou & Liu 2018, "Adaptive batch normalization for practical domain
adaptation", Pattern Recognition 80) replaces a network's BatchNorm statistics, learnt on the
training site, by those of the unlabelled cells being screened: no label and no training. The
unit here is what ``smear`` screens independently: **one field** (its detections, cut as ``smear``
cuts them); on NIH, one bag of 1,000 test-patient cells. Modes, for the bundled model (``seed0``)
and every ``--compare`` run folder:

- ``none``: the model as ``smear`` runs it (reproduces ``bench_quantify``'s figures);
- ``bn1`` (the setting fixed before the runs): only the stem's BatchNorm (``features.0.1``, colour
  and stain level) re-estimated on the unit's cells;
- ``bn1u`` (a variant added after ``bn1`` failed on the NIH bags, before it was run): the unit's
  stem statistics mapped onto those of the model's NIH **training Uninfected** cells
  (un-augmented, every k-th of them, about 8,000), instead of onto the training mixture, so that
  the unit's prevalence does not leak into the normalisation;
- ``all`` (reference, not a candidate): every BatchNorm re-estimated (AdaBN as published).

Figures per model and mode (``NAME.MODE.`` prefix):

- ``iml.*``: the 120 IML_Malaria dev fields (never trained on) scored by ``bench_quantify``'s own
  IML protocol (``run_iml``): ``fixed.prior.*`` out of the box (``smear``'s 2 % prior correction),
  ``cv_sens.*`` with the operating point chosen in blocked folds;
- ``iml.det.sens_at_fpr_0.002`` / ``0.005``: the ranking among ``smear``'s detections, as
  ``bench_same_cell.py`` defines it (detections matched to infected boxes at IoU >= 0.5, counted
  over all infected boxes);
- ``nih.em_mae_pp`` / ``nih.prior_mae_pp`` / ``nih.cc_mae_pp``: point estimates on
  ``bench_quantify``'s NIH bags (the same 21 prevalences 0-20 % x 10 bags of 1,000 test-patient
  cells, same seeds), each bag adapted on itself; ``nih.bag_accuracy``: the cells' accuracy at
  the model's threshold, averaged over bags.

The rule (written before the runs, the same as for the training candidates on the model card):
a mode would become the default only if, seed for seed, it finds more infected IML cells out of
the box at a PPV of 0.5 or more, with EM's MAE on the NIH bags within 0.45 points.
Data: ``--data`` (default ``$MALARIA_SCREEN_DATA`` or ``../shared/data``). About 12 minutes for
three models on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
MODES = ("none", "bn1", "bn1u", "all")
REFERENCE_CELLS = 8000  # about this many training Uninfected cells give the bn1u reference


def stem_reference(net, config, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the stem convolution's output over cells ``x``.

    Parameters
    ----------
    net : CellNet-like torch module with ``features[0][0]`` the stem convolution
    config : TrainConfig (its ``mean``/``std`` normalise the pixels)
    x : (N, S, S, 3) uint8 letterboxed cells

    Returns
    -------
    mean, var : (C,) float32 arrays
    """
    import torch

    from malaria_screen.data.normalize import normalize_pixels

    with torch.no_grad():
        z = net.features[0][0](normalize_pixels(torch.from_numpy(x).permute(0, 3, 1, 2), config.mean, config.std))
    return z.mean(dim=(0, 2, 3)).numpy(), z.var(dim=(0, 2, 3)).numpy()


def adapted_probs(pred, x: np.ndarray, mode: str, reference: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """P(Parasitized) of cells ``x`` after re-estimating BatchNorm statistics on ``x`` itself.

    Parameters
    ----------
    pred : malaria_screen.inference.predictor.Predictor (torch model on the CPU)
    x : (N, S, S, 3) uint8 letterboxed cells: the unit (one field, one bag)
    mode : one of :data:`MODES`
    reference : the stem's training-Uninfected statistics (:func:`stem_reference`), for ``bn1u``

    Returns
    -------
    (N,) float64 array. The model's statistics are restored afterwards.
    """
    import torch

    from malaria_screen.data.normalize import normalize_pixels

    net = pred.net
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
    try:
        if mode != "none" and len(x):
            for m in (bns if mode == "all" else bns[:1]):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: after one pass, the unit's own statistics
                m.train()
            with torch.no_grad():
                net(normalize_pixels(torch.from_numpy(x).permute(0, 3, 1, 2), pred.config.mean, pred.config.std))
            net.eval()
            if mode == "bn1u":  # z' = (z - mu_t) sd_U / sd_t + mu_U, then the trained normalisation
                mu_s, var_s = saved[0][0], saved[0][1]
                mu_t, var_t = bns[0].running_mean.clone(), bns[0].running_var.clone()
                mu_u, var_u = (torch.from_numpy(np.asarray(a)) for a in reference)
                k = torch.sqrt(var_t / var_u)
                bns[0].running_mean.copy_(mu_t - (mu_u - mu_s) * k)
                bns[0].running_var.copy_(var_s * k * k)
        return pred.predict_proba_prepared(x)[:, pred.positive_index].astype(np.float64)
    finally:
        for m, (mu, var, mom) in zip(bns, saved):
            m.running_mean.copy_(mu)
            m.running_var.copy_(var)
            m.momentum = mom
        net.eval()


def iml_detections(iml: Path) -> dict:
    """Every IML dev field segmented and cut as ``smear`` does: per field its crops, boxes, border flags."""
    from malaria_screen.data.io import check_colour, decode_image
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.segment import segment_field

    out = {}
    for name in sorted(load_iml_annotations(iml / "annotations.json")):
        rgb = check_colour(decode_image(iml / "images" / name))
        seg = segment_field(rgb)
        props = seg.cells()
        out[name] = {"crops": cell_crops(rgb, seg.labels, props) if props else [],
                     "boxes": np.asarray([c.bbox for c in props], np.float64).reshape(-1, 4),
                     "border": np.asarray([c.border for c in props], bool), "shape": rgb.shape[:2]}
    return out


def detection_labels(fields: dict, ann: dict) -> tuple[list[np.ndarray], int]:
    """Per field, 1 for each detection matched one-to-one (IoU >= 0.5) to an infected box, else 0;
    and the number of infected boxes ('difficult' boxes left out, as in ``bench_same_cell``)."""
    from malaria_screen.smear.boxes import match_boxes

    ys, n_inf = [], 0
    for name, f in fields.items():
        boxes = [b for b in ann[name] if not b.ignored]
        n_inf += sum(b.infected for b in boxes)
        pairs = dict(match_boxes(f["boxes"], np.asarray([b.bbox for b in boxes], np.float64).reshape(-1, 4)))
        ys.append(np.asarray([int(i in pairs and boxes[pairs[i]].infected) for i in range(len(f["boxes"]))], int))
    return ys, n_inf


def score_model(name: str, run: Path | None, root: Path, dets: dict, ann: dict, args) -> dict:
    """The module docstring's figures for one model, every mode."""
    import quapy as qp
    from _quantify_cache import nih_posteriors
    from bench_quantify import run_iml
    from bench_same_cell import sens_at_fpr

    from malaria_screen.evaluation import quantify as q
    from malaria_screen.inference import load_model
    from malaria_screen.inference.base import default_model_dir
    from malaria_screen.inference.predictor import Predictor

    model_dir = default_model_dir() if run is None else run
    pred = Predictor.from_dir(model_dir)
    nih_root = root / "nih_cell_images"
    nih = nih_posteriors(load_model(None if run is None else str(run)), model_dir, nih_root, Path(args.cache) / name)
    threshold = float(pred.threshold)
    nih["train_prior"] = q.params_from_model(pred).train_prior
    split = json.loads((model_dir / "split.json").read_text())
    unin = [f for f in split["splits"]["train"]["files"] if f.startswith("Uninfected/")]
    unin = unin[:: max(1, len(unin) // REFERENCE_CELLS)]
    reference = stem_reference(pred.net, pred.config, pred.prepare_all([str(nih_root / f) for f in unin]))
    x_test = pred.prepare_all([str(nih_root / f) for f in nih["test"]["files"]])
    y_test = nih["test"]["y"].astype(int)
    coll = qp.data.LabelledCollection(nih["test"]["p"], y_test, classes=[0, 1])
    prevs = np.round(np.linspace(0.0, 0.20, 21), 4)
    bags = [coll.sampling_index(1000, 1.0 - prev, random_state=1000 * i + r) for i, prev in enumerate(prevs) for r in range(10)]
    methods = {"em": q.EMQ(nih["train_prior"]), "prior": q.PriorCorrected(q.DEFAULT_TARGET_PRIOR, nih["train_prior"], threshold),
               "cc": q.ClassifyAndCount(threshold)}
    x_iml = {n: pred.prepare_all(f["crops"]) if f["crops"] else np.zeros((0, pred.input_size, pred.input_size, 3), np.uint8)
             for n, f in dets.items()}
    ys, n_inf = detection_labels(dets, ann)
    fig: dict = {f"{name}.n_reference_cells": len(unin)}
    for mode in MODES:
        t0 = time.perf_counter()
        fields = {n: {"boxes": f["boxes"], "border": f["border"], "shape": f["shape"],
                      "p": adapted_probs(pred, x_iml[n], mode, reference)} for n, f in dets.items()}
        with contextlib.redirect_stdout(io.StringIO()):  # run_iml prints every fold
            iml_fig = run_iml(SimpleNamespace(folds=5, slide_fields=8, ppv_floor=0.5), np, q, nih,
                              {"fields": fields, "failed": {}}, ann, threshold)
        pre = f"{name}.{mode}."
        for k in ("fixed.prior.infected_sensitivity", "fixed.prior.infected_ppv", "fixed.prior.n_called",
                  "fixed.prior.field.mae_pp", "fixed.prior.field.pearson_r", "cv_sens.infected_sensitivity",
                  "cv_sens.infected_ppv", "const_1.3.field.mae_pp"):
            fig[pre + "iml." + k] = iml_fig[k]
        p_all, y_all = np.concatenate([fields[n]["p"] for n in dets]), np.concatenate(ys)
        for fpr in (0.002, 0.005):
            fig[pre + f"iml.det.sens_at_fpr_{fpr}"] = sens_at_fpr(p_all[y_all == 1], p_all[y_all == 0], fpr, n_pos=n_inf)
        errs: dict[str, list[float]] = {k: [] for k in methods}
        accs = []
        p_none = adapted_probs(pred, x_test, "none") if mode == "none" else None
        for idx in bags:
            p = p_none[idx] if p_none is not None else adapted_probs(pred, x_test[idx], mode, reference)
            truth = y_test[idx].mean()
            accs.append(float(((p > threshold) == y_test[idx]).mean()))
            for k, m in methods.items():
                errs[k].append(abs(m.predict(p) - truth))
        fig |= {pre + f"nih.{k}_mae_pp": 100 * float(np.mean(v)) for k, v in errs.items()}
        fig[pre + "nih.bag_accuracy"] = float(np.mean(accs))
        print(f"{name} {mode:5s}: IML out of the box sens {fig[pre + 'iml.fixed.prior.infected_sensitivity']:.3f} "
              f"PPV {fig[pre + 'iml.fixed.prior.infected_ppv']:.3f} ({fig[pre + 'iml.fixed.prior.n_called']} called), "
              f"blocked folds {fig[pre + 'iml.cv_sens.infected_sensitivity']:.3f} / {fig[pre + 'iml.cv_sens.infected_ppv']:.3f}, "
              f"detections sens@FPR0.5% {fig[pre + 'iml.det.sens_at_fpr_0.005']:.3f}; NIH bags EM MAE "
              f"{fig[pre + 'nih.em_mae_pp']:.2f} pp, accuracy {fig[pre + 'nih.bag_accuracy']:.4f} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    fig["n_iml_fields"], fig["n_iml_infected_boxes"], fig["n_nih_bags"] = len(dets), n_inf, len(bags)
    fig["n_nih_test_cells"] = int(len(y_test))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default $MALARIA_SCREEN_DATA or ../shared/data)")
    ap.add_argument("--compare", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--cache", default="bench_out/adabn", help="folder for the cached NIH posteriors")
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE))
    from malaria_screen.smear.labels import load_iml_annotations

    root = Path(args.data or os.environ.get("MALARIA_SCREEN_DATA") or HERE.parent / ".." / "shared" / "data")
    iml = root / "iml_malaria_dev"
    ann = load_iml_annotations(iml / "annotations.json")
    t0 = time.perf_counter()
    dets = iml_detections(iml)
    print(f"{len(dets)} IML fields segmented in {time.perf_counter() - t0:.0f} s", flush=True)
    models: dict[str, Path | None] = {"seed0": None}
    models.update((n, Path(p)) for n, _, p in (s.partition("=") for s in args.compare))
    fig: dict = {}
    for name, run in models.items():
        fig |= score_model(name, run, root, dets, ann, args)
    if args.record:
        from records import write_record

        notes = ("AdaBN (Li et al. 2018) at test time, a candidate for issue 19 (not kept). Unit: one IML field (smear's "
                 "detections and crops) / one NIH bag. Modes: none (as smear runs), bn1 (stem BatchNorm re-estimated on the "
                 "unit; fixed before the runs), bn1u (post-hoc variant after bn1 failed on the NIH bags: the unit's stem "
                 "statistics mapped onto the model's NIH training Uninfected cells), all (every BatchNorm; reference). "
                 "iml.*: the 120 IML_Malaria dev fields (never trained on) through bench_quantify.run_iml (fixed.prior: "
                 "out of the box; cv_sens: operating point chosen in 5 blocked folds of contiguous frames); iml.det.*: "
                 "bench_same_cell's ranking among smear's detections. nih.*: bench_quantify's bags (21 prevalences 0-20 % x "
                 "10 bags of 1,000 of each model's TEST patients' cells, same seeds), point estimates, each bag adapted on "
                 "itself. Models: " + ", ".join(f"{n}={p if p is not None else 'bundled'}" for n, p in models.items())
                 + ". Rule written before the runs: seed for seed more infected IML cells out of the box at PPV >= 0.5 and "
                 "NIH-bag EM MAE <= 0.45 pp. These IML fields judged the candidate (dev fields, not hidden).")
        write_record(args.record, fig, notes=notes, uses_bundled_model=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
