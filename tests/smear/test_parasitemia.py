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
    # than binomial sampling says, and the cluster bootstrap over fields shows it
    p = np.concatenate([np.r_[np.full(k, 0.9), np.full(100 - k, 0.1)] for k in (0, 0, 0, 0, 0, 15)])
    g = np.repeat(np.arange(6), 100)
    s = estimate_parasitemia(q, p, groups=g, n_boot=500)
    assert s.prevalence == pytest.approx(15 / 600) and "groups (6)" in s.ci_method
    pooled = estimate_parasitemia(q, p)
    assert s.ci95[1] - s.ci95[0] > pooled.ci95[1] - pooled.ci95[0]
    assert estimate_parasitemia(q, np.zeros(0)).prevalence is None
