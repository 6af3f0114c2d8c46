"""Ground-truth metrics, chance levels and the paired bootstrap, on synthetic grids."""

from __future__ import annotations

import numpy as np
import pytest

from hap.model.metrics import order_of, paired_interval, share_vectors, truth_vectors

LOGIT = (-5.8, 0.12)  # the simulator's click_offset and position_bias


def grid(requests=200, n=300, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(requests, n))
    valid = np.ones_like(truth, dtype=bool)
    valid[::3, n - 40 :] = False  # ragged requests, as on the eval set
    return truth, valid, rng


def test_ground_truth_order_scores_exactly_one():
    truth, valid, _ = grid()
    out = truth_vectors(order_of(truth, valid), truth, valid, [10, 50, 100], LOGIT, 10)
    for k in (10, 50, 100):
        assert (out[f"gt_recall@{k}"] == 1.0).all()
    # the truth order also maximises the expected clicks of the top 10 under the click model
    noisy = truth + np.random.default_rng(1).normal(size=truth.shape)
    other = truth_vectors(order_of(noisy, valid), truth, valid, [50], LOGIT, 10)
    assert (out["exp_clicks@10"] >= other["exp_clicks@10"] - 1e-12).all()
    assert other["gt_recall@50"].mean() < 1.0


def test_random_order_scores_chance():
    truth, valid, rng = grid(requests=400)
    order = order_of(rng.random(truth.shape), valid)
    out = truth_vectors(order, truth, valid, [50], LOGIT, 10)
    chance = 50 / valid.sum(1)  # K / n: the expected share of the true top K in a random top K
    assert out["gt_recall@50"].mean() == pytest.approx(chance.mean(), abs=0.01)
    members = (rng.random(truth.shape) < 0.05).astype(np.int64)
    share = share_vectors(order, members, valid, [50], "share")["share@50"]
    assert np.nanmean(share) == pytest.approx(np.mean(50 / valid.sum(1)), abs=0.02)


def test_expected_clicks_follow_the_click_model():
    truth = np.array([[2.0, 0.0, 1.0]])
    valid = np.ones_like(truth, dtype=bool)
    out = truth_vectors(order_of(truth, valid), truth, valid, [1], LOGIT, 2)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert out["exp_clicks@2"][0] == pytest.approx(sig(2.0 - 5.8) + sig(1.0 - 5.8 - 0.12))


def test_paired_bootstrap_covers_a_known_difference():
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        base = rng.normal(0.3, 0.2, 300)  # per-request metric of one ranker
        other = base + 0.02 + rng.normal(0, 0.05, 300)  # the other: +0.02 on average, paired noise
        diff, lo, hi, n = paired_interval(other, base, 0.95, 1000, seed)
        covered += lo <= 0.02 <= hi
        assert n == 300 and lo < diff < hi and hi - lo < 0.03  # pairing removes the shared variance
    assert covered >= 34  # a 95% interval: ~38 of 40 expected


def test_paired_interval_skips_nan_requests_and_needs_two():
    a = np.array([0.1, np.nan, 0.3, 0.5])
    b = np.array([0.0, 0.2, np.nan, 0.4])
    diff, lo, hi, n = paired_interval(a, b, 0.95, 200, 0)
    assert n == 2 and diff == pytest.approx(0.1) and lo == hi == pytest.approx(0.1)
    assert np.isnan(paired_interval(np.array([np.nan, 1.0]), np.array([1.0, np.nan]), 0.95, 200, 0)[0])


def test_summary_table_shows_the_model_next_to_the_references(make_cfg):
    from flows.main import champion_table
    from hap.registry.registration import metric_key

    cfg = make_cfg()
    metrics = {"gt_recall@50": 0.16, "recall@50": 0.34, "ref_prerank_gt_recall@50": 0.42, "n_requests": 600.0}
    metrics |= {"ref_truth_gt_recall@50": 1.0, "ci/gt_recall@50/halfwidth": 0.0055, "logloss": 0.6}
    logged = {metric_key(k): v for k, v in metrics.items()}  # as MLflow holds them
    text = "\n".join(champion_table(cfg, logged))
    assert "logged pre-ranking order" in text and "0.4200" in text and "ground truth" in text
    assert "half-width 0.0055 over 600 eval requests" in text
    assert "random order" not in text  # a ranker without metrics gets no row


def _eval_set(requests: int = 60, n: int = 40, seed: int = 3):
    """A synthetic eval set: ragged requests, a few exposures per request, some clicked."""
    import pyarrow as pa

    from hap.model.evaluate import EvalSet
    from hap.model.serving import RequestIndex

    rng = np.random.default_rng(seed)
    sizes = rng.integers(n // 2, n, requests)
    rid = np.repeat(np.arange(requests), sizes)
    exposed = rng.random(len(rid)) < 0.25
    label = (exposed & (rng.random(len(rid)) < 0.3)).astype(np.int64)
    rank_pos = np.where(rng.random(len(rid)) < 0.5, rng.integers(1, 120, len(rid)), 10**6)
    table = pa.table({"request_id": rid, "item_id": np.arange(len(rid)), "exposed": exposed, "label": label})
    index = RequestIndex.of(rid, table["item_id"].to_numpy())
    return EvalSet(None, table, index, index.valid()), rng.normal(size=len(rid)), rank_pos


def test_exposure_auc_matches_scikit_learn_per_request():
    from sklearn.metrics import roc_auc_score

    from hap.model.evaluate import exposure_auc_vector

    es, key, _ = _eval_set()
    key[::7] = key[1::7][: len(key[::7])]  # ties between candidates
    got = exposure_auc_vector(es, key)
    rid, exposed, label = (es.column(c) for c in ("request_id", "exposed", "label"))
    for r in range(len(got)):
        m = (rid == r) & exposed.astype(bool)
        if label[m].min(initial=1) == label[m].max(initial=0):
            assert np.isnan(got[r])  # a request without both a click and a non-click
        else:
            assert got[r] == pytest.approx(roc_auc_score(label[m], key[m]))


def test_stage_recall_matches_a_brute_force_count():
    es, key, rank_pos = _eval_set(seed=4)
    members = es.grid((rank_pos <= 50).astype(np.int64), 0)
    got = share_vectors(
        order_of(es.grid(key, -np.inf), es.valid), members, es.valid, [10, 50], "rank50_recall"
    )
    rid = es.column("request_id")
    for r in range(len(es.index.counts)):
        rows = np.flatnonzero(rid == r)
        top = rows[np.argsort(-key[rows], kind="stable")]
        kept = rank_pos[rows] <= 50
        for k in (10, 50):
            want = (rank_pos[top[:k]] <= 50).sum() / kept.sum() if kept.any() else np.nan
            assert got[f"rank50_recall@{k}"][r] == pytest.approx(want, nan_ok=True)
