"""The RecFlow adapter maps a fixture written in RecFlow's documented layout into our contracts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.core.errors import DataContractError
from hap.data import lake as lake_tables
from hap.data.ingest import ingest_day
from hap.sources.recflow import PRERANK_CUT, import_recflow
from tests.recflow_fixture import START, write_fixture


def test_recflow_fixture_round_trips_into_the_lake(make_cfg, tmp_path):
    cfg = make_cfg(simulate__full_flow_requests=3)
    (day,) = write_fixture(tmp_path / "recflow", days=1, n_requests=6)
    imported = dict(import_recflow(cfg, tmp_path / "recflow"))
    assert list(imported) == [START]
    for name in schema.RAW_LOGS:
        assert pq.read_schema(layout.raw_log(cfg, START, name)).equals(schema.RAW_LOGS[name])
    report = ingest_day(cfg, START, require_validated=False)
    lake = lake_tables.read_day(cfg, "samples", START).to_pandas()
    shows, stages = day.realshow, day.all_stage
    n_clicks = int(shows["effective_view"].sum())
    assert report.requests == shows["request_id"].nunique()
    assert report.by_source == {
        "expose_pos": n_clicks,
        "expose_neg": len(shows) - n_clicks,
        "rank_neg": int(stages["rank_neg"].sum()),
        "prerank_neg": int((stages["coarse_neg"] | stages["prerank_neg"]).sum()),
        "global_neg": cfg.contract.global_neg_per_pos * n_clicks,
    }
    lake_exposed = lake[lake.source.isin(["expose_pos", "expose_neg"])]
    assert set(zip(lake_exposed.request_id, lake_exposed.item_id)) == set(
        zip(shows["request_id"], shows["video_id"])
    )
    # RecFlow's rank_index is 0-based and its ranking keeps the top 10
    rank_neg = stages[stages["rank_neg"] == 1]
    lake_rank = lake[lake.source == "rank_neg"]
    assert sorted(lake_rank.rank_pos) == sorted(rank_neg["rank_index"] + 1)
    assert (lake_rank.rank_pos > 10).all()
    assert (lake.loc[lake.source == "prerank_neg", "prerank_pos"] == PRERANK_CUT + 1).all()
    # duration: milliseconds in RecFlow, seconds in the contract
    durations = dict(zip(stages["video_id"], stages["duration"] / 1000))
    expected = lake_exposed.item_id.map(durations).to_numpy()
    assert np.allclose(lake_exposed.i_duration.to_numpy(), expected)


def test_a_folder_that_is_not_recflow_is_refused(make_cfg, tmp_path):
    with pytest.raises(DataContractError, match="not a RecFlow root"):
        list(import_recflow(make_cfg(), tmp_path))
