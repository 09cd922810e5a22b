"""Every candidate recipe of the cell model on whole IML fields, seed for seed against the bundled recipe.

Usage::

    python benchmarks/summarise_candidates.py [--record candidate_summary]

Reads the ``bench_quantify`` records of the candidate runs (``benchmarks/results/
candidate_*_quantify[_iml].json``, one pair per run, written by ``bench_quantify.py --model RUN
--record NAME``) and of the bundled recipe's three seeds, and writes one record of per-recipe
figures: the seeds measured; the mean, lowest and highest out-of-the-box infected-cell
sensitivity over the 120 IML dev fields (``fixed.prior``: `smear`'s default, no IML label), its
mean PPV, the mean EM error on the NIH bags, the mean sensitivity and PPV with the operating
point chosen in blocked folds (``cv_sens``); and, seed for seed against the bundled recipe's run
of the same seed (``--seed S --split-seed 0``, the same patients): the mean difference in
out-of-the-box sensitivity and the number of seeds where the candidate finds more infected
cells; where ``bench_same_cell`` records exist (:data:`DETECTIONS`), the same for the
sensitivity among all of ``smear``'s detections at a false-positive rate of 0.5 %, which no
threshold moves (ranking, not calibration). No figure is measured anew: this is arithmetic on
the records named in its notes, which say what each was measured on. Nothing here chose a model
(every candidate was judged by the rule written before its runs, in the model card).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from records import RESULTS_DIR, write_record  # noqa: E402

#: recipe key -> (description, {seed: bench_quantify record name}). Seed 0 of the bundled recipe
#: is the bundled model (record ``bench_quantify``). Single-seed candidates are seed 0.
RECIPES: dict[str, tuple[str, dict[int, str]]] = {
    "bundled": ("the bundled recipe: HED 0.3, Chula negatives, 20 epochs",
                {0: "bench_quantify", 1: "candidate_seed1_quantify", 2: "candidate_seed2_quantify"}),
    "hed02": ("HED 0.2 (the recipe before)", {0: "candidate_hed02_seed0_quantify", 1: "candidate_hed02_seed1_quantify"}),
    "hed04": ("HED 0.4", {0: "candidate_hed04_quantify"}),
    "hed05": ("HED 0.5", {0: "candidate_hed05_quantify"}),
    "segneg": ("Chula negatives cut by smear's segmentation", {0: "candidate_segneg_quantify"}),
    "cleaned": ("confident learning, flagged cells left out", {0: "candidate_cleaned_quantify"}),
    "cleaned_parasitized": ("confident learning, flagged Parasitized cells left out",
                            {0: "candidate_cleaned_parasitized_quantify"}),
    "smoothed": ("label smoothing 0.1", {0: "candidate_smoothed_quantify"}),
    "distilled": ("distillation from three seeds, weight 0.5", {0: "candidate_distilled_quantify"}),
    "distilled02": ("distillation from three seeds, weight 0.2", {0: "candidate_distilled02_quantify"}),
    "swa": ("weight averaging from 0.5", {s: f"candidate_swa_seed{s}_quantify" for s in range(3)}),
    "px96": ("input 96 px", {s: f"candidate_px96_seed{s}_quantify" for s in range(3)}),
    "synthetic": ("synthetic Parasitized cells 0.5", {s: f"candidate_syn_seed{s}_quantify" for s in range(3)}),
    "blur": ("blur 1.5 px", {s: f"candidate_blur_seed{s}_quantify" for s in range(3)}),
    "mixstyle": ("MixStyle 0.5", {s: f"candidate_mixstyle_seed{s}_quantify" for s in range(3)}),
}

#: recipe key -> {seed: (bench_same_cell record, key prefix of that run)}: the sensitivity among all
#: of `smear`'s detections at a false-positive rate of 0.5 % (``fields.sens_at_fpr_0.005``), a
#: ranking measure that no threshold or prior moves. Recipes without such records are left out.
DETECTIONS: dict[str, dict[int, tuple[str, str]]] = {
    "bundled": {0: ("same_cell", ""), 1: ("same_cell_plain_seeds", "seed1."), 2: ("same_cell_plain_seeds", "seed2.")},
    "hed02": {s: ("same_cell", f"hed02_seed{s}.") for s in range(2)},
    "swa": {s: ("same_cell", f"swa_seed{s}.") for s in range(3)},
    "px96": {s: ("same_cell", f"px96_seed{s}.") for s in range(3)},
    "synthetic": {s: ("same_cell_synthetic", f"syn_seed{s}.") for s in range(3)},
    "blur": {s: ("same_cell_blur_mixstyle", f"blur_seed{s}.") for s in range(3)},
    "mixstyle": {s: ("same_cell_blur_mixstyle", f"mixstyle_seed{s}.") for s in range(3)},
}
DETECTION_KEY = "fields.sens_at_fpr_0.005"


@lru_cache(maxsize=None)
def _record(results: Path, name: str) -> dict[str, float]:
    """The figures of ``results/<name>.json`` (each record read once: several runs share one)."""
    return json.loads((results / f"{name}.json").read_text(encoding="utf-8"))["figures"]


def _detections(key: str, results: Path) -> dict[int, float]:
    return {seed: _record(results, record)[prefix + DETECTION_KEY]
            for seed, (record, prefix) in DETECTIONS.get(key, {}).items()}


def _figures(name: str, results: Path) -> dict[str, float]:
    nih, iml = _record(results, name), _record(results, f"{name}_iml")
    return {"sens": iml["fixed.prior.infected_sensitivity"], "ppv": iml["fixed.prior.infected_ppv"],
            "em": nih["em.mae_pp"], "cv_sens": iml["cv_sens.infected_sensitivity"], "cv_ppv": iml["cv_sens.infected_ppv"]}


def summarise(results: Path = RESULTS_DIR) -> dict[str, float | int]:
    """Per-recipe figures (see the module docstring) from the records in ``results``.

    Raises
    ------
    FileNotFoundError
        If a record named in :data:`RECIPES` or :data:`DETECTIONS` is missing.
    """
    plain = {s: _figures(n, results) for s, n in RECIPES["bundled"][1].items()}
    plain_det = _detections("bundled", results)
    out: dict[str, float | int] = {}
    for key, (_, runs) in RECIPES.items():
        figs = {s: _figures(n, results) for s, n in runs.items()}
        sens = np.array([f["sens"] for f in figs.values()])
        out[f"{key}.n_seeds"] = len(figs)
        out[f"{key}.sens_mean"] = float(sens.mean())
        out[f"{key}.sens_min"] = float(sens.min())
        out[f"{key}.sens_max"] = float(sens.max())
        for m in ("ppv", "em", "cv_sens", "cv_ppv"):
            out[f"{key}.{m}_mean"] = float(np.mean([f[m] for f in figs.values()]))
        if key != "bundled":
            diff = [figs[s]["sens"] - plain[s]["sens"] for s in figs]
            out[f"{key}.sens_diff_mean"] = float(np.mean(diff))
            out[f"{key}.n_seeds_more"] = int(sum(d > 0 for d in diff))
        det = _detections(key, results)
        if det:
            out[f"{key}.det_sens_mean"] = float(np.mean(list(det.values())))
            if key != "bundled":
                ddiff = [det[s] - plain_det[s] for s in det]
                out[f"{key}.det_diff_mean"] = float(np.mean(ddiff))
                out[f"{key}.det_n_seeds_more"] = int(sum(d > 0 for d in ddiff))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", default="candidate_summary")
    args = ap.parse_args()
    figures = summarise()
    width = max(len(d) for d, _ in RECIPES.values())
    print(f"{'recipe':{width}}  seeds  sens mean [min, max]  PPV    EM (pp)  folds sens/PPV  vs bundled recipe, same seeds")
    for key, (desc, _) in RECIPES.items():
        g = {k.split(".", 1)[1]: v for k, v in figures.items() if k.split(".", 1)[0] == key}
        vs = "" if key == "bundled" else f"{g['sens_diff_mean']:+.3f} ({g['n_seeds_more']} of {g['n_seeds']} more)"
        if "det_sens_mean" in g:
            vs += f"  detections {g['det_sens_mean']:.3f}"
            vs += f" {g['det_diff_mean']:+.3f} ({g['det_n_seeds_more']} more)" if key != "bundled" else ""
        print(f"{desc:{width}}  {g['n_seeds']:5d}  {g['sens_mean']:.3f} [{g['sens_min']:.3f}, {g['sens_max']:.3f}]  "
              f"{g['ppv_mean']:.3f}  {g['em_mean']:7.2f}  {g['cv_sens_mean']:.3f}/{g['cv_ppv_mean']:.3f}     {vs}")
    names = sorted({n for _, runs in RECIPES.values() for n in runs.values()}
                   | {r for runs in DETECTIONS.values() for r, _ in runs.values()})
    notes = ("Arithmetic on bench_quantify records, no new measurement: out-of-the-box ('fixed.prior', smear's "
             "default prior correction to 2 %, no IML label) infected-cell sensitivity and PPV over the 120 IML dev "
             "fields (185 infected boxes), EM MAE on bags of each run's own NIH test patients, and 'cv_sens' "
             "(operating point chosen in 5 blocked folds of the IML fields); 'det_*': bench_same_cell's sensitivity "
             "among all of smear's detections on the same fields at a false-positive rate of 0.5 %. Seed S of a candidate is compared "
             "with seed S of the bundled recipe (same patient split). Records: " + ", ".join(names) + ". "
             "Describes candidates already judged (model card rule); chooses nothing.")
    path = write_record(args.record, figures, notes=notes)
    print(f"record: {path}")


if __name__ == "__main__":
    main()
