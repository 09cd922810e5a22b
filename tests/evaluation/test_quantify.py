"""Prevalence estimators (malaria_screen.evaluation.quantify) against QuaPy on the same posteriors.

A real low-prevalence problem that scikit-learn ships (digits: '8' vs the rest, ~10 %): a
logistic regression is fitted on a balanced sample of one third, its posteriors on the second third calibrate the
quantifiers (tpr/fpr, mean posteriors; the training prior from the first third's labels), and
bags are drawn from the last third at 0-40 % prevalence with QuaPy's own sampler. Every method
must give QuaPy's estimate on every bag.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from malaria_screen.evaluation.bootstrap import cluster_bootstrap_weights
from malaria_screen.evaluation.quantify import (
    EMQ,
    METHODS,
    AdjustedClassifyAndCount,
    ClassifyAndCount,
    PriorCorrected,
    ProbabilisticAdjustedClassifyAndCount,
    ProbabilisticClassifyAndCount,
    QuantifierParams,
    adjust_to_prior,
    make_quantifier,
    params_from_model,
)


@pytest.fixture(scope="module")
def digits():
    X, digit = load_digits(return_X_y=True)
    y = (digit == 8).astype(int)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, cal, te = np.array_split(idx, 3)
    # a balanced training set, like the NIH cells (46 % Parasitized): counting then over-calls
    # at the low prevalences of a smear
    pos, neg = tr[y[tr] == 1], tr[y[tr] == 0]
    tr = np.concatenate([pos, neg[:len(pos)]])
    clf = LogisticRegression(max_iter=3000, C=0.005).fit(X[tr], y[tr])
    return {"y_tr": y[tr], "p_cal": clf.predict_proba(X[cal])[:, 1], "y_cal": y[cal],
            "p_te": clf.predict_proba(X[te])[:, 1], "y_te": y[te]}


def _bags(d, sizes=(200,), prevs=(0.0, 0.02, 0.05, 0.1, 0.2, 0.4), reps=3):
    qp = pytest.importorskip("quapy")
    coll = qp.data.LabelledCollection(d["p_te"], d["y_te"], classes=[0, 1])
    for size in sizes:
        for prev in prevs:
            for r in range(reps):
                idx = coll.sampling_index(size, 1.0 - prev, random_state=1000 * r + int(prev * 100))
                yield d["p_te"][idx], d["y_te"][idx]


def _two_col(p):
    return np.stack([1 - p, p], axis=1)


def test_matches_quapy(digits):
    qp = pytest.importorskip("quapy")
    from quapy.method.aggregative import ACC, EMQ as QEMQ, PACC

    d = digits
    classes = np.array([0, 1])
    tr_prev = qp.functional.prevalence_from_labels(d["y_tr"], classes)
    m_acc = ACC.getPteCondEstim(classes, d["y_cal"], (d["p_cal"] >= 0.5).astype(int))
    m_pacc = PACC.getPteCondEstim(classes, d["y_cal"], _two_col(d["p_cal"]))
    ours = {
        "cc": ClassifyAndCount(),
        "pcc": ProbabilisticClassifyAndCount(),
        "acc": AdjustedClassifyAndCount().fit(d["p_cal"], d["y_cal"]),
        "pacc": ProbabilisticAdjustedClassifyAndCount().fit(d["p_cal"], d["y_cal"]),
        "em": EMQ().fit(None, d["y_tr"]),
    }
    n = 0
    for p, _ in _bags(d):
        ref = {
            "cc": qp.functional.prevalence_from_labels((p >= 0.5).astype(int), classes)[1],
            "pcc": qp.functional.prevalence_from_probabilities(_two_col(p))[1],
            "acc": qp.functional.normalize_prevalence(ACC.solve_adjustment(
                m_acc, qp.functional.prevalence_from_labels((p >= 0.5).astype(int), classes),
                method="inversion", solver="exact-raise"), method="clip")[1],
            "pacc": qp.functional.normalize_prevalence(ACC.solve_adjustment(
                m_pacc, qp.functional.prevalence_from_probabilities(_two_col(p)),
                method="inversion", solver="exact-raise"), method="clip")[1],
            "em": QEMQ.EM(tr_prev, _two_col(p))[0][1],
        }
        for name, q in ours.items():
            assert q.predict(p) == pytest.approx(ref[name], abs=1e-9), (name, ref[name])
        n += 1
    assert n == 18


def test_adjusted_methods_beat_counting_under_label_shift(digits):
    """At low prevalence CC over-counts (false positives); ACC and EM get closer on average."""
    d = digits
    acc = AdjustedClassifyAndCount().fit(d["p_cal"], d["y_cal"])
    em = EMQ().fit(None, d["y_tr"])
    err = {"cc": [], "acc": [], "em": []}
    for p, y in _bags(d, prevs=(0.0, 0.01, 0.02, 0.05), reps=5):
        err["cc"].append(abs(ClassifyAndCount().predict(p) - y.mean()))
        err["acc"].append(abs(acc.predict(p) - y.mean()))
        err["em"].append(abs(em.predict(p) - y.mean()))
    mae = {k: float(np.mean(v)) for k, v in err.items()}
    assert mae["acc"] < mae["cc"] and mae["em"] < mae["cc"], mae


def test_prior_correction_is_bayes_rule():
    p = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    assert adjust_to_prior(p, 0.5, 0.5) == pytest.approx(p)
    # a posterior of 0.5 under a balanced prior is a likelihood ratio of 1: the new prior itself
    assert adjust_to_prior([0.5], 0.5, 0.02)[0] == pytest.approx(0.02)
    q = PriorCorrected(0.02, train_prior=0.46)
    t = q.threshold_
    assert adjust_to_prior([t], 0.46, 0.02)[0] == pytest.approx(0.5)
    assert q.predict(np.array([t - 1e-6, t + 1e-6, 0.2, 0.999])) == pytest.approx(0.5)
    # a model threshold other than 0.5 is the same decision rule at the new prior
    q3 = PriorCorrected(0.02, train_prior=0.46, threshold=0.3)
    assert adjust_to_prior([q3.threshold_], 0.46, 0.02)[0] == pytest.approx(0.3) and q3.threshold_ < t
    with pytest.raises(ValueError, match="train_prior"):
        adjust_to_prior(p, 0.0, 0.02)


def test_estimate_interval_and_labels(digits):
    d = digits
    p = d["p_te"]
    q = AdjustedClassifyAndCount().fit(d["p_cal"], d["y_cal"])
    e = q.estimate(p, n_boot=300, seed=1)
    assert e.ci95[0] <= e.prevalence <= e.ci95[1] and e.ci95[1] - e.ci95[0] > 0
    assert e.n == len(p) and e.n_called == int(round(e.prevalence * len(p)))
    assert q.estimate(p, n_boot=300, seed=1) == e  # seeded
    # groups that differ in prevalence (like fields of a slide): the cluster bootstrap is wider
    g = np.argsort(np.argsort(p)) * 6 // len(p)
    eg = q.estimate(p, groups=g, n_boot=300, seed=1)
    assert eg.ci95[1] - eg.ci95[0] > e.ci95[1] - e.ci95[0]
    assert "groups (6)" in eg.ci_method
    assert ClassifyAndCount().estimate([]).prevalence is None
    lab = EMQ(0.1).labels(p)
    assert lab.sum() == round(EMQ(0.1).predict(p) * len(p))
    assert p[lab].min() >= p[~lab].max()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not fitted"):
        AdjustedClassifyAndCount().predict([0.2])
    with pytest.raises(ValueError, match="not fitted"):
        EMQ().predict([0.2])
    with pytest.raises(ValueError, match="both classes"):
        AdjustedClassifyAndCount().fit([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="probabilities"):
        ClassifyAndCount().predict([0.1, np.nan])
    with pytest.raises(ValueError, match="empty"):
        ClassifyAndCount().predict([])
    with pytest.raises(ValueError, match="unknown quantification method"):
        make_quantifier("nope", QuantifierParams())
    with pytest.raises(ValueError, match="needs"):
        make_quantifier("acc", QuantifierParams())


def test_cluster_bootstrap_weights_draw_whole_groups():
    w, gid = cluster_bootstrap_weights(["b", "a", "b", "c"], n_boot=50, seed=0)
    assert w.shape == (50, 3) and (w.sum(axis=1) == 3).all()
    assert gid.tolist() == [1, 0, 1, 2]
    w2, _ = cluster_bootstrap_weights(["b", "a", "b", "c"], n_boot=50, seed=0)
    assert (w == w2).all()


def test_params_from_the_bundled_model_files():
    """The bundled model's metrics.json / split.json give ACC's rates and the training prior."""
    import json

    from malaria_screen.inference.base import default_model_dir

    folder = default_model_dir()
    metrics = json.loads((folder / "metrics.json").read_text())

    class Model:  # what params_from_model reads from a loaded model
        threshold = metrics["threshold"]
        source = str(folder)

    Model.metrics = metrics
    prm = params_from_model(Model())
    manifest = json.loads((folder / "split.json").read_text())
    n = manifest["splits"]["train"]["n_per_class"]
    # the Chula extra negatives (another microscope, no malaria) are left out of the prior
    extra = manifest["extra_negatives"]["n_cells"]
    assert extra > 1000
    assert prm.train_prior == pytest.approx(n["Parasitized"] / (n["Parasitized"] + n["Uninfected"] - extra))
    assert "without" in prm.source
    assert prm.tpr == pytest.approx(metrics["sensitivity"]) and prm.fpr == pytest.approx(1 - metrics["specificity"])
    for name in METHODS:
        if name != "pacc" or prm.ptpr is not None:
            assert 0.0 <= make_quantifier(name, prm).predict([0.01, 0.2, 0.7, 0.99]) <= 1.0


def test_em_interval_is_the_same_whatever_block_of_replicates_it_iterates(digits, monkeypatch):
    """EM's bootstrap iterates cache-sized blocks of replicates; every replicate converges on its
    own, so the interval is the same bits as with all replicates in one block."""
    import malaria_screen.evaluation.quantify as quantify

    q = EMQ(train_prior=float(digits["y_tr"].mean()))
    p = digits["p_te"]
    blocked = q.estimate(p, n_boot=400, seed=3)
    assert quantify._EM_BLOCK // p.size < 400  # more than one block
    monkeypatch.setattr(quantify, "_EM_BLOCK", 400 * p.size)
    assert q.estimate(p, n_boot=400, seed=3) == blocked
    monkeypatch.setattr(quantify, "_EM_BLOCK", 1)  # one replicate at a time
    assert q.estimate(p, n_boot=400, seed=3) == blocked


def test_em_interval_holds_its_estimate_and_keeps_every_replicate(digits):
    """Every bootstrap replicate runs EM as the point estimate does (from the training prior, the
    same stopping rule), so the interval holds the estimate, also where EM converges slowly
    (a bag of the digits model's test posteriors, almost all far from the threshold); posteriors
    of exactly 0 and 1 (a saturated softmax) lose no replicate to 0/0, so EM's interval is then
    counting's, replicate for replicate."""
    prior = float(digits["y_tr"].mean())
    q = EMQ(train_prior=prior)
    p_neg = np.sort(digits["p_te"][digits["y_te"] == 0])[:200]  # the 200 most surely negative test cells
    for p in (p_neg, digits["p_te"][:300], np.r_[digits["p_te"][digits["y_te"] == 1][:1], p_neg[:99]]):
        e = q.estimate(p, n_boot=300, seed=1)
        assert e.ci95[0] <= e.prevalence <= e.ci95[1], (e.prevalence, e.ci95)
    hard = (digits["p_te"] >= 0.5).astype(np.float64)[:200]  # posteriors of exactly 0 and 1
    em, cc = q.estimate(hard, n_boot=500, seed=2), ClassifyAndCount(0.5).estimate(hard, n_boot=500, seed=2)
    assert em.prevalence == pytest.approx(cc.prevalence) and em.ci95 == pytest.approx(cc.ci95)


def test_bag_summary_with_a_non_finite_probability_says_so_instead_of_failing():
    """``predict``'s summary.json: a NaN probability (e.g. a half-precision overflow) leaves the
    counts and a warning, with no prevalence, instead of failing after the CSV was written."""
    from malaria_screen import load_model
    from malaria_screen.evaluation.quantify import bag_summary

    model = load_model()
    labels, p = ["Uninfected", "Parasitized", "Uninfected"], [0.01, 0.99, 0.02]
    ok = bag_summary(labels, p, model, n_boot=50)
    assert ok["n"] == 3 and ok["prevalence"] is not None and "warning" not in ok
    bad = bag_summary(labels, [0.01, float("nan"), 0.02], model, n_boot=50)
    assert bad["n"] == 3 and bad["counts"] == {"Parasitized": 1, "Uninfected": 2} and bad["prevalence"] is None
    assert "not finite" in bad["warning"]
