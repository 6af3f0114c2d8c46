"""The served score (issue 29 item 6): one function turns a DAMR result into the probability that
serving returns and evaluation measures (``hap.model.calibration``), and its calibration metrics."""

from __future__ import annotations

import numpy as np
import pytest

from hap.model.calibration import platt, served_logit, served_probability
from hap.model.metrics import calibration_metrics
from hap.model.routing import ROUTED_OFFSET, merge_scores

LIGHT = np.array([0.0, 1.0, 2.0, 3.0])
EXPR = np.array([np.nan, np.nan, 1.0, 2.0])
ROUTED = np.array([False, False, True, True])


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def test_the_served_logit_is_the_sort_key_without_the_routed_offset():
    for merge in ("sum", "stack", "raw"):
        key = merge_scores(LIGHT, EXPR, ROUTED, merge)
        logit = served_logit(LIGHT, EXPR, ROUTED, "hap", merge)
        offset = 0.0 if merge == "raw" else ROUTED_OFFSET
        assert np.allclose(key, logit + offset * ROUTED)
    # under sum a routed candidate's score is light + expressive, not the expressive logit alone
    assert served_logit(LIGHT, EXPR, ROUTED, "hap", "sum").tolist() == [0.0, 1.0, 3.0, 5.0]
    assert served_logit(LIGHT, EXPR, ROUTED, "light", "sum").tolist() == LIGHT.tolist()
    assert np.allclose(
        served_logit(LIGHT, np.array([4.0, 3, 1, 2]), ROUTED, "expressive_all", "sum"), [4, 3, 1, 2]
    )


def test_each_score_kind_gets_its_own_platt_scaling():
    cal = {"light": [1.0, -3.0], "sum": [0.5, -2.0], "expressive": [9.0, 9.0]}
    prob = served_probability(LIGHT, EXPR, ROUTED, "hap", "sum", cal)
    assert np.allclose(prob, sigmoid([0 - 3, 1 - 3, 0.5 * 3 - 2, 0.5 * 5 - 2]))
    stack = served_probability(LIGHT, EXPR, ROUTED, "hap", "stack", cal)
    assert np.allclose(stack[2:], sigmoid(9.0 * np.array([1.0, 2.0]) + 9.0))
    # no calibration in the bundle: the sigmoid of the served logit, never of the expressive logit alone
    raw = served_probability(LIGHT, EXPR, ROUTED, "hap", "sum", None)
    assert np.allclose(raw, sigmoid([0, 1, 3, 5]))


def test_platt_recovers_a_known_calibration_and_refuses_one_class():
    rng = np.random.default_rng(0)
    s = rng.normal(size=20000)
    y = rng.random(len(s)) < sigmoid(1.5 * s - 3.0)
    a, b = platt(s, y)
    assert a == pytest.approx(1.5, abs=0.1) and b == pytest.approx(-3.0, abs=0.1)
    assert platt(s, np.zeros(len(s), bool)) is None and platt(s[:10], y[:10]) is None


def test_calibration_metrics_tell_a_calibrated_score_from_a_miscalibrated_one():
    rng = np.random.default_rng(1)
    z = rng.normal(-3.0, 1.0, 50000)
    y = (rng.random(len(z)) < sigmoid(z)).astype(int)
    good = calibration_metrics(y, sigmoid(z))
    bad = calibration_metrics(y, sigmoid(2 * z + 3))  # a sum of two logits read as one probability
    assert good["ece"] < 0.005 < 0.05 < bad["ece"]
    assert good["logloss"] < good["logloss_constant"] < bad["logloss"]
    assert good["mean_prob"] == pytest.approx(good["ctr"], abs=0.003)
    assert good["ctr"] == pytest.approx(y.mean())
