"""User-history profiles: the split's point-in-time join of what the logs say about each user.

Written by ``hap split`` next to the training and eval sets, as ``training/dt=D/profile/`` (DVC
tracks it with them), and read by training, evaluation and serving alike (``hap.model.cross``):

- ``users.parquet``: per ``as_of`` day, user (``u_id``) and item category: ``logged``, how many of
  the user's logged candidates (every sample the cascade logged for them: exposed, ``rank_neg``,
  ``prerank_neg``; not the random ``global_neg``) had that category, and ``clicked``, how many clicks;
- ``segments.parquet``: per ``as_of`` day, user segment (``u_city``) and category: exposures and clicks;
- ``items.parquet``: item id (``i_id``, the click sequence's id space) -> ``i_category``, from the
  window's samples (item metadata, not behaviour: the one table not cut at ``as_of``);
- ``_profile.json``: the days each ``as_of`` profile was built from, and ``serve_as_of`` (the eval day).

**Point in time.** The profile ``as_of`` day ``a`` counts only the lake days ``[a - model.profile_days,
a - 1]``: a training row of day ``a`` sees nothing of its own day or later, and the eval day's
profile (what the bundle serves) is built from the window, never from the eval day itself.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import schema
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.parquet import PARQUET_OPTIONS
from hap.data import lake

USERS_FILE, SEGMENTS_FILE, ITEMS_FILE, META_FILE = (
    "users.parquet",
    "segments.parquet",
    "items.parquet",
    "_profile.json",
)
LOGGED_SOURCES = tuple(s for s in schema.SOURCES if s != schema.Source.GLOBAL_NEG.value)
EXPOSED_SOURCES = (schema.Source.EXPOSE_POS.value, schema.Source.EXPOSE_NEG.value)
_COLUMNS = ["u_id", "u_city", "i_id", "i_category", "source", "label"]


def _day_samples(cfg: Config, day: dt.date) -> pa.Table | None:
    return lake.read_day(cfg, "samples", day, _COLUMNS)


def _counts(table: pa.Table, keys: list[str], sources: tuple[str, ...], name: str) -> pa.Table:
    rows = table.filter(pc.is_in(table["source"], value_set=pa.array(sources)))
    agg = rows.group_by(keys).aggregate([("label", "count"), ("label", "sum")])
    return pa.table(
        {
            **{k: agg[k] for k in keys},
            name: pc.cast(agg["label_count"], pa.float32()),
            "clicked": pc.cast(agg["label_sum"], pa.float32()),
        }
    )


def _as_of(table: pa.Table, day: dt.date) -> pa.Table:
    return table.add_column(0, "as_of", pa.array([day.isoformat()] * table.num_rows, pa.string()))


def build_profiles(cfg: Config, window: list[dt.date], eval_day: dt.date, out: Path) -> dict:
    """Write the profiles of every window day and of ``eval_day`` into ``out``; returns the meta.
    When the eval day is the window's last day, its held-out requests are in no profile either:
    no ``as_of`` profile counts its own day."""
    out.mkdir(parents=True, exist_ok=True)
    as_of_days = sorted({*window, eval_day})
    needed = sorted(
        {a - dt.timedelta(days=k) for a in as_of_days for k in range(1, cfg.model.profile_days + 1)}
    )
    cache: dict[dt.date, pa.Table] = {}
    for day in needed:
        table = _day_samples(cfg, day)
        if table is not None and table.num_rows:
            cache[day] = table
    users, segments, used = [], [], {}
    for a in as_of_days:
        days = [a - dt.timedelta(days=k) for k in range(cfg.model.profile_days, 0, -1)]
        days = [d for d in days if d in cache]
        used[a.isoformat()] = [d.isoformat() for d in days]
        if not days:
            continue
        hist = pa.concat_tables([cache[d] for d in days])
        users.append(_as_of(_counts(hist, ["u_id", "i_category"], LOGGED_SOURCES, "logged"), a))
        segments.append(_as_of(_counts(hist, ["u_city", "i_category"], EXPOSED_SOURCES, "exposed"), a))
    empty_u = pa.schema([("as_of", pa.string()), ("u_id", pa.int64()), ("i_category", pa.int64())])
    empty_s = pa.schema([("as_of", pa.string()), ("u_city", pa.int64()), ("i_category", pa.int64())])
    _write(users, empty_u.append(pa.field("logged", pa.float32())), out / USERS_FILE)
    _write(segments, empty_s.append(pa.field("exposed", pa.float32())), out / SEGMENTS_FILE)
    _write_items(cfg, window, out / ITEMS_FILE)
    meta = {"profile_days": cfg.model.profile_days, "serve_as_of": eval_day.isoformat(), "built_from": used}
    atomic_write_json(out / META_FILE, meta)
    return meta


def _write(parts: list[pa.Table], empty: pa.Schema, path: Path) -> None:
    empty = empty.append(pa.field("clicked", pa.float32()))
    table = (
        pa.concat_tables([p.select(empty.names).cast(empty) for p in parts]) if parts else empty.empty_table()
    )
    table = table.sort_by([(n, "ascending") for n in empty.names[:3]])  # same bytes for the same logs
    pq.write_table(table, path, **PARQUET_OPTIONS)


def _write_items(cfg: Config, window: list[dt.date], path: Path) -> None:
    parts = []
    for day in window:
        table = _day_samples(cfg, day)
        if table is not None:
            parts.append(table.select(["i_id", "i_category"]))
    if parts:
        items = pa.concat_tables(parts).group_by(["i_id"]).aggregate([("i_category", "max")])
        items = pa.table({"i_id": items["i_id"], "i_category": items["i_category_max"]})
    else:
        items = pa.table({"i_id": pa.array([], pa.int64()), "i_category": pa.array([], pa.int64())})
    pq.write_table(items.sort_by("i_id"), path, **PARQUET_OPTIONS)


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())
