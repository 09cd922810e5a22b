"""Learning curve of site calibration (``malaria-screen adapt``) on the 120 IML dev fields.

How good does the site model get with 25, 50, 100, 200, 500 labelled cells, or every annotated
cell of the training fields, when the cells are chosen by the tool's active-learning rule
(:func:`malaria_screen.smear.adapt.select_cells`, fitted again after each batch) or at random?

Protocol (leak-free): the 120 dev fields, sorted by name (camera frame numbers: neighbouring
frames, likely one slide, stay together), are cut into ``--folds`` contiguous blocks. In fold k
the labelled cells are drawn from the segmented cells of the other blocks (the simulated
labeller answers from the IML boxes: a cell matched to an infected box is Parasitized, to another
box Uninfected, a detection that matches no box and overlaps no infected box "not a cell";
detections overlapping an infected box without matching it, pieces of a split cell, are never
offered), the site model is fitted exactly as ``adapt`` fits it (:func:`~malaria_screen.smear.adapt.fit_site`,
method ``auto``), and block k's fields are screened by it. Every field is scored once, by a
model that never saw it; metrics pool all folds. ``--repeats`` repeats (seeds) per budget and
rule; "all" is deterministic. Beside every figure: the constant 1.3 % per field and the bundled
model without labels (prior correction to 2 %, the ``smear`` default).

The thresholds of ``adapt``'s method rule were set on this benchmark's output (the data helped
choose the method); the record says so.

Usage::

    PYTHONPATH=src python benchmarks/bench_learning_curve.py            # ~5 min on 2 cores (cache: 2 min)

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data``). Writes
``benchmarks/results/bench_learning_curve.json`` and ``docs/assets/learning_curve.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGETS = (25, 50, 100, 200, 500)
#: Logit shifts of the decision threshold for the oracle sweep (the same shift in every fold, pooled).
ORACLE_SHIFTS = tuple(np.round(np.arange(-4.0, 4.01, 0.25), 2))
#: The rows the oracle sweep scores: (rule, budget), budget 0 for "all".
ORACLE_ROWS = (("tool", 200), ("all", 0))
#: Cumulative label counts after each active-learning batch (refit after each).
AL_STEPS = (25, 50, 75, 100, 150, 200, 300, 400, 500)
CONSTANT = 0.013


def _cache(model, iml: Path, cache: Path) -> dict:
    """Every dev field segmented and scored once (``field_cells``), with the simulated labeller's answer per cell."""
    from malaria_screen.smear.adapt import field_cells
    from malaria_screen.smear.boxes import box_cover, match_boxes
    from malaria_screen.smear.fields import decode_field
    from malaria_screen.smear.labels import load_iml_annotations

    from _quantify_cache import weights_sha256

    sha = weights_sha256(Path(model.source))
    path = cache / "learning_curve_cells.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if str(z["sha"]) == sha:
            return {k: z[k] for k in z.files}
    ann = load_iml_annotations(iml / "annotations.json")
    names = sorted(n for n in ann if (iml / "images" / n).is_file())
    cols: dict[str, list] = {k: [] for k in ("field", "boxes", "border", "p", "X", "feats", "lab")}
    shapes = []
    t0 = time.perf_counter()
    for fi, name in enumerate(names):
        fc = field_cells(decode_field(iml / "images" / name), model)
        shapes.append(fc.shape)
        gt = ann[name]
        gtb = np.asarray([g.bbox for g in gt], np.float64).reshape(-1, 4)
        lab = np.full(len(fc.boxes), -1, np.int8)
        pairs = match_boxes(fc.boxes, gtb, iou_threshold=0.5)
        for i, g in pairs:
            lab[i] = -1 if gt[g].ignored else (1 if gt[g].infected else 0)
        matched = {i for i, _ in pairs}
        risky = gtb[np.asarray([g.infected or g.ignored for g in gt], bool)].reshape(-1, 4)
        cover = box_cover(fc.boxes, risky) if len(risky) else np.zeros(len(fc.boxes))
        for i in range(len(fc.boxes)):
            if i not in matched and cover[i] < 0.1:
                lab[i] = 2  # not a cell (or a cell the annotators did not box)
        cols["field"].append(np.full(len(fc.boxes), fi, np.int32))
        for k, v in (("boxes", fc.boxes), ("border", fc.border), ("p", fc.p), ("X", fc.X), ("lab", lab)):
            cols[k].append(v)
        cols["feats"].append(np.asarray(fc.features, np.float32))
        print(f"\r{fi + 1}/{len(names)} fields, {time.perf_counter() - t0:.0f} s", end="", flush=True)
    print()
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out |= {"names": np.asarray(names), "shapes": np.asarray(shapes, np.int32), "sha": np.asarray(sha),
            "seconds": np.asarray(time.perf_counter() - t0)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "learning_curve_cells.tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def _data(c: dict, idx: np.ndarray):
    """The cells ``idx`` as :class:`LabelledData` (what ``collect_labelled`` gives ``fit_site``)."""
    from malaria_screen.smear.adapt import LABEL_CLASSES, LabelledData

    lab = c["lab"][idx]
    return LabelledData(p=c["p"][idx], y=(lab == 1).astype(np.int64), label=np.asarray([LABEL_CLASSES[v] for v in lab], object),
                        groups=c["field"][idx].astype(str).astype(object), X=c["X"][idx], x_index=np.arange(len(idx)),
                        site_features=None)


def _score(c: dict, ann: dict, test_fields: list[int], probs_of) -> list:
    """FieldMatch of each test field, cells called by ``probs_of(cell_idx) -> (p, threshold)``."""
    from malaria_screen.smear.scoring import evaluate_iml_field

    out = []
    for f in test_fields:
        idx = np.flatnonzero(c["field"] == f)
        p, thr = probs_of(idx)
        name = str(c["names"][f])
        out.append(evaluate_iml_field(name, c["boxes"][idx], np.asarray(p) >= thr, ann[name], pred_border=c["border"][idx],
                                      image_shape=tuple(int(v) for v in c["shapes"][f])))
    return out


def _missed(c: dict, ann: dict) -> dict:
    """Why the infected boxes without a matched detection (IoU >= 0.5) have none.

    For each such box: ``none`` (no detection overlaps it, IoU > 0.05: dropped as a clump, a white
    cell or debris), ``parts`` (two or more overlapping detections, each smaller than the box: the
    cell cut in pieces), ``other`` (a detection larger than the box, the cell merged with a
    neighbour, or one matched to a neighbouring box). Also the median area of the infected boxes,
    matched and missed, relative to the median Uninfected box of their field (are the missed ones
    the enlarged cells?)."""
    from malaria_screen.smear.boxes import box_iou, match_boxes

    kinds = {"none": 0, "parts": 0, "other": 0}
    ratio = {"matched": [], "missed": []}
    for f, name in enumerate(str(n) for n in c["names"]):
        boxes = c["boxes"][c["field"] == f]
        gt = ann[name]
        gtb = np.asarray([g.bbox for g in gt], np.float64).reshape(-1, 4)
        matched = {g for _, g in match_boxes(boxes, gtb, iou_threshold=0.5)}
        plain = gtb[[not (g.infected or g.ignored) for g in gt]]
        if not len(plain):
            continue
        med = float(np.median(plain[:, 2] * plain[:, 3]))
        iou = box_iou(boxes, gtb) if len(boxes) else np.zeros((0, len(gt)))
        for gi, g in enumerate(gt):
            if not g.infected:
                continue
            area = g.bbox[2] * g.bbox[3]
            ratio["matched" if gi in matched else "missed"].append(area / med)
            if gi in matched:
                continue
            over = np.flatnonzero(iou[:, gi] > 0.05)
            if not len(over):
                kinds["none"] += 1
            elif len(over) >= 2 and all(boxes[o, 2] * boxes[o, 3] < area for o in over):
                kinds["parts"] += 1
            else:
                kinds["other"] += 1
    out = {f"ceiling.missed.{k}": v for k, v in kinds.items()}
    out |= {f"ceiling.area_ratio_{k}_median": float(np.median(v)) for k, v in ratio.items() if v}
    return out


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _oracle(per_shift: dict[float, list]) -> dict:
    """The best a threshold could do with this ranking: over one global logit shift of every fold's
    threshold, the highest pooled sensitivity at PPV >= 0.70 and >= 0.85 and the highest PPV at
    sensitivity >= 0.75 and >= 0.85 (NaN when no shift reaches the bound). Chosen on the test
    fields' labels: an upper bound, never a result."""
    sums = [_summary(m) for m in per_shift.values()]

    def best(key: str, cond: str, bound: float) -> float:
        ok = [s[key] for s in sums if s[cond] >= bound]
        return float(max(ok)) if ok else float("nan")

    return {"sens_at_ppv70": best("sensitivity", "ppv", 0.70), "sens_at_ppv85": best("sensitivity", "ppv", 0.85),
            "ppv_at_sens75": best("ppv", "sensitivity", 0.75), "ppv_at_sens85": best("ppv", "sensitivity", 0.85)}


def _summary(matches: list) -> dict:
    from malaria_screen.smear.scoring import summarize_iml

    s = summarize_iml(matches)
    pred = np.asarray([m.parasitemia_pred for m in matches])
    true = np.asarray([m.parasitemia_true for m in matches])
    r = float(np.corrcoef(pred, true)[0, 1]) if pred.std() > 0 and true.std() > 0 else float("nan")
    return {"sensitivity": s["infected_sensitivity"], "ppv": s["infected_ppv"], "mae_pp": s["parasitemia_mae_pp"],
            "max_err_pp": s["parasitemia_max_abs_err_pp"], "r": r, "rbc_f1": s["rbc_f1"],
            "n_pred_infected": s["n_pred_infected"], "n_gt_infected": s["n_gt_infected"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("MALARIA_SCREEN_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--cache", default=str(ROOT / "bench_out" / "learning_curve"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "assets" / "learning_curve.png"))
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the stored record")
    args = ap.parse_args(argv)
    if args.plot_only:
        import json

        _plot(json.loads((Path(__file__).resolve().parent / "results" / "bench_learning_curve.json").read_text())["figures"],
              Path(args.plot))
        return 0

    import malaria_screen
    from malaria_screen.evaluation.quantify import adjust_to_prior, params_from_model
    from malaria_screen.smear.adapt import LabelsError, fit_site, select_cells
    from malaria_screen.smear.domain import load_reference
    from malaria_screen.smear.labels import load_iml_annotations

    iml = Path(args.data) / "iml_malaria_dev"
    model = malaria_screen.load_model()
    c = _cache(model, iml, Path(args.cache))
    ann = load_iml_annotations(iml / "annotations.json")
    n_fields = len(c["names"])
    blocks = [b.tolist() for b in np.array_split(np.arange(n_fields), args.folds)]
    train_prior = params_from_model(model).train_prior
    q_base = adjust_to_prior(c["p"], train_prior, 0.02)
    t0 = time.perf_counter()

    results: dict[tuple[str, int], list[list]] = {}  # (rule, budget) -> per repeat, list of FieldMatch over all folds
    oracle: dict[tuple[str, int, int], dict[float, list]] = {}  # (rule, budget, repeat) -> shift -> FieldMatch over all folds
    methods: dict[tuple[str, int], list[str]] = {}
    fails: dict[tuple[str, int], int] = {}
    base_matches, const_err, dom_base, dom_site, n_all = [], [], [], [], []
    ref = load_reference(model)
    for k, test in enumerate(blocks):
        train_f = [f for b in blocks if b is not test for f in b]
        in_train = np.isin(c["field"], train_f)
        pool = np.flatnonzero(in_train & (c["lab"] >= 0))
        base_matches += _score(c, ann, test, lambda idx: (q_base[idx], 0.5))
        # the self-check: base reference vs the site reference (training blocks' median cell added)
        if ref is not None:
            from malaria_screen.smear.adapt import site_reference

            sref = site_reference(c["feats"][in_train], c["field"][in_train])
            for f in test:
                fe = c["feats"][c["field"] == f]
                if not len(fe):
                    continue
                dom_base.append(ref.score(fe) <= ref.threshold)
                dom_site.append(sref.score(fe) <= sref.threshold)

        def run(rule: str, budget: int, rep: int, idx: np.ndarray) -> None:
            key = (rule, 0 if rule == "all" else budget)
            try:
                fit = fit_site(_data(c, idx))
                probs_of = (lambda ii: fit.proba(c["p"][ii], c["X"][ii]))
                methods.setdefault(key, []).append(fit.method)
            except LabelsError:  # too few of a class: the user keeps the bundled model's answer
                fails[key] = fails.get(key, 0) + 1
                probs_of = (lambda ii: (q_base[ii], 0.5))
                methods.setdefault(key, []).append("none")
            results.setdefault(key, [[] for _ in range(args.repeats if rule != "all" else 1)])[rep] += \
                _score(c, ann, test, probs_of)
            if key in ORACLE_ROWS:  # the test cells' logit margins once; each shift only moves the threshold
                cells = np.flatnonzero(np.isin(c["field"], test))
                p, thr = probs_of(cells)
                margin = np.zeros(len(c["p"]))
                margin[cells] = _logit(p) - _logit(thr)
                for shift in ORACLE_SHIFTS:
                    oracle.setdefault((*key, rep), {}).setdefault(shift, []).extend(_score(
                        c, ann, test, lambda ii: (margin[ii], shift)))

        for rep in range(args.repeats):
            # random: the first B of one permutation of the pool (nested budgets)
            perm = np.random.default_rng(1000 * k + rep).permutation(pool)
            for b in BUDGETS:
                run("random", b, rep, perm[:b])
            # the tool's rule: batches chosen by the current model, refitted after each batch
            labelled: list[int] = []
            q, thr = q_base[pool], 0.5
            for step in AL_STEPS:
                new = select_cells(q, thr, step - len(labelled), exclude=labelled, seed=1000 * k + rep + step)
                labelled += new.tolist()
                idx = pool[np.asarray(labelled)]
                try:
                    fit = fit_site(_data(c, idx))
                    q, thr = fit.proba(c["p"][pool], c["X"][pool])
                except LabelsError:
                    pass
                if step in BUDGETS:
                    run("tool", step, rep, idx)
        run("all", len(pool), 0, pool)
        n_all.append(len(pool))
        const_err += [abs(CONSTANT - m.parasitemia_true) * 100 for m in base_matches[-len(test):]]
        print(f"fold {k}: fields {c['names'][test[0]]}..{c['names'][test[-1]]}, pool {len(pool)} cells "
              f"({int((c['lab'][pool] == 1).sum())} Parasitized), {time.perf_counter() - t0:.0f} s", flush=True)

    fig: dict = {"n_fields": n_fields, "folds": args.folds, "repeats": args.repeats,
                 "n_cells": int(len(c["p"])), "n_labellable": int((c["lab"] >= 0).sum()),
                 "constant.mae_pp": float(np.mean(const_err))}
    fig |= {f"base.{k}": v for k, v in _summary(base_matches).items()}
    from malaria_screen.smear.scoring import summarize_iml

    whole = summarize_iml(base_matches)
    fig |= {"ceiling.sensitivity": whole["infected_sensitivity_perfect_classifier"],
            "ceiling.r": whole["parasitemia_r_perfect_classifier"], "ceiling.mae_pp": whole["parasitemia_mae_pp_perfect_classifier"]}
    fig |= _missed(c, ann)
    if dom_base:
        fig["domain.base.in_domain_frac"] = float(np.mean(dom_base))
        fig["domain.site.in_domain_frac"] = float(np.mean(dom_site))
    rows = []
    for (rule, budget), reps in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        sums = [_summary(m) for m in reps]
        b = "all" if rule == "all" else str(budget)
        for key in ("sensitivity", "ppv", "mae_pp", "r", "max_err_pp"):
            vals = np.asarray([s[key] for s in sums], np.float64)
            fig[f"{rule}.{b}.{key}"] = float(np.nanmean(vals))
            if len(vals) > 1:
                fig[f"{rule}.{b}.{key}_min"] = float(np.nanmin(vals))
                fig[f"{rule}.{b}.{key}_max"] = float(np.nanmax(vals))
        if rule == "all":
            fig["all.n_labels_per_fold_mean"] = float(np.mean(n_all))
            fig["all.rbc_f1"] = sums[0]["rbc_f1"]
        ms = methods.get((rule, budget), [])
        fig[f"{rule}.{b}.methods"] = ",".join(sorted(set(ms)))
        fig[f"{rule}.{b}.no_fit_frac"] = fails.get((rule, budget), 0) / max(1, len(ms))
        rows.append((rule, b, fig[f"{rule}.{b}.sensitivity"], fig[f"{rule}.{b}.ppv"], fig[f"{rule}.{b}.r"],
                     fig[f"{rule}.{b}.mae_pp"], fig[f"{rule}.{b}.methods"]))
    for rule, budget in ORACLE_ROWS:
        b = "all" if rule == "all" else str(budget)
        per_rep = [_oracle(v) for (r_, b_, _), v in sorted(oracle.items()) if (r_, b_) == (rule, budget)]
        for key in per_rep[0] if per_rep else ():
            fig[f"oracle.{rule}.{b}.{key}"] = float(np.nanmean([o[key] for o in per_rep]))
        if per_rep:
            print(f"oracle threshold ({rule}, {b} labels; chosen on the test labels, an upper bound): best sensitivity at "
                  f"PPV >= 0.70 {fig[f'oracle.{rule}.{b}.sens_at_ppv70']:.3f}, at PPV >= 0.85 "
                  f"{fig[f'oracle.{rule}.{b}.sens_at_ppv85']:.3f}; best PPV at sensitivity >= 0.75 "
                  f"{fig[f'oracle.{rule}.{b}.ppv_at_sens75']:.3f}, at >= 0.85 {fig[f'oracle.{rule}.{b}.ppv_at_sens85']:.3f}")
    fig["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{'rule':8s} {'labels':>6s} {'sens':>6s} {'PPV':>6s} {'r':>6s} {'MAE pp':>7s}  methods")
    print(f"{'none':8s} {0:>6d} {fig['base.sensitivity']:6.3f} {fig['base.ppv']:6.3f} {fig['base.r']:6.3f} "
          f"{fig['base.mae_pp']:7.3f}  bundled model, prior 2 %")
    for rule, b, se, pp, r, mae, ms in rows:
        print(f"{rule:8s} {b:>6s} {se:6.3f} {pp:6.3f} {r:6.3f} {mae:7.3f}  {ms}")
    print(f"constant {CONSTANT:.1%} per field: MAE {fig['constant.mae_pp']:.3f} pp; self-check in-domain: bundled "
          f"{fig.get('domain.base.in_domain_frac', float('nan')):.3f}, site {fig.get('domain.site.in_domain_frac', float('nan')):.3f}")
    print(f"detection ceiling: sensitivity {fig['ceiling.sensitivity']:.3f}; infected boxes without a detection of their "
          f"own: {fig['ceiling.missed.none']} no detection, {fig['ceiling.missed.parts']} cut in parts, "
          f"{fig['ceiling.missed.other']} merged or taken by a neighbour; median box area / field's median Uninfected box: "
          f"missed {fig.get('ceiling.area_ratio_missed_median', float('nan')):.2f}, matched "
          f"{fig.get('ceiling.area_ratio_matched_median', float('nan')):.2f}")
    _plot(fig, Path(args.plot))
    if not args.no_record:
        from records import write_record

        write_record("bench_learning_curve", fig, uses_bundled_model=True, notes=(
            f"{n_fields} IML dev fields in {args.folds} blocked folds of contiguous frames; labels drawn from the other "
            f"blocks' segmented cells (simulated labeller from the IML boxes), site model fitted as `adapt` fits it "
            f"(method auto), scored on the held-out block; pooled over all fields; {args.repeats} repeats (mean, min, "
            "max) for the tool's rule and random; 'all' = every labellable cell of the training blocks. adapt's method "
            "rule thresholds were set looking at this benchmark (the data helped choose the method). Constant: 1.3 % "
            "per field. Bundled model: prior correction to 2 %. oracle.*: the same site models with the decision "
            "threshold moved by one logit shift in every fold (-4 to 4 in steps of 0.25), the shift chosen on the "
            "held-out fields' own labels (best sensitivity at a PPV bound, best PPV at a sensitivity bound; mean over "
            "repeats): an upper bound of what any threshold rule could give with these rankings, not a result."))
    return 0


def _plot(fig: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("sensitivity", "infected sensitivity"), ("ppv", "infected PPV"), ("r", "parasitemia r"),
            ("mae_pp", "parasitemia MAE (points)")]
    f, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, (k, title) in zip(axes, keys):
        for rule, colour in (("tool", "C0"), ("random", "C1")):
            xs = [b for b in BUDGETS if f"{rule}.{b}.{k}" in fig]
            ys = [fig[f"{rule}.{b}.{k}"] for b in xs]
            lo = [fig.get(f"{rule}.{b}.{k}_min", y) for b, y in zip(xs, ys)]
            hi = [fig.get(f"{rule}.{b}.{k}_max", y) for b, y in zip(xs, ys)]
            ax.plot(xs, ys, "o-", color=colour, label="active learning" if rule == "tool" else "random")
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.15)
        if f"all.all.{k}" in fig:
            ax.axhline(fig[f"all.all.{k}"], color="C2", ls="--", label="all annotated cells")
        ax.axhline(fig[f"base.{k}"], color="grey", ls=":", label="no labels (bundled)")
        if k == "mae_pp":
            ax.axhline(fig["constant.mae_pp"], color="k", ls="-.", label="constant 1.3 %")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(list(BUDGETS), [str(b) for b in BUDGETS])
        ax.set_xlabel("labelled cells")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    axes[3].legend(handles=axes[3].lines[-1:], fontsize=7)
    f.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    f.savefig(path, dpi=90)
    plt.close(f)


if __name__ == "__main__":
    raise SystemExit(main())
