"""count_matched_threshold on a real low-prevalence problem (scikit-learn's digits: '8' vs rest)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from malaria_screen.evaluation.metrics import count_matched_threshold


def test_count_matched_threshold_calls_as_many_as_there_are():
    X, digit = load_digits(return_X_y=True)
    y = digit == 8  # ~10 % positives
    clf = LogisticRegression(max_iter=2000, C=0.01).fit(X[::2], y[::2])
    p = clf.predict_proba(X[1::2])[:, 1]
    yt = y[1::2]
    t = count_matched_threshold(yt, p)
    assert 0 < t < 1
    assert int((p >= t).sum()) == int(yt.sum())


def test_count_matched_threshold_edge_cases():
    assert count_matched_threshold(np.zeros(5, bool), np.linspace(0, 1, 5)) == 0.5
    assert count_matched_threshold(np.ones(3, bool), np.array([0.0, 0.2, 0.4])) == pytest.approx(1e-6)
    with pytest.raises(ValueError):
        count_matched_threshold(np.zeros(3, bool), np.zeros(2))
    with pytest.raises(ValueError):
        count_matched_threshold(np.zeros(0, bool), np.zeros(0))
