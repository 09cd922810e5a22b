"""Benchmark whole-smear screening on the IML_Malaria dev fields and the Chula-RBC-12 fields.

Prints RBC detection precision/recall/F1 at IoU >= 0.5 (strict, and with unmatched border-cut
detections not counted, since IML leaves most edge cells unboxed), infected-cell sensitivity and
PPV, per-field parasitemia absolute error (mean, max; percentage points), seconds per field, and
the Chula red-cell count errors.

Usage::

    PYTHONPATH=src python benchmarks/bench_smear.py                 # bundled default model
    PYTHONPATH=src python benchmarks/bench_smear.py --model runs/x  # a trained run folder
    PYTHONPATH=src python benchmarks/bench_smear.py --no-classify   # segmentation only

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root).
Set the thread count with ``--threads`` (default 2, the target machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _box_convention(iml: Path, pixel_size_um: float | None, f) -> None:
    """Strict F1 again with detection boxes scaled to IML's box convention.

    Detection boxes are tight around the cell mask; IML's boxes carry a margin. The scale is the
    median ``sqrt(annotated area / detected area)`` over the strict matches of fields 1-40 (the
    fields the segmentation was tuned on); F1 is then reported on all fields and on fields
    41-120 alone (not used to choose anything).
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
    print(f"    fields 41-{len(names)} P {f(b['rbc_precision'])}  R {f(b['rbc_recall'])}  F1 {f(b['rbc_f1'])}  (not used for tuning)")


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
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2

    cv2.setNumThreads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:  # pragma: no cover
        pass

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

    t0 = time.perf_counter()
    m = evaluate_dataset(iml / "images", iml / "annotations.json", model, segment_config=SegmentConfig(pixel_size_um=args.pixel_size_um),
                         stain=args.stain, limit=args.limit)
    wall = time.perf_counter() - t0

    def f(x, pct=False):
        if x is None:
            return "n/a"
        return f"{100 * x:.2f}%" if pct else f"{x:.4f}"

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
    print(f"  detection floor           {m['infected_matched']} of {m['n_gt_infected']} infected boxes matched to a detection; "
          f"a perfect classifier of the detections: parasitemia MAE {m['parasitemia_mae_pp_perfect_classifier']:.3f} pp")
    print(f"  time                      {m['seconds_per_field_mean']:.3f} s/field mean, {m['seconds_per_field_median']:.3f} median "
          f"({args.threads} threads; total {wall:.1f} s incl. decoding)")

    if not args.no_box_convention:
        _box_convention(iml, args.pixel_size_um, f)

    if (chula / "images").is_dir():
        c = evaluate_chula(chula, segment_config=SegmentConfig(pixel_size_um=args.pixel_size_um))
        import numpy as np

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
