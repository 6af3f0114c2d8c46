"""Ingest joins the raw logs into the lake atomically and idempotently (the lake's own guarantees,
on a folder and on the S3 server, are in tests/data/test_lake.py)."""

from __future__ import annotations

import datetime as dt

import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.core.errors import DataContractError
from hap.data import lake as lake_tables
from hap.data.ingest import ingest_day
from hap.sources.simulator import simulate_day

DAY = dt.date(2026, 11, 1)


@pytest.fixture
def landed(make_cfg):
    cfg = make_cfg(simulate__requests_per_day=80)
    simulate_day(cfg, DAY, progress=False)
    return cfg


def _lake(cfg, table):
    """The table as delta-rs itself reads it (its partition columns ``dt`` and ``bucket`` included)."""
    from deltalake import DeltaTable

    return DeltaTable(lake_tables.table_url(cfg, table)).to_pyarrow_table()


def test_ingest_joins_per_request_and_is_idempotent(landed):
    cfg = landed
    first = ingest_day(cfg, DAY, require_validated=False)
    lake = _lake(cfg, "samples")
    assert first.samples == lake.num_rows
    again = ingest_day(cfg, DAY, require_validated=False)
    relake = _lake(cfg, "samples")
    assert again.samples == first.samples == relake.num_rows
    assert relake.sort_by(
        [("request_id", "ascending"), ("item_id", "ascending"), ("source", "ascending")]
    ).equals(lake.sort_by([("request_id", "ascending"), ("item_id", "ascending"), ("source", "ascending")]))
    assert set(first.by_source) == set(schema.SOURCES)
    # one committed file per bucket: the re-run replaced the day's files, it did not add to them
    parts = lake_tables.day_parts(cfg, "samples", DAY)
    assert [p.bucket for p in parts] == list(range(len(parts)))


def test_lake_rows_match_the_raw_logs(landed):
    cfg = landed
    ingest_day(cfg, DAY, require_validated=False)
    lake = _lake(cfg, "samples").to_pandas()
    exposure = pq.read_table(layout.raw_log(cfg, DAY, "exposure")).to_pandas()
    ranking = pq.read_table(layout.raw_log(cfg, DAY, "ranking")).to_pandas()
    assert len(lake) == len(ranking)
    assert (lake.source == "expose_pos").sum() == exposure.click.sum()
    assert (lake.source == "expose_neg").sum() == (exposure.click == 0).sum()
    assert lake.label.sum() == exposure.click.sum()
    assert set(lake.loc[lake.label == 1, "source"]) == {"expose_pos"}
    # request-side features come from the exposure log of the same request
    by_req = exposure.groupby("request_id").u_id.first()
    assert (lake.set_index("request_id").u_id == by_req.reindex(lake.request_id).to_numpy()).all()
    assert (lake.dt.astype(str) == DAY.isoformat()).all()
    full = _lake(cfg, "fullflow").to_pandas()
    assert full.label.sum() <= exposure.click.sum()
    assert len(full) == pq.read_metadata(layout.raw_log(cfg, DAY, "fullflow")).num_rows


@pytest.mark.parametrize("damage", ["missing", "zero_byte", "truncated"])
def test_unreadable_raw_logs_give_a_clear_error_and_no_lake_output(landed, damage):
    cfg = landed
    path = layout.raw_log(cfg, DAY, "ranking")
    if damage == "missing":
        path.unlink()
    elif damage == "zero_byte":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataContractError, match=str(path)):
        ingest_day(cfg, DAY, require_validated=False)
    assert not lake_tables.has_day(cfg, "samples", DAY)


def test_lake_row_groups_do_not_shrink_as_the_day_is_cut_finer(make_cfg):
    """A bucket reaches ingest as one piece per slice of the raw log, and a bigger day has more
    slices, so the pieces shrink with the day; the lake's row groups must not."""
    row_group_rows = 1024
    cfg = make_cfg(
        simulate__requests_per_day=150,
        simulate__chunk_requests=10,  # 15 row groups per raw log
        engine__bucket_requests=75,  # two buckets of ~2,300 ranking rows
        engine__slice_rows=50,  # one row group per slice: each bucket arrives in 15 pieces
        split__batch_rows=row_group_rows,
    )
    simulate_day(cfg, DAY, progress=False)
    ingest_day(cfg, DAY, require_validated=False)
    files = [p.uri for p in lake_tables.day_parts(cfg, "samples", DAY)]
    assert len(files) == 2
    for path in files:
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert meta.num_row_groups > 1 and all(n == row_group_rows for n in sizes[:-1]), (path, sizes)
