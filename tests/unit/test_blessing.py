"""The promotion rule (hap.blessing.decide): floors, non-inferiority on paired intervals, slices,
cost, NaN, training-set health."""

from __future__ import annotations

import math

import pytest

from hap.registry.blessing import Interval, TrainingHealth, decide


@pytest.fixture
def gate(make_cfg):
    cfg = make_cfg(
        gate__floors={"recall@50": 0.05, "gauc": 0.5},
        gate__margin=0.01,
        gate__max_slice_regression=0.02,
        gate__max_flops_per_request=1e6,
    )
    return cfg.gate


def metrics(**kw):
    base = {
        "recall@50": 0.30,
        "gauc": 0.62,
        "auc_slice_easy": 0.90,
        "auc_slice_hard": 0.60,
        "flops_per_request": 5e5,
        "logloss": 0.3,
    }
    base.update(kw)
    return base


def test_first_model_needs_only_floors(gate):
    d = decide(metrics(), None, gate, "recall@50")
    assert d.passed and d.reasons == []
    names = {c.name for c in d.checks}
    assert {"floor:recall@50", "floor:gauc", "cost"} <= names
    assert not any(n.startswith(("gain:", "slice:")) for n in names)


def test_floor_breach_fails_with_reason(gate):
    d = decide(metrics(gauc=0.49), None, gate, "recall@50")
    assert not d.passed
    assert any("gauc" in r and "floor" in r for r in d.reasons)


def within(diff, half=0.01, n=300):
    return Interval(diff, diff - half, diff + half, n)


def steady(**intervals):
    """Slices unchanged (inside their margin), plus the given intervals."""
    return {"auc_slice_easy": within(0.0), "auc_slice_hard": within(0.0), **intervals}


def test_better_model_beats_champion(gate):
    d = decide(
        metrics(**{"recall@50": 0.35}), metrics(), gate, "recall@50", steady(**{"recall@50": within(0.05)})
    )
    assert d.passed
    gain = next(c for c in d.checks if c.name == "gain:recall@50")
    assert gain.champion == pytest.approx(0.30) and gain.delta == pytest.approx(0.05)
    assert (gain.lower, gain.upper, gain.n, gain.threshold) == (
        pytest.approx(0.04),
        pytest.approx(0.06),
        300,
        -0.01,
    )


def test_equal_model_inside_the_margin_is_promoted(gate):
    # a fresher model of the same quality: interval straddles 0, lower bound above -margin
    d = decide(
        metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": Interval(-0.001, -0.008, 0.006, 300)})
    )
    assert d.passed, d.reasons


def test_clearly_worse_model_is_rejected(gate):
    d = decide(metrics(), metrics(), gate, "recall@50", {"recall@50": within(-0.05)})
    assert not d.passed and any("not above -margin" in r for r in d.reasons)
    # a small loss whose interval reaches below -margin is not proven non-inferior either
    d = decide(metrics(), metrics(), gate, "recall@50", {"recall@50": Interval(-0.004, -0.012, 0.004, 300)})
    assert not d.passed


@pytest.mark.parametrize(
    "interval", [None, Interval(math.nan, math.nan, math.nan, 0), Interval(0.1, 0.05, 0.15, 1)]
)
def test_missing_or_nan_interval_never_promotes(gate, interval):
    intervals = {} if interval is None else {"recall@50": interval}
    d = decide(metrics(), metrics(), gate, "recall@50", intervals)
    assert not d.passed and any("cannot compare" in r for r in d.reasons)


def test_slice_regression_is_judged_on_its_interval(gate):
    primary = steady(**{"recall@50": within(0.1)})
    bad = decide(metrics(), metrics(), gate, "recall@50", {**primary, "auc_slice_hard": within(-0.05, 0.01)})
    assert not bad.passed and any("auc_slice_hard" in r for r in bad.reasons)
    ok = decide(metrics(), metrics(), gate, "recall@50", {**primary, "auc_slice_hard": within(-0.005, 0.01)})
    assert ok.passed, ok.reasons
    del primary["auc_slice_easy"]
    missing = decide(metrics(), metrics(), gate, "recall@50", primary)
    assert not missing.passed and any("auc_slice_easy" in r for r in missing.reasons)


def test_training_set_health(gate):
    healthy = TrainingHealth(rows=1000, trailing_rows=[900, 1100, 1000], nonfinite_values=0)
    assert decide(metrics(), None, gate, "recall@50", health=healthy).passed
    half = TrainingHealth(rows=300, trailing_rows=[900, 1100, 1000], nonfinite_values=0)
    d = decide(metrics(), None, gate, "recall@50", health=half)
    assert not d.passed and any("0.30x the median" in r for r in d.reasons)
    nan = TrainingHealth(rows=1000, trailing_rows=[], nonfinite_values=3)
    d = decide(metrics(), None, gate, "recall@50", health=nan)
    assert not d.passed and any("3 non-finite" in r for r in d.reasons)
    assert "health:rows" not in {c.name for c in d.checks}  # no trailing sets: no row-count baseline


def test_cost_ceiling(gate):
    d = decide(metrics(flops_per_request=2e6), None, gate, "recall@50")
    assert not d.passed and any("ceiling" in r for r in d.reasons)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "x"])
def test_nan_or_missing_metric_never_promoted(gate, bad):
    d = decide(metrics(gauc=bad), None, gate, "recall@50")
    assert not d.passed and any("gauc" in r and "never promoted" in r for r in d.reasons)
    d = decide(metrics(auc_slice_hard=bad), metrics(), gate, "recall@50")
    assert not d.passed


def test_missing_primary_never_promoted(gate):
    challenger = metrics()
    del challenger["recall@50"]
    assert not decide(challenger, None, gate, "recall@50").passed
