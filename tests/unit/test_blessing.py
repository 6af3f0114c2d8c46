"""The promotion rule (hap.blessing.decide) on metric dicts: floors, gain, slices, cost, NaN."""

from __future__ import annotations

import math

import pytest

from hap.registry.blessing import decide


@pytest.fixture
def gate(make_cfg):
    cfg = make_cfg(
        gate__floors={"recall@50": 0.05, "gauc": 0.5},
        gate__min_gain=0.001,
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


def test_better_model_beats_champion(gate):
    d = decide(metrics(**{"recall@50": 0.35}), metrics(), gate, "recall@50")
    assert d.passed
    gain = next(c for c in d.checks if c.name == "gain:recall@50")
    assert gain.champion == pytest.approx(0.30) and gain.delta == pytest.approx(0.05)


def test_no_gain_is_rejected(gate):
    d = decide(metrics(), metrics(), gate, "recall@50")  # equal: below champion + min_gain
    assert not d.passed and any("does not beat the champion" in r for r in d.reasons)


def test_slice_regression_is_rejected(gate):
    d = decide(metrics(**{"recall@50": 0.40, "auc_slice_hard": 0.55}), metrics(), gate, "recall@50")
    assert not d.passed
    assert any("auc_slice_hard" in r for r in d.reasons)
    small = decide(metrics(**{"recall@50": 0.40, "auc_slice_hard": 0.59}), metrics(), gate, "recall@50")
    assert small.passed  # within max_slice_regression


def test_cost_ceiling(gate):
    d = decide(metrics(flops_per_request=2e6), None, gate, "recall@50")
    assert not d.passed and any("ceiling" in r for r in d.reasons)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "x"])
def test_nan_or_missing_metric_never_promoted(gate, bad):
    d = decide(metrics(gauc=bad), None, gate, "recall@50")
    assert not d.passed and any("gauc" in r and "never promoted" in r for r in d.reasons)
    d = decide(metrics(auc_slice_hard=bad), metrics(), gate, "recall@50")
    assert not d.passed


def test_missing_primary_and_slice_present_on_champion(gate):
    challenger = metrics()
    del challenger["recall@50"]
    assert not decide(challenger, None, gate, "recall@50").passed
    challenger = metrics(**{"recall@50": 0.5})
    del challenger["auc_slice_easy"]
    d = decide(challenger, metrics(), gate, "recall@50")
    assert not d.passed and any("auc_slice_easy" in r for r in d.reasons)


def test_nan_champion_primary_blocks_promotion(gate):
    d = decide(metrics(), metrics(**{"recall@50": math.nan}), gate, "recall@50")
    assert not d.passed and any("cannot compare" in r for r in d.reasons)
