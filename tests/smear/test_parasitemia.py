"""Field and slide parasitemia estimators (malaria_screen.smear.parasitemia) for the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_screen.evaluation.quantify import EMQ, ClassifyAndCount, PriorCorrected, adjust_to_prior
from malaria_screen.smear.parasitemia import estimate_parasitemia, field_quantifier


class _Bundled:
    """What field_quantifier reads of the loaded bundled model (threshold, metrics, source)."""

    def __init__(self):
        import json

        from malaria_screen.inference.base import default_model_dir

        self.source = str(default_model_dir())
        self.metrics = json.loads((default_model_dir() / "metrics.json").read_text())
        self.threshold = 0.5


def test_default_for_fields_is_the_prior_correction_of_the_bundled_model():
    q = field_quantifier(_Bundled())
    assert isinstance(q, PriorCorrected) and q.target_prior == pytest.approx(0.02)
    # a cell is called Parasitized only when it is more likely infected than not at a 2 % prior
    t = q.threshold_
    assert 0.9 < t < 1.0
    assert adjust_to_prior([t], q.train_prior_, 0.02)[0] == pytest.approx(0.5)
    assert isinstance(field_quantifier(_Bundled(), method="em"), EMQ)
    assert field_quantifier(None) is None


def test_rescorer_and_bare_models_count_at_their_own_threshold(caplog):
    class Rescorer:
        threshold = 0.3

    class Bare:  # a predict-able object without metrics or a run folder
        threshold = 0.6

    q = field_quantifier(_Bundled(), rescorer=Rescorer())
    assert isinstance(q, ClassifyAndCount) and q.threshold == 0.3
    q = field_quantifier(Bare())
    assert isinstance(q, ClassifyAndCount) and q.threshold == 0.6
    assert "classify and count" in caplog.text
    with pytest.raises(ValueError, match="unknown parasitemia method"):
        field_quantifier(_Bundled(), method="median")


def test_field_interval_is_binomial_and_slide_interval_is_over_fields():
    q = ClassifyAndCount(0.5)
    p = np.r_[np.full(120, 0.1)]
    e = estimate_parasitemia(q, p)
    assert e.prevalence == 0.0 and e.ci95[0] == 0.0 and 0.0 < e.ci95[1] < 0.05  # Wilson: informative at k = 0
    assert e.ci_method == "wilson binomial interval"
    # a slide of 6 fields of 100 cells, all infected cells in one field: the fields disagree more
    # than binomial sampling says, and the slide's interval (effective sample size) shows it
    p = np.concatenate([np.r_[np.full(k, 0.9), np.full(100 - k, 0.1)] for k in (0, 0, 0, 0, 0, 15)])
    g = np.repeat(np.arange(6), 100)
    s = estimate_parasitemia(q, p, groups=g)
    assert s.prevalence == pytest.approx(15 / 600) and "over 6 fields" in s.ci_method
    pooled = estimate_parasitemia(q, p)
    assert s.ci95[1] - s.ci95[0] > 2 * (pooled.ci95[1] - pooled.ci95[0])
    # two fields with the same count: the pooled binomial interval, not the zero-width interval of a
    # cluster bootstrap over two fields
    p2 = np.concatenate([np.r_[np.full(4, 0.9), np.full(156, 0.1)]] * 2)
    two = estimate_parasitemia(q, p2, groups=np.repeat([0, 1], 160))
    assert two.ci95 == pytest.approx(estimate_parasitemia(q, p2).ci95) and two.ci95[1] - two.ci95[0] > 0.02
    assert estimate_parasitemia(q, np.zeros(0)).prevalence is None


def test_a_bootstrap_methods_slide_interval_is_never_narrower_than_its_called_cells_clustered_interval():
    """EM's cluster bootstrap over two agreeing fields collapses; the slide interval then falls back
    to the effective-sample-size interval of the cells EM calls."""
    from malaria_screen.evaluation.proportion import clustered_proportion_ci
    from malaria_screen.evaluation.quantify import EMQ

    q = EMQ().fit(None, np.r_[np.ones(46), np.zeros(54)])
    field = np.r_[np.full(5, 0.97), np.full(195, 0.02)]
    p, g = np.r_[field, field], np.repeat([0, 1], 200)
    s = estimate_parasitemia(q, p, groups=g, n_boot=200)
    called = q.labels(p)
    cp = clustered_proportion_ci([called[:200].sum(), called[200:].sum()], [200, 200])
    assert s.ci95[0] <= cp.ci95[0] and s.ci95[1] >= cp.ci95[1] and cp.ci95[1] > cp.ci95[0]
    assert "the wider of" in s.ci_method


def test_one_fields_bootstrap_interval_is_never_narrower_than_its_called_cells_binomial_interval():
    """A field of 103 cells that EM finds clean: its bootstrap over cells has almost no width (all
    cells far from the threshold), so the field gets at least the binomial interval of the cells
    it calls (0 of 103: an upper bound of a few per cent), and the interval holds the estimate."""
    from malaria_screen.smear.parasitemia import binomial_ci

    q = EMQ().fit(None, np.r_[np.ones(46), np.zeros(54)])
    p = np.full(103, 1e-6)
    e = estimate_parasitemia(q, p, n_boot=200)
    lo, hi = binomial_ci(0, 103)
    assert e.ci95[0] <= e.prevalence <= e.ci95[1] and e.ci95[1] >= hi > 0.03
    assert "the wider of" in e.ci_method
