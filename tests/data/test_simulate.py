"""The simulator's invariants, checked on its real output."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.core.hashing import hash_ids
from hap.sources.simulator import day_knobs, drift_strength, simulate_day
from hap.sources.universe import build_universe, exact_grid

DAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def day_logs(tmp_path_factory):
    from conftest import tiny_config

    from hap.core.config import load_config

    # the realism checks below need the real click model, not the tiny worlds' raised CTR
    offset = load_config().simulate.click_offset
    cfg = tiny_config(tmp_path_factory.mktemp("sim") / "data", simulate__click_offset=offset)
    stats = simulate_day(cfg, DAY, progress=False)
    logs = {name: pq.read_table(layout.raw_log(cfg, DAY, name)) for name in schema.RAW_LOGS}
    return cfg, stats, logs


def test_logs_follow_their_contracts(day_logs):
    _, stats, logs = day_logs
    for name, table in logs.items():
        assert table.schema.equals(schema.RAW_LOGS[name]), name
    assert stats.requests == 240
    assert logs["exposure"].num_rows == stats.exposures == 240 * 10
    assert len(schema.FEATURE_COLUMNS) == 29


def test_toutiaorec_sampling_per_request(day_logs):
    cfg, _, logs = day_logs
    con = cfg.contract
    rank = logs["ranking"].to_pandas()
    clicks = logs["exposure"].to_pandas().groupby("request_id").click.sum()
    counts = rank.groupby(["request_id", "source"]).size().unstack(fill_value=0)
    assert (counts["rank_neg"] == con.rank_neg_per_request).all()
    assert (counts["prerank_neg"] == con.prerank_neg_per_request).all()
    assert (counts["exposed"] == con.exposed_per_request).all()
    global_neg = counts.get("global_neg", pd.Series(dtype=int)).reindex(clicks.index, fill_value=0)
    assert (global_neg == con.global_neg_per_pos * clicks).all()
    assert (rank.loc[rank.source == "rank_neg", "rank_pos"] > con.rank_keep).all()
    assert (rank.loc[rank.source == "prerank_neg", "prerank_pos"] > con.prerank_keep).all()
    assert rank.loc[rank.source == "prerank_neg", "rank_pos"].isna().all()
    assert (
        rank.loc[rank.source == "global_neg", ["retrieval_pos", "prerank_pos", "rank_pos"]].isna().all().all()
    )
    assert not rank.duplicated(["request_id", "item_id", "source"]).any()


def test_true_affinity_orders_sources_and_ctr_rises_with_it(day_logs):
    _, _, logs = day_logs
    rank = logs["ranking"].to_pandas()
    exp = logs["exposure"].to_pandas()
    exposed = rank[rank.source == "exposed"].merge(
        exp[["request_id", "item_id", "click"]], on=["request_id", "item_id"]
    )
    mean = rank.groupby("source").true_affinity.mean()
    expose_neg = exposed.loc[exposed.click == 0, "true_affinity"].mean()
    assert expose_neg > mean["rank_neg"] > mean["prerank_neg"] > mean["global_neg"]
    ctr_by_bin = exposed.groupby(pd.qcut(exposed.true_affinity, 4), observed=True).click.mean().to_numpy()
    assert ctr_by_bin[-1] > ctr_by_bin[0] + 0.1
    assert np.all(np.diff(ctr_by_bin) > -0.05)  # noisy, but no real dip
    assert 0.01 < exp.click.mean() < 0.12  # a real feed's exposure CTR, not 20%+


def test_fullflow_logs_every_retrieved_candidate(day_logs):
    cfg, _, logs = day_logs
    full = logs["fullflow"].to_pandas()
    per_request = full.groupby("request_id").size()
    assert len(per_request) == cfg.simulate.full_flow_requests  # a count per day, not a share
    assert full["true_affinity"].notna().all()
    assert (per_request == cfg.simulate.retrieval_size).all()
    assert (full.groupby("request_id").exposed.sum() == cfg.contract.exposed_per_request).all()
    assert full.loc[full.exposed, "rank_pos"].max() <= cfg.contract.exposed_per_request


@pytest.mark.parametrize(("requests", "count", "chunk"), [(240, 24, 100), (1000, 24, 64), (50, 80, 16)])
def test_full_flow_count_does_not_move_with_volume_or_chunking(make_cfg, requests, count, chunk):
    from hap.sources.simulator import full_flow_rows

    sim = make_cfg(
        simulate__requests_per_day=requests,
        simulate__full_flow_requests=count,
        simulate__chunk_requests=chunk,
    ).simulate
    rows = np.concatenate(
        [s + full_flow_rows(sim, s, min(chunk, requests - s)) for s in range(0, requests, chunk)]
    )
    assert len(rows) == min(count, requests) and len(np.unique(rows)) == len(rows)
    assert rows.max() < requests


def test_same_seed_same_bytes_other_seed_other_bytes(make_cfg, tmp_path):
    def digest(cfg):
        simulate_day(cfg, DAY, progress=False)
        return {
            n: hashlib.sha256(layout.raw_log(cfg, DAY, n).read_bytes()).hexdigest() for n in schema.RAW_LOGS
        }

    first = digest(make_cfg(tmp_path / "a", simulate__requests_per_day=60))
    again = digest(make_cfg(tmp_path / "b", simulate__requests_per_day=60))
    other = digest(make_cfg(tmp_path / "c", simulate__requests_per_day=60, simulate__seed=1))
    assert first == again
    assert first["ranking"] != other["ranking"]


def test_affinity_is_exact_whatever_the_summation_order(make_cfg):
    """On the latent grid every dot product is exact in float64, so BLAS, a forward loop and a
    reversed loop agree to the bit; without the grid the two loops already disagree."""
    sim = make_cfg().simulate
    uni = build_universe(sim, 1 << 18, 4)
    users = np.arange(40)
    pref = uni.user_pref[users]

    def looped(u: np.ndarray, v: np.ndarray, order: range) -> np.ndarray:
        out = np.zeros((u.shape[0], v.shape[0]))
        for j in order:
            out += u[:, j, None].astype(np.float64) * v[:, j].astype(np.float64)
        return out

    d = uni.item_vec.shape[1]
    best = [
        np.max([looped(uni.user_vec[users, k], uni.item_vec, order) for k in range(uni.user_vec.shape[1])], 0)
        for order in (range(d), range(d - 1, -1, -1))
    ]
    assert np.array_equal(best[0], best[1])
    expected = best[0].astype(np.float32) + uni.item_bias + pref[:, uni.item_ctype]
    assert np.array_equal(uni.affinity(users, pref), expected)

    rough = np.random.default_rng(0).normal(0, 0.6, (2, 400, d)).astype(np.float32)
    assert not np.array_equal(looped(*rough, range(d)), looped(*rough, range(d - 1, -1, -1)))
    on_grid = exact_grid(rough, d)
    assert np.abs(on_grid - rough).max() <= 2.0**-22  # |values| < 4: float32's own step there
    assert np.array_equal(looped(*on_grid, range(d)), looped(*on_grid, range(d - 1, -1, -1)))


def test_the_simulated_bytes_do_not_depend_on_blas_threads(tmp_path):
    """A Dask nanny sets OMP_NUM_THREADS=1 in its parent; another machine has other cores. Neither
    may change a simulated day (a DVC rebuild compares hashes)."""
    script = (
        "import sys, datetime as dt; from pathlib import Path; from conftest import tiny_config; "
        "from hap.sources.simulator import simulate_day; "
        "simulate_day(tiny_config(Path(sys.argv[1])), dt.date(2026, 11, 1), progress=False)"
    )
    root = Path(__file__).resolve().parents[2]
    digests = []
    for threads in ("1", "3"):
        home = tmp_path / f"threads{threads}"
        blas = {v: threads for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        env = {**os.environ, **blas, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
        subprocess.run([sys.executable, "-c", script, str(home)], env=env, check=True, timeout=300)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in home.rglob("*.parquet")})
    assert digests[0] == digests[1] and len(digests[0]) == len(schema.RAW_LOGS)


def test_drift_scenarios_change_the_cascade(make_cfg):
    stable = make_cfg(simulate__scenario="stable").simulate
    degrade = make_cfg(
        simulate__scenario="retrieval_degrades",
        simulate__drift_start="2026-11-03",
        simulate__drift_ramp_days=2,
    ).simulate
    shift = make_cfg(simulate__scenario="content_shift", simulate__drift_start="2026-11-03").simulate
    before, after = dt.date(2026, 11, 2), dt.date(2026, 11, 10)
    assert drift_strength(stable, after) == 0.0
    assert drift_strength(degrade, before) == 0.0 and drift_strength(degrade, after) == 1.0
    assert drift_strength(degrade, dt.date(2026, 11, 3)) == 0.5
    assert day_knobs(degrade, after, 5).pool > day_knobs(degrade, before, 5).pool
    assert day_knobs(degrade, after, 5).retrieval_noise < day_knobs(degrade, before, 5).retrieval_noise
    assert day_knobs(shift, after, 5).ctype_shift[0] > 0 == day_knobs(shift, before, 5).ctype_shift[0]


def test_content_shift_moves_the_content_mix(make_cfg):
    cfg = make_cfg(
        simulate__scenario="content_shift",
        simulate__drift_start="2026-11-02",
        simulate__drift_ramp_days=1,
        simulate__content_shift_strength=3.0,
    )
    share = {}
    for date in (dt.date(2026, 11, 1), dt.date(2026, 11, 2)):
        simulate_day(cfg, date, progress=False)
        exp = pq.read_table(layout.raw_log(cfg, date, "exposure"), columns=["content_type"]).to_pandas()
        share[date] = (exp.content_type == 0).mean()
    assert share[dt.date(2026, 11, 2)] > share[dt.date(2026, 11, 1)] + 0.1


def _true_top50_overlap(full: pd.DataFrame, position: str) -> float:
    """Mean share of each request's true top-50 (by affinity) inside the stage's top-50."""
    shares = []
    for _, g in full.groupby("request_id"):
        truth = set(g.nlargest(50, "true_affinity").index)
        shares.append(len(truth & set(g[position].fillna(1e9).nsmallest(50).index)) / 50)
    return float(np.mean(shares))


def test_stage_precision_improves_along_the_cascade(day_logs):
    full = day_logs[2]["fullflow"].to_pandas()
    retrieval, prerank, rank = (
        _true_top50_overlap(full, p) for p in ("retrieval_pos", "prerank_pos", "rank_pos")
    )
    assert retrieval + 0.1 < prerank < rank


def test_users_return_and_their_clicks_reveal_several_interests(make_cfg):
    cfg = make_cfg(simulate__n_users=60, simulate__requests_per_day=200)
    simulate_day(cfg, DAY, progress=False)
    exp = pq.read_table(
        layout.raw_log(cfg, DAY, "exposure"), columns=["request_id", "user_id", "u_click_seq"]
    )
    per_request = exp.to_pandas().drop_duplicates("request_id")
    assert len(per_request) / per_request.user_id.nunique() > 2.5  # several requests per active user a day
    sim = cfg.simulate
    uni = build_universe(sim, cfg.contract.hash_buckets, cfg.contract.n_content_types)
    item_of_hash = dict(
        zip(hash_ids(np.arange(sim.n_items), 10, cfg.contract.hash_buckets).tolist(), range(sim.n_items))
    )
    covered = []
    for user, seq in zip(per_request.user_id, per_request.u_click_seq):
        items = np.array([item_of_hash[h] for h in seq])
        best = (uni.user_vec[user] @ uni.item_vec[items].T).argmax(0)  # which interest each click matches
        covered.append(len(np.unique(best)))
    assert sim.n_interests >= 3 and np.mean(covered) >= 2.5
