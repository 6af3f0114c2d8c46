"""The RecFlow adapter maps a fixture written in RecFlow's documented layout into our contracts."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.core.errors import DataContractError
from hap.data import lake as lake_tables
from hap.data.ingest import ingest_day
from hap.sources.recflow import import_recflow

DAY = dt.date(2024, 2, 1)


def write_fixture(root, n_requests=6, shown=4, seed=0):
    """A tiny RecFlow day: realshow/ (exposures) and all_stage/ (filtered candidates)."""
    rng = np.random.default_rng(seed)
    base_ts = int(dt.datetime(2024, 2, 1, 8, tzinfo=dt.UTC).timestamp() * 1000)

    def rows(req, videos, **flags):
        n = len(videos)
        cols = {
            "request_id": np.full(n, req),
            "request_timestamp": np.full(n, base_ts + req * 1000),
            "user_id": np.full(n, req % 3),
            "device_id": np.full(n, 7),
            "age": np.full(n, 2),
            "gender": np.full(n, 1),
            "province": np.full(n, 11),
            "video_id": videos,
            "author_id": videos // 10,
            "category_level_one": videos % 5,
            "category_level_two": videos % 17,
            "upload_type": videos % 3,
            "upload_timestamp": np.full(n, base_ts - 3_600_000),
            "duration": np.full(n, 30),
        }
        cols.update({k: np.asarray(v) for k, v in flags.items()})
        return cols

    shows, stages = [], []
    for req in range(1, n_requests + 1):
        vids = rng.choice(1000, 4 * shown, replace=False)
        clicks = (np.arange(shown) == req % shown).astype(int)
        shows.append(
            rows(
                req,
                vids[:shown],
                realshow=np.ones(shown, int),
                effective_view=clicks,
                rank_pos=np.arange(1, shown + 1),
            )
        )
        negs = vids[shown:]
        k = len(negs)
        stages.append(
            rows(
                req,
                negs,
                rank_neg=(np.arange(k) < k // 3).astype(int),
                coarse_neg=((np.arange(k) >= k // 3) & (np.arange(k) < 2 * k // 3)).astype(int),
                prerank_neg=(np.arange(k) >= 2 * k // 3).astype(int),
                rank_index=np.arange(60, 60 + k),
                realshow=np.zeros(k, int),
            )
        )
    for folder, parts in (("realshow", shows), ("all_stage", stages)):
        (root / folder).mkdir(parents=True)
        table = pa.concat_tables([pa.table(p) for p in parts])
        feather.write_feather(table, root / folder / f"{DAY.isoformat()}.feather")
    return shows, stages


def test_recflow_fixture_round_trips_into_the_lake(make_cfg, tmp_path):
    cfg = make_cfg(simulate__full_flow_requests=3)
    shows, stages = write_fixture(tmp_path / "recflow")
    imported = dict(import_recflow(cfg, tmp_path / "recflow"))
    assert list(imported) == [DAY]
    for name in schema.RAW_LOGS:
        assert pq.read_schema(layout.raw_log(cfg, DAY, name)).equals(schema.RAW_LOGS[name])
    report = ingest_day(cfg, DAY, require_validated=False)
    lake = lake_tables.read_day(cfg, "samples", DAY).to_pandas()
    n_shown = sum(len(s["video_id"]) for s in shows)
    n_clicks = sum(int(s["effective_view"].sum()) for s in shows)
    n_rank = sum(int(s["rank_neg"].sum()) for s in stages)
    n_pre = sum(int((s["coarse_neg"] | s["prerank_neg"]).sum()) for s in stages)
    assert report.requests == len(shows)
    assert report.by_source == {
        "expose_pos": n_clicks,
        "expose_neg": n_shown - n_clicks,
        "rank_neg": n_rank,
        "prerank_neg": n_pre,
        "global_neg": cfg.contract.global_neg_per_pos * n_clicks,
    }
    shown_pairs = {(r, v) for s in shows for r, v in zip(s["request_id"], s["video_id"])}
    lake_exposed = lake[lake.source.isin(["expose_pos", "expose_neg"])]
    assert set(zip(lake_exposed.request_id, lake_exposed.item_id)) == shown_pairs
    assert (lake.loc[lake.source == "rank_neg", "rank_pos"] > 50).all()


def test_a_folder_that_is_not_recflow_is_refused(make_cfg, tmp_path):
    with pytest.raises(DataContractError, match="not a RecFlow root"):
        list(import_recflow(make_cfg(), tmp_path))
