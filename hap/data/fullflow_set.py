"""The window's full-flow requests as supervision (RecFlow): every retrieved candidate with the
stage it reached.

The sampled logs show the cascade's decisions only around the clicks (exposures, a few ``rank_neg``
and ``prerank_neg``); the full-flow requests (``simulate.full_flow_requests`` a day) log all of
their retrieved candidates with ``prerank_pos`` and ``rank_pos``: how the next two stages, each
less noisy than the pre-ranker, ordered the very list the pre-ranker is served. ``hap split`` keeps
a hashed share (``split.fullflow_share``) of the window days' full-flow rows as
``training/dt=D/fullflow``, in the eval set's columns; training orders each request's rows by
the logged ranking order (``hap.model.distill``). The eval requests are left out when the eval day
lies in the window, as for the training set.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from hap.core import schema
from hap.core.config import Config
from hap.core.hashing import unit_hash
from hap.core.parquet import PARQUET_OPTIONS

_SALT_OFFSET = 0xF1F0  # the sampling hash's salt: split.seed + this


def write_fullflow_set(
    cfg: Config, window: list[dt.date], days: dict[dt.date, ds.Dataset], drop: np.ndarray | None, out: Path
) -> int:
    """Write the kept full-flow rows of the window days (``days``: each day's committed lake files) to
    ``out``; the rows written (0 and no file when ``split.fullflow_share`` is 0)."""
    share = cfg.split.fullflow_share
    if share <= 0:
        return 0
    columns = [c for c in schema.EVAL_SET.names if c != "dt"]
    rows = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out, schema.EVAL_SET, **PARQUET_OPTIONS) as writer:
        for day in window:
            if day not in days:
                continue
            for batch in days[day].to_batches(columns=columns, batch_size=cfg.split.batch_rows):
                table = pa.Table.from_batches([batch])
                rid, iid = table["request_id"].to_numpy(), table["item_id"].to_numpy()
                keep = unit_hash(rid, iid, cfg.split.seed + _SALT_OFFSET) < share
                if drop is not None and len(drop):
                    keep &= ~np.isin(rid, drop)
                table = table.filter(pa.array(keep))
                if table.num_rows == 0:
                    continue
                table = table.append_column("dt", pa.array([day.isoformat()] * table.num_rows, pa.string()))
                writer.write_table(table.select(schema.EVAL_SET.names).cast(schema.EVAL_SET))
                rows += table.num_rows
    return rows


def read_fullflow_set(path: Path) -> pa.Table | None:
    """The full-flow training rows at ``path`` (``training/dt=D/fullflow``), or None without any."""
    files = sorted(str(p) for p in Path(path).glob("*.parquet")) if Path(path).exists() else []
    if not files:
        return None
    table = ds.dataset(files, format="parquet").to_table()
    return table if table.num_rows else None


def stage_key(table: pa.Table) -> np.ndarray:
    """The logged ranking order as a sort key (higher = further): the candidates the ranking stage
    scored, by ``rank_pos``, above the rest, by ``prerank_pos``."""
    big = 1e6
    rank = pc.fill_null(table["rank_pos"], 0).to_numpy(zero_copy_only=False).astype(np.float64)
    pre = pc.fill_null(table["prerank_pos"], int(big)).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(rank > 0, 2 * big - rank, -pre)
