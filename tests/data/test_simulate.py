"""The simulator's invariants, checked on its real output."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.sources.simulator import day_knobs, drift_strength, simulate_day

DAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def day_logs(tmp_path_factory):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("sim") / "data")
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
    assert 0.05 < exp.click.mean() < 0.4


def test_fullflow_logs_every_retrieved_candidate(day_logs):
    cfg, _, logs = day_logs
    full = logs["fullflow"].to_pandas()
    per_request = full.groupby("request_id").size()
    assert len(per_request) > 0
    assert (per_request == cfg.simulate.retrieval_size).all()
    assert (full.groupby("request_id").exposed.sum() == cfg.contract.exposed_per_request).all()
    assert full.loc[full.exposed, "rank_pos"].max() <= cfg.contract.exposed_per_request


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
