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
    # a small loss whose interval reaches below -margin is not proven non-inferior either: with a
    # half-width of 0.008 > 0.5 x margin the comparison cannot tell, so it is undecided, not promoted
    d = decide(
        metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": Interval(-0.004, -0.012, 0.004, 300)})
    )
    assert not d.passed and d.verdict == "undecided" and not d.promote


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


# ---- issue 29: a slice blocks only where its interval can tell; the slices are one family --------
def test_a_slice_that_cannot_tell_does_not_block(gate):
    # half-width 0.02 against a slice margin of 0.02: an equal challenger would fail it about half
    # the time, so its failure is recorded as not decisive and the challenger is promoted
    primary = {"recall@50": within(0.0, 0.003)}
    wide = {**primary, "auc_slice_easy": within(0.0), "auc_slice_hard": within(-0.012, 0.02)}
    d = decide(metrics(), metrics(), gate, "recall@50", wide)
    assert d.passed, d.reasons
    hard = next(c for c in d.checks if c.name == "slice:auc_slice_hard")
    assert hard.verdict == "not_decisive" and hard.decisive is False and hard.passed
    assert hard.halfwidth == pytest.approx(0.02) and hard.lower == pytest.approx(-0.032)
    record = d.to_dict()["checks"]  # the blessing records every check, decisive or not
    assert {"verdict", "decisive", "halfwidth", "confidence", "lower", "upper"} <= set(record[0])


def test_a_decisive_slice_regression_blocks(gate):
    # half-width 0.005 <= 0.5 x 0.02: the check can tell, and the slice lost more than its margin
    intervals = {
        "recall@50": within(0.0, 0.003),
        "auc_slice_easy": within(0.0),
        "auc_slice_hard": within(-0.03, 0.005),
    }
    d = decide(metrics(), metrics(), gate, "recall@50", intervals)
    assert not d.passed and any("auc_slice_hard" in r for r in d.reasons)
    hard = next(c for c in d.checks if c.name == "slice:auc_slice_hard")
    assert hard.verdict == "fail" and hard.decisive


def test_a_primary_interval_too_wide_to_tell_is_undecided_never_fail(make_cfg):
    """Half-width 0.02 against a margin of 0.01: an equal challenger and one worse by the margin
    look alike, so the verdict is undecided and the policy says what happens."""
    wide = steady(**{"recall@50": within(0.004, 0.02)})
    for policy, promote, alert in (
        ("keep", False, False),
        ("alert", False, True),
        ("promote_if_better", True, False),
    ):
        gate = make_cfg(gate__margin=0.01, gate__max_flops_per_request=1e6, gate__on_undecided=policy).gate
        d = decide(metrics(), metrics(), gate, "recall@50", wide)
        assert d.verdict == "undecided" and d.reasons == [] and (d.promote, d.alert) == (promote, alert)
        assert "interval ±0.0200 is wider than ±0.0050" in d.undecided and f"policy {policy}" in d.undecided
    gate = make_cfg(
        gate__margin=0.01, gate__max_flops_per_request=1e6, gate__on_undecided="promote_if_better"
    ).gate
    worse_point = decide(
        metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": within(-0.004, 0.02)})
    )
    assert worse_point.verdict == "undecided" and not worse_point.promote
    # a wide interval entirely below -margin is a clear loss: fail, whatever the policy
    clear = decide(metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": within(-0.05, 0.02)}))
    assert clear.verdict == "fail" and not clear.promote and any("recall@50" in r for r in clear.reasons)
    # another blocking check wins over an undecided primary
    floor = decide(metrics(gauc=0.4), metrics(), gate, "recall@50", wide)
    assert floor.verdict == "fail" and not floor.promote


def test_a_narrow_primary_interval_decides(gate):
    narrow_loss = decide(
        metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": within(-0.012, 0.004)})
    )
    assert narrow_loss.verdict == "fail" and not narrow_loss.promote
    narrow_equal = decide(
        metrics(), metrics(), gate, "recall@50", steady(**{"recall@50": within(0.0, 0.004)})
    )
    assert narrow_equal.verdict == "pass" and narrow_equal.promote


def test_the_slice_family_is_bonferroni_adjusted(make_cfg):
    from hap.registry.blessing import family_confidence, interval_levels

    gate = make_cfg(gate__slice_adjust="bonferroni").gate
    compared = [
        "gt_recall@50",
        "auc_slice_easy",
        "auc_slice_hard",
        "auc_slice_global_neg",
        "auc_slice_rank_neg",
    ]
    levels = interval_levels(gate, 0.95, "gt_recall@50", compared)
    assert levels["gt_recall@50"] == 0.95  # the primary metric is one test at the configured level
    assert all(levels[s] == pytest.approx(1 - 0.05 / 4) for s in compared[1:])
    unadjusted = interval_levels(make_cfg(gate__slice_adjust="none").gate, 0.95, "gt_recall@50", compared)
    assert set(unadjusted.values()) == {0.95}
    assert family_confidence(0.95, 1, "bonferroni") == 0.95


def test_the_adjusted_level_widens_the_slice_intervals_and_can_change_the_verdict(make_cfg):
    """The gate's own interval function (``hap gate`` and the benchmark): the same per-request
    differences give the primary a 95% interval and each of the 6 slices a 1 - 0.05/6 one, wide
    enough here that a slice decisive at 95% is not decisive in the family."""
    import numpy as np

    from hap.registry.gate import compare_vectors

    rng = np.random.default_rng(0)
    n = 400
    ids = np.arange(n)
    diff = rng.normal(-0.012, 0.08, n)  # a small per-request loss, noisy
    names = ["gt_recall@50", *(f"auc_slice_{s}" for s in ("a", "b", "c", "d", "e", "f"))]
    champion = {f"model/{m}": np.full(n, 0.5) for m in names}
    challenger = {f"model/{m}": 0.5 + diff for m in names}

    def judged(**gate):
        cfg = make_cfg(
            gate__margin=0.01, gate__max_slice_regression=0.02, gate__slice_decisive_ratio=0.5, **gate
        )
        ivs = compare_vectors(cfg, (ids, challenger), (ids, champion), names)
        d = decide(
            {m: 0.5 for m in names} | metrics(), {m: 0.5 for m in names} | metrics(), cfg.gate, names[0], ivs
        )
        return ivs, {c.metric: c for c in d.checks}

    adj, adj_checks = judged(gate__slice_adjust="bonferroni")
    raw, raw_checks = judged(gate__slice_adjust="none")
    assert adj["gt_recall@50"].confidence == raw["gt_recall@50"].confidence == 0.95
    assert adj["auc_slice_a"].confidence == pytest.approx(1 - 0.05 / 6)
    assert adj["auc_slice_a"].halfwidth > 1.25 * raw["auc_slice_a"].halfwidth
    assert raw_checks["auc_slice_a"].decisive and raw_checks["auc_slice_a"].verdict == "fail"
    assert not adj_checks["auc_slice_a"].decisive and adj_checks["auc_slice_a"].verdict == "not_decisive"


def test_a_metric_blind_to_the_order_is_undecided(make_cfg):
    """recall@50 on requests of fewer than 50 candidates: a random order scores what the model
    scores, every difference is 0, and the gate says it cannot tell instead of passing."""
    gate = make_cfg(gate__margin=0.01, gate__max_flops_per_request=1e6, gate__on_undecided="keep").gate
    blind = metrics(**{"ref_random_recall@50": 0.30})
    d = decide(blind, metrics(), gate, "recall@50", steady(**{"recall@50": Interval(0.0, 0.0, 0.0, 300)}))
    assert (
        d.verdict == "undecided"
        and not d.promote
        and "cannot tell the model from a random order" in d.undecided
    )
    sighted = metrics(**{"ref_random_recall@50": 0.05})
    d = decide(sighted, metrics(), gate, "recall@50", steady(**{"recall@50": Interval(0.0, 0.0, 0.0, 300)}))
    assert d.verdict == "pass" and d.promote
    assert decide(blind, None, gate, "recall@50").verdict == "pass"  # no champion: the floors decide
