"""Benchmark: does a slide's 95 % parasitemia interval cover the slide's parasitemia? Simulated slides.

A slide is a few fields of ~150 red cells each; the fields' own prevalences vary around the slide's
(beta, with intra-class correlation ICC: 0 = fields are independent cells, larger = fields differ
more), and each field's infected count is binomial. For every setting (fields per slide, slide
parasitemia, ICC) it draws ``--slides`` slides and reports, for two interval methods, how often the
interval covers the slide's parasitemia and its mean width (percentage points):

- ``bootstrap``: the percentile cluster bootstrap over the slide's fields (1,000 replicates), what
  ``smear`` used before;
- ``effective_n``: :func:`malaria_screen.evaluation.proportion.clustered_proportion_ci` (Wilson at the
  effective sample size, Kish 1965 / Korn & Graubard 1998), what ``smear`` uses now;
- ``effective_n_df``: the same with Korn & Graubard's degrees-of-freedom factor (``df=True``), not used.

The ICC values bracket the one measured on the 120 IML dev fields' annotations (printed and
recorded as ``iml_dev.icc``; those fields come from several slides, so it over-states the spread of
the fields of one slide). Simulation only: no model, no image; the IML annotations only set the
ICC and did not choose the method.

Usage::

    python benchmarks/bench_slide_ci.py [DATA_DIR] [--slides 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

FIELDS = (2, 3, 5, 10, 30)
PREVALENCES = (0.005, 0.02)
ICCS = (0.0, 0.007, 0.02)


def iml_icc(data_dir: Path) -> tuple[float, float, int]:
    """Method-of-moments ICC of the annotated IML dev fields' infected fractions (unclipped: negative when the
    fields vary less than binomial sampling would make them), their pooled prevalence, fields."""
    from malaria_screen.smear.labels import load_iml_annotations

    ann = load_iml_annotations(data_dir / "iml_malaria_dev" / "annotations.json")
    k = np.array([sum(b.infected for b in v) for v in ann.values()], float)
    n = np.array([sum(not b.ignored for b in v) for v in ann.values()], float)
    k, n = k[n > 0], n[n > 0]
    p = k.sum() / n.sum()
    between = np.var(k / n, ddof=1)
    within = np.mean(p * (1 - p) / n)
    return float((between - within) / (p * (1 - p))), float(p), int(n.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default="../shared/data", help="the shared data folder (for the IML ICC)")
    ap.add_argument("--slides", type=int, default=1000, help="simulated slides per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", default="bench_slide_ci")
    args = ap.parse_args()

    from malaria_screen.evaluation.bootstrap import cluster_bootstrap_weights
    from malaria_screen.evaluation.proportion import clustered_proportion_ci
    from records import write_record

    figures: dict[str, float | int] = {"slides_per_setting": args.slides, "cells_per_field_mean": 150}
    ann = Path(args.data_dir) / "iml_malaria_dev" / "annotations.json"
    if ann.is_file():
        icc, p_iml, n_f = iml_icc(Path(args.data_dir))
        figures.update({"iml_dev.icc": round(max(0.0, icc), 4), "iml_dev.icc_unclipped": round(icc, 5), "iml_dev.prevalence": round(p_iml, 4), "iml_dev.n_fields": n_f})
        print(f"IML dev fields ({n_f}): pooled prevalence {p_iml:.4f}, ICC of the fields' infected fractions {icc:.5f} (0 if negative)")
    rng = np.random.default_rng(args.seed)
    methods = ("bootstrap", "effective_n", "effective_n_df")
    worst = {m: 1.0 for m in methods}
    print(f"{'fields':>6} {'prev':>6} {'ICC':>6} | " + " | ".join(f"{m + ' cover / width':>28}" for m in methods))
    for g in FIELDS:
        for prev in PREVALENCES:
            for icc in ICCS:
                cover = {m: 0 for m in methods}
                width = {m: 0.0 for m in methods}
                for s in range(args.slides):
                    n = rng.poisson(150, g).astype(float)
                    pf = rng.beta(prev * (1 / icc - 1), (1 - prev) * (1 / icc - 1), g) if icc > 0 else np.full(g, prev)
                    k = rng.binomial(n.astype(int), pf).astype(float)
                    w, _ = cluster_bootstrap_weights(np.arange(g), n_boot=1000, seed=s)
                    den = w @ n
                    r = (w @ k)[den > 0] / den[den > 0]
                    ci = {"bootstrap": tuple(np.percentile(r, [2.5, 97.5])), "effective_n": clustered_proportion_ci(k, n).ci95,
                          "effective_n_df": clustered_proportion_ci(k, n, df=True).ci95}
                    for m, (lo, hi) in ci.items():
                        cover[m] += lo <= prev <= hi
                        width[m] += 100 * (hi - lo)
                key = f"g{g}.p{prev}.icc{icc}"
                for m in cover:
                    c = cover[m] / args.slides
                    figures[f"{key}.{m}.coverage"] = round(c, 3)
                    figures[f"{key}.{m}.width_pp"] = round(width[m] / args.slides, 2)
                    worst[m] = min(worst[m], c)
                print(f"{g:>6} {prev:>6} {icc:>6} | " + " | ".join(
                    f"{cover[m] / args.slides:>17.3f} / {width[m] / args.slides:>5.2f} pp" for m in methods))
    for m, c in worst.items():
        figures[f"worst.{m}.coverage"] = round(c, 3)
    for m in worst:
        figures[f"g5.p0.02.mean_over_icc.{m}.coverage"] = round(np.mean([figures[f"g5.p0.02.icc{i}.{m}.coverage"] for i in ICCS]), 3)
    print("lowest coverage over the settings: " + ", ".join(f"{m} {c:.3f}" for m, c in worst.items()))
    for m in methods:  # over the ICCs the IML dev fields support (0 to the middle value)
        cs = [figures[f"g{g}.p{p}.icc{i}.{m}.coverage"] for g in FIELDS for p in PREVALENCES for i in ICCS[:2]]
        figures[f"icc_le_0.007.worst.{m}.coverage"] = round(min(cs), 3)
    for m in methods:
        figures[f"g2.mean_width_pp.{m}"] = round(np.mean([figures[f"g2.p{p}.icc{i}.{m}.width_pp"] for p in PREVALENCES for i in ICCS]), 2)
    path = write_record(args.record, figures, notes=(
        f"Simulated slides ({args.slides} per setting, seed {args.seed}): fields of Poisson(150) red cells, field prevalence "
        "beta around the slide's with the given ICC, binomial counts; coverage of the slide's parasitemia by each 95 % "
        "interval, mean width in percentage points. iml_dev.icc: method-of-moments ICC of the 120 IML dev fields' "
        "annotated infected fractions (several slides pooled, so an upper bound for one slide's fields); it set the ICC "
        "grid's middle value only. No model, no image."))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
