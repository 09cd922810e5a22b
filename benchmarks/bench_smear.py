"""Benchmark whole-smear screening on the IML_Malaria dev fields and the Chula-RBC-12 fields.

Prints RBC detection precision/recall/F1 at IoU >= 0.5 (strict, and with unmatched border-cut
detections not counted, since IML leaves most edge cells unboxed), infected-cell sensitivity and
PPV, per-field parasitemia absolute error (mean, max; percentage points) and Pearson r beside
the constant-1.3 % baseline on the same fields (95 % CIs by bootstrap over fields), seconds per
field, and the Chula red-cell count errors.

Usage::

    PYTHONPATH=src python benchmarks/bench_smear.py                 # bundled default model
    PYTHONPATH=src python benchmarks/bench_smear.py --model runs/x  # a trained run folder
    PYTHONPATH=src python benchmarks/bench_smear.py --no-classify   # segmentation only

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root).
Set the thread count with ``--threads`` (default 2, the target machine).

Which fields these figures come from (docs/evaluation-protocol.md): the segmentation was designed
and its parameters tuned on all 120 IML development fields (and checked on the Chula fields), so
every IML figure here is a **design figure** (in-sample for the segmentation), not a held-out
one; the bundled cell model never saw an IML field. The box-convention scale is fitted on fields
1-40 and F1 is also shown on fields 41-120, which did not set that scale but did shape the
segmentation. The trivial baseline beside the parasitemia error is a constant parasitemia per
field. A full run (no ``--limit``) writes ``benchmarks/results/bench_smear[_no_classify].json``
(``benchmarks/records.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _box_convention(iml: Path, pixel_size_um: float | None, f) -> dict:
    """Strict F1 again with detection boxes scaled to IML's box convention; returns the figures.

    Detection boxes are tight around the cell mask; IML's boxes carry a margin. The scale is the
    median ``sqrt(annotated area / detected area)`` over the strict matches of fields 1-40; F1 is
    then reported on all fields and on fields 41-120 alone, which did not set the scale but, like
    all 120 dev fields, were used to design the segmentation (docs/evaluation-protocol.md).
    """
    import numpy as np

    from malaria_screen.smear.evaluate import match_iml_fields
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.scoring import summarize_iml
    from malaria_screen.smear.segment import SegmentConfig

    ann = load_iml_annotations(iml / "annotations.json")
    names = sorted(ann)
    strict, _ = match_iml_fields(iml / "images", ann, None, names=names[:40], segment_config=SegmentConfig(pixel_size_um=pixel_size_um))
    scale = float(np.median([r for m in strict for r in m.extra["size_ratio"]]))
    conv, _ = match_iml_fields(iml / "images", ann, None, names=names, segment_config=SegmentConfig(pixel_size_um=pixel_size_um),
                              box_scale=scale)
    a, b = summarize_iml(conv), summarize_iml(conv[40:])
    print(f"  boxes scaled x{scale:.3f} to IML's convention (median annotated/detected size, fields 1-40):")
    print(f"    all fields   P {f(a['rbc_precision'])}  R {f(a['rbc_recall'])}  F1 {f(a['rbc_f1'])}")
    print(f"    fields 41-{len(names)} P {f(b['rbc_precision'])}  R {f(b['rbc_recall'])}  F1 {f(b['rbc_f1'])}  "
          "(did not set the scale; design fields of the segmentation)")
    return {"box_scale": scale, "box_scale.all.rbc_f1": a["rbc_f1"], "box_scale.fields_41_120.rbc_f1": b["rbc_f1"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model run folder (default: bundled default model)")
    ap.add_argument("--no-classify", action="store_true", help="segmentation only")
    ap.add_argument("--data", default=None, help="data root (default $MALARIA_SCREEN_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=None, help="first N IML fields only")
    ap.add_argument("--stain", default="none", choices=["none", "reinhard", "macenko"])
    ap.add_argument("--pixel-size-um", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch/OpenCV (default 2)")
    ap.add_argument("--no-box-convention", action="store_true", help="skip the F1 with boxes scaled to IML's convention")
    ap.add_argument("--json", default=None, help="also write all metrics to this JSON file")
    ap.add_argument("--no-record", action="store_true", help="write no benchmarks/results record (a full run writes one)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2

    cv2.setNumThreads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:  # pragma: no cover
        pass

    import numpy as np

    from malaria_screen.smear.evaluate import evaluate_chula, evaluate_dataset
    from malaria_screen.smear.segment import SegmentConfig

    root = Path(args.data or os.environ.get("MALARIA_SCREEN_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    iml = root / "iml_malaria_dev"
    chula = root / "chula_rbc"
    if not (iml / "annotations.json").is_file():
        print(f"IML data not found under {root}", file=sys.stderr)
        return 2

    model = None
    if not args.no_classify:
        from malaria_screen.inference import load_model

        try:
            model = load_model(args.model)
        except FileNotFoundError as exc:
            print(f"cannot load model ({exc}); use --model RUN_DIR or --no-classify", file=sys.stderr)
            return 2

    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        m = evaluate_dataset(iml / "images", iml / "annotations.json", model,
                             segment_config=SegmentConfig(pixel_size_um=args.pixel_size_um), stain=args.stain,
                             limit=args.limit, out_dir=tmp)
        per_field = _per_field(Path(tmp) / "per_field.csv")
    true_par = per_field["parasitemia_true"]
    wall = time.perf_counter() - t0

    def f(x, pct=False):
        if x is None:
            return "n/a"
        return f"{100 * x:.2f}%" if pct else f"{x:.4f}"

    print("Design figures: the segmentation was designed on all 120 IML dev fields (docs/evaluation-protocol.md)")
    print(f"IML_Malaria dev: {m['n_fields']} fields, {m['n_gt_rbc']} annotated RBC, {m['n_pred_rbc']} detected "
          f"({'model ' + str(getattr(model, 'source', '')) if model is not None else 'no classifier'}, stain={args.stain})")
    print(f"  RBC detection @IoU>=0.5   P {f(m['rbc_precision'])}  R {f(m['rbc_recall'])}  F1 {f(m['rbc_f1'])}")
    print(f"  (border FPs not counted)  P {f(m['rbc_precision_border_fp_ignored'])}  F1 {f(m['rbc_f1_border_fp_ignored'])}"
          f"  [{m['fp_border']} of {m['fp']} FPs are unmatched border-cut cells]")
    if "rbc_f1_interior" in m:
        print(f"  interior (cut cells out)  P {f(m['rbc_precision_interior'])}  R {f(m['rbc_recall_interior'])}  "
              f"F1 {f(m['rbc_f1_interior'])}  ({m['n_gt_rbc_interior']} interior boxes)")
    print(f"  infected cells            sensitivity {f(m['infected_sensitivity'])}  PPV {f(m['infected_ppv'])}"
          f"  ({m['n_gt_infected']} annotated, {m['n_pred_infected']} predicted)")
    mae = m["parasitemia_mae_pp"]
    mx = m["parasitemia_max_abs_err_pp"]
    print(f"  parasitemia abs error     mean {'n/a' if mae is None else f'{mae:.3f}'} pp  max {'n/a' if mx is None else f'{mx:.3f}'} pp")
    base = {c: float(np.mean(np.abs(100 * true_par - c))) for c in (0.0, BASELINE_PARASITEMIA_PCT)}
    print(f"  trivial baseline          constant {BASELINE_PARASITEMIA_PCT}% per field: MAE {base[BASELINE_PARASITEMIA_PCT]:.3f} pp; "
          f"constant 0%: {base[0.0]:.3f} pp (annotated mean {100 * float(np.mean(true_par)):.3f}%)")
    ci = _field_bootstrap(per_field, BASELINE_PARASITEMIA_PCT) if model is not None and len(true_par) > 1 else {}
    if ci:
        print(f"  per-field agreement       Pearson r {ci['parasitemia_r']:.3f} [{ci['parasitemia_r.ci95_lo']:.3f}, "
              f"{ci['parasitemia_r.ci95_hi']:.3f}]; MAE 95% CI [{ci['parasitemia_mae_pp.ci95_lo']:.3f}, "
              f"{ci['parasitemia_mae_pp.ci95_hi']:.3f}] pp (bootstrap over fields)")
    print(f"  detection floor           {m['infected_matched']} of {m['n_gt_infected']} infected boxes matched to a detection; "
          f"a perfect classifier of the detections: sensitivity {m['infected_sensitivity_perfect_classifier']:.3f}, "
          f"parasitemia MAE {m['parasitemia_mae_pp_perfect_classifier']:.3f} pp, r {m['parasitemia_r_perfect_classifier']:.3f}")
    print(f"  time                      {m['seconds_per_field_mean']:.3f} s/field mean, {m['seconds_per_field_median']:.3f} median "
          f"({args.threads} threads; total {wall:.1f} s incl. decoding)")

    conv = {} if args.no_box_convention else _box_convention(iml, args.pixel_size_um, f)

    if (chula / "images").is_dir():
        c = evaluate_chula(chula, segment_config=SegmentConfig(pixel_size_um=args.pixel_size_um))
        rel = [r["abs_rel_count_error"] for r in c["fields"]]
        full = [r for r in c["fields"] if r["n_points"] >= 0.5 * np.median([q["n_points"] for q in c["fields"]])]
        print(f"Chula-RBC-12: {c['n_fields']} labelled fields, RBC diameter median {c['rbc_diameter_px_median']:.1f} px")
        print(f"  count error   MAE {c['count_mae']:.2f} cells/field, mean rel {100 * c['count_mean_rel_error']:.1f}%, "
              f"median rel {100 * float(np.median(rel)):.1f}%, bias {c['count_bias']:+.2f}")
        if full:
            print(f"  fields with >= half the median label count ({len(full)}): MAE "
                  f"{np.mean([abs(r['count_error']) for r in full]):.2f}, mean rel "
                  f"{100 * np.mean([r['abs_rel_count_error'] for r in full]):.1f}%")
        print(f"  point matching  recall {c['point_recall']:.4f}  precision {c['point_precision']:.4f} "
              f"(precision is pessimistic: some label files cover only a few cells)")
        m["chula"] = {k: v for k, v in c.items() if k != "fields"}
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=2, default=float))
    if args.limit is None and not args.no_record:
        keys = ("n_fields", "n_gt_rbc", "n_pred_rbc", "rbc_precision", "rbc_recall", "rbc_f1", "rbc_precision_border_fp_ignored",
                "rbc_f1_border_fp_ignored", "n_gt_infected", "n_pred_infected", "infected_sensitivity", "infected_ppv",
                "parasitemia_mae_pp", "parasitemia_max_abs_err_pp", "infected_matched",
                "parasitemia_mae_pp_perfect_classifier", "infected_sensitivity_perfect_classifier",
                "parasitemia_r_perfect_classifier", "seconds_per_field_mean", "seconds_per_field_median")
        figures = {f"iml.{k}": m.get(k) for k in keys}
        figures.update({f"iml.{k}": v for k, v in conv.items()})
        figures["iml.baseline_constant_pct"] = BASELINE_PARASITEMIA_PCT
        figures["iml.baseline_constant_mae_pp"] = base[BASELINE_PARASITEMIA_PCT]
        figures["iml.baseline_zero_mae_pp"] = base[0.0]
        figures["iml.annotated_parasitemia_mean_pct"] = 100 * float(np.mean(true_par))
        figures.update({f"iml.{k}": v for k, v in ci.items()})
        if model is not None:
            from malaria_screen.evaluation.quantify import FIELD_DEFAULT_METHOD

            figures["iml.parasitemia_method"] = FIELD_DEFAULT_METHOD
        for k in ("n_fields", "count_mae", "count_mean_rel_error", "count_bias", "point_recall", "point_precision"):
            if "chula" in m:
                figures[f"chula.{k}"] = m["chula"].get(k)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from records import write_record

        what = "segmentation only" if model is None else f"cell model {getattr(model, 'source', '')}"
        notes = (f"IML_Malaria dev, all {m['n_fields']} fields ({what}, stain={args.stain}, {args.threads} threads). DESIGN "
                 "figures (docs/evaluation-protocol.md: design/tuning fields, not report fields, not blocked folds): the "
                 "segmentation (pale_cell_factor, wbc_green_od_margin, pale-cell size bound, scale-bar rule, "
                 "solidity bound, dense-field scale rule) was designed and tuned on these same 120 fields and checked on "
                 "the Chula fields; not held-out. The cell model never saw an IML field. Cells are called Parasitized and "
                 "counted by smear's default estimator (iml.parasitemia_method: prior correction to 2%), which was chosen "
                 "on these fields through 5 blocked folds (bench_quantify_iml): in-sample for that choice too. "
                 f"Baseline: a constant {BASELINE_PARASITEMIA_PCT}% parasitemia per field on the same fields. Sensitivity "
                 "and PPV pooled over all infected boxes and calls; 95% CIs: percentile bootstrap over fields (1,000 reps, "
                 "seed 0); r: Pearson correlation of predicted and annotated parasitemia per field. Chula-RBC-12: "
                 f"{m.get('chula', {}).get('n_fields')} labelled fields, no malaria. Seconds per field: machine shared "
                 "with other sessions (2 cores, run under nice -n 10), not a speed figure.")
        name = "bench_smear_no_classify" if model is None else "bench_smear"
        default = model is not None and args.model is None
        print(f"record: {write_record(name, figures, notes=notes, uses_bundled_model=default)}")
    return 0


#: The constant per-field parasitemia of the trivial baseline, percent (the project brief's figure for IML).
BASELINE_PARASITEMIA_PCT = 1.3


def _per_field(per_field_csv: Path) -> dict:
    """Columns of ``smear-eval``'s ``per_field.csv`` as float arrays (parasitemia as fractions)."""
    import csv

    import numpy as np

    with open(per_field_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = ("parasitemia_true", "parasitemia_pred", "inf_gt", "inf_tp", "inf_pred")
    return {c: np.asarray([float(r[c]) if r[c] not in ("", "None") else np.nan for r in rows]) for c in cols}


def _field_bootstrap(pf: dict, baseline_pct: float, reps: int = 1000, seed: int = 0) -> dict:
    """Per-field Pearson r and percentile-bootstrap 95 % CIs over fields (``reps`` resamples).

    Returns keys ``parasitemia_r``, ``{parasitemia_mae_pp, baseline_constant_mae_pp,
    infected_sensitivity, infected_ppv, parasitemia_r}.ci95_lo|hi``; sensitivity and PPV are pooled
    over the resampled fields' boxes and calls.
    """
    import numpy as np

    t, p = 100 * pf["parasitemia_true"], 100 * pf["parasitemia_pred"]
    gt, tp, pred = pf["inf_gt"], pf["inf_tp"], pf["inf_pred"]

    def stats(i):
        r = np.corrcoef(t[i], p[i])[0, 1] if np.std(t[i]) > 0 and np.std(p[i]) > 0 else np.nan
        return {"parasitemia_mae_pp": np.mean(np.abs(p[i] - t[i])),
                "baseline_constant_mae_pp": np.mean(np.abs(baseline_pct - t[i])),
                "infected_sensitivity": tp[i].sum() / gt[i].sum() if gt[i].sum() else np.nan,
                "infected_ppv": tp[i].sum() / pred[i].sum() if pred[i].sum() else np.nan,
                "parasitemia_r": r}

    rng = np.random.default_rng(seed)
    n = len(t)
    boots = [stats(rng.integers(0, n, n)) for _ in range(reps)]
    out = {"parasitemia_r": float(stats(np.arange(n))["parasitemia_r"])}
    for k in boots[0]:
        v = np.asarray([b[k] for b in boots], float)
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        out[f"{k}.ci95_lo"], out[f"{k}.ci95_hi"] = float(lo), float(hi)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
