"""Adapter from RecFlow (Kuaishou's public full-flow dataset) into our raw log contracts.

RecFlow ships one feather file per day in two folders: ``realshow/`` (the exposures) and
``all_stage/`` (the candidates of every stage, among them those a stage filtered out, flagged
``rank_neg``, ``coarse_neg`` and ``prerank_neg``). The mapping, and what RecFlow lacks:

- exposures: ``realshow == 1`` rows; the click is ``effective_view``; the display position is
  the row order within the request (RecFlow's ``rank_pos`` is a top-10 flag, not a position).
- ``rank_neg`` rows become ``rank_neg`` with ``rank_pos = rank_index + 1`` (RecFlow's ranking
  keeps its top 10, so RecFlow data needs ``contract.rank_keep: 10``); ``coarse_neg`` and
  ``prerank_neg`` rows become ``prerank_neg`` (both were dropped before ranking). RecFlow logs
  only that those ranked out of the top ``PRERANK_CUT``, so their ``prerank_pos`` is that bound + 1.
- ``duration`` is in milliseconds in RecFlow, seconds in our contract.
- RecFlow logs no retrieval order: every candidate the cascade logged was retrieved, at a position
  unknown to us, written as 1 (the retrieval cross feature is then a constant, and the logged
  retrieval reference ranker a random order). Global negatives were never retrieved: null.
- The full-flow log carries the same stage positions as the ranking log (exposures at their
  display position in the ranking's top), so the stage-aware ``rank50_recall@K`` is defined on it.
- RecFlow logs no global negatives: we draw ``global_neg_per_pos`` per click from the day's
  video pool with a seeded RNG, so the pipeline sees the same five sources.
- Features missing from RecFlow (activity, CTR, network, OS, channel, tags, language,
  resolution, most dense item values, the click sequence) are filled with 0, the padding id.
- The full-flow log is every ``all_stage`` candidate of ``full_flow_requests`` requests a day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from hap.core import layout, schema
from hap.core.atomic import atomic_dir
from hap.core.config import Config
from hap.core.errors import DataContractError
from hap.core.hashing import hash_ids

REALSHOW_COLUMNS = (
    "request_id",
    "request_timestamp",
    "user_id",
    "device_id",
    "age",
    "gender",
    "province",
    "video_id",
    "author_id",
    "category_level_one",
    "category_level_two",
    "upload_type",
    "upload_timestamp",
    "duration",
    "realshow",
    "effective_view",
)
ALL_STAGE_COLUMNS = (*REALSHOW_COLUMNS[:-2], "rank_neg", "coarse_neg", "prerank_neg", "rank_index")
PRERANK_CUT = 500  # RecFlow's coarse and pre-ranking stages keep their top 500
RECFLOW_ITEM_SALTS = {"i_id": 10, "i_author": 11, "i_content_type": 12, "i_category": 13, "i_subcategory": 14}


def _read(path: Path, required: tuple[str, ...]) -> pa.Table:
    try:
        table = feather.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataContractError(f"{path}: unreadable feather file ({err})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataContractError(f"{path}: not in RecFlow's layout, missing column(s) {missing}")
    return table


def _col(table: pa.Table, name: str, dtype=np.int64) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype)
    return table[name].fill_null(0).to_numpy().astype(dtype)


def _item_features(table: pa.Table, ts_ms: np.ndarray, buckets: int) -> dict[str, np.ndarray]:
    n = table.num_rows
    feats: dict[str, np.ndarray] = {name: np.zeros(n, np.int32) for name in schema.ITEM_CATEGORICAL}
    sources = {
        "i_id": "video_id",
        "i_author": "author_id",
        "i_content_type": "upload_type",
        "i_category": "category_level_one",
        "i_subcategory": "category_level_two",
    }
    for feat, column in sources.items():
        feats[feat] = hash_ids(_col(table, column), RECFLOW_ITEM_SALTS[feat], buckets)
    feats.update({name: np.zeros(n, np.float32) for name in schema.ITEM_DENSE})
    upload = _col(table, "upload_timestamp")
    feats["i_age_hours"] = np.clip((ts_ms - upload) / 3.6e6, 0, None).astype(np.float32)
    feats["i_duration"] = _col(table, "duration", np.float32) / 1000  # milliseconds -> seconds
    return feats


def _exposure(table: pa.Table, date: dt.date, seq_len: int, buckets: int) -> pa.Table:
    n = table.num_rows
    req = _col(table, "request_id")
    ts = _col(table, "request_timestamp")
    order = np.lexsort((np.arange(n), req))
    table = table.take(pa.array(order))
    req, ts = req[order], ts[order]
    position = _display_positions(req)
    click = _col(table, "effective_view", np.int8)
    hour = (ts // 3_600_000) % 24
    cols = {
        "request_id": req,
        "timestamp": pa.array(ts).cast(schema.TIMESTAMP),
        "user_id": _col(table, "user_id"),
        "item_id": _col(table, "video_id"),
        "position": position,
        "content_type": (_col(table, "upload_type") % 128).astype(np.int8),
        "click": click,
        "like": _col(table, "like", np.int8),
        "comment": _col(table, "comment", np.int8),
        "share": _col(table, "forward", np.int8),
        "dwell": np.zeros(n, np.float32),
        "u_id": hash_ids(_col(table, "user_id"), 1, buckets),
        "u_age": hash_ids(_col(table, "age"), 2, buckets),
        "u_gender": hash_ids(_col(table, "gender"), 3, buckets),
        "u_city": hash_ids(_col(table, "province"), 4, buckets),
        "u_device": hash_ids(_col(table, "device_id"), 5, buckets),
        "u_activity": np.zeros(n, np.float32),
        "u_ctr": np.zeros(n, np.float32),
        schema.USER_SEQUENCE: pa.FixedSizeListArray.from_arrays(
            pa.array(np.zeros(n * seq_len, np.int32)), seq_len
        ).cast(pa.list_(pa.int32())),
        "c_hour": hash_ids(hour, 20, buckets),
        "c_weekday": hash_ids(np.full(n, date.weekday()), 21, buckets),
        "c_network": np.zeros(n, np.int32),
        "c_os": np.zeros(n, np.int32),
        "c_channel": np.zeros(n, np.int32),
    }
    return pa.table(cols).cast(schema.EXPOSURE_LOG)


def _ranking(exposed: pa.Table, negatives: pa.Table, pool: pa.Table, cfg: Config, date: dt.date) -> pa.Table:
    sim = cfg.simulate
    rng = np.random.default_rng([sim.seed, date.toordinal(), 77])
    pieces = []
    rank_neg = _col(negatives, "rank_neg").astype(bool)
    pre_neg = (_col(negatives, "coarse_neg") | _col(negatives, "prerank_neg")).astype(bool) & ~rank_neg
    for table, source in (
        (exposed, "exposed"),
        (negatives.filter(pa.array(rank_neg)), "rank_neg"),
        (negatives.filter(pa.array(pre_neg)), "prerank_neg"),
    ):
        pieces.append((table, source))
    # global negatives: global_neg_per_pos random pool videos per click
    clicks = _col(exposed, "effective_view").astype(bool)
    clicked_req = _col(exposed, "request_id")[clicks]
    draw = rng.integers(0, max(pool.num_rows, 1), len(clicked_req) * cfg.contract.global_neg_per_pos)
    glob = pool.take(pa.array(draw)) if pool.num_rows else pool
    glob = glob.set_column(
        glob.column_names.index("request_id"),
        "request_id",
        pa.array(np.repeat(clicked_req, cfg.contract.global_neg_per_pos)),
    )
    pieces.append((glob, "global_neg"))

    out = []
    for table, source in pieces:
        n = table.num_rows
        ts = _col(table, "request_timestamp")
        rank_index = (
            _col(table, "rank_index") + 1 if "rank_index" in table.column_names else np.zeros(n, np.int64)
        )
        has_rank = (rank_index > 0) & (source == "rank_neg")
        prerank_pos = np.full(n, PRERANK_CUT + 1, np.int32)  # the best position RecFlow implies
        cols = {
            "request_id": _col(table, "request_id"),
            "item_id": _col(table, "video_id"),
            "source": pa.array([source] * n, pa.string()),
            "retrieval_pos": pa.array(np.ones(n, np.int32), mask=np.full(n, source == "global_neg")),
            "prerank_pos": pa.array(prerank_pos, mask=np.full(n, source != "prerank_neg")),
            "rank_pos": pa.array(rank_index.astype(np.int32), mask=~has_rank),
            "content_type": (_col(table, "upload_type") % 128).astype(np.int8),
            "true_affinity": pa.nulls(n, pa.float32()),
            **_item_features(table, ts, cfg.contract.hash_buckets),
        }
        out.append(pa.table(cols).cast(schema.RANKING_LOG))
    ranking = pa.concat_tables(out)
    # one row per (request, item, source): RecFlow can repeat a video inside a request
    keys = ranking.select(["request_id", "item_id", "source"]).to_pandas()
    return ranking.take(pa.array(np.flatnonzero(~keys.duplicated().to_numpy())))


def _display_positions(request_ids: np.ndarray) -> np.ndarray:
    """1-based position of each row within its request, in file order (RecFlow's display order)."""
    n = len(request_ids)
    order = np.lexsort((np.arange(n), request_ids))
    sorted_req = request_ids[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_req)) + 1]
    within = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, np.int32)
    out[order] = within + 1
    return out


def _stage_positions(all_stage: pa.Table, exposed: pa.Table) -> tuple[pa.Table, pa.Array, pa.Array]:
    """The day's candidates (exposures first, so they win a repeated video) with the stage positions
    RecFlow implies: an exposure ranked at its display position, a ``rank_neg`` at ``rank_index + 1``,
    a ``coarse_neg``/``prerank_neg`` just below the pre-ranking cut; null where no stage kept it."""
    rank_neg = _col(all_stage, "rank_neg").astype(bool)
    dropped = (_col(all_stage, "coarse_neg") | _col(all_stage, "prerank_neg")).astype(bool) & ~rank_neg
    index = (
        _col(all_stage, "rank_index") + 1
        if "rank_index" in all_stage.column_names
        else np.zeros(len(rank_neg))
    )
    has_rank = rank_neg & (index > 0)
    columns = list(ALL_STAGE_COLUMNS[:14])
    cand = pa.concat_tables([exposed.select(columns), all_stage.select(columns)])
    n_exp = exposed.num_rows
    rank_pos = np.r_[_display_positions(_col(exposed, "request_id")), index.astype(np.int32)]
    rank_mask = np.r_[np.zeros(n_exp, bool), ~has_rank]
    prerank_mask = np.r_[np.ones(n_exp, bool), ~dropped]
    prerank_pos = np.full(cand.num_rows, PRERANK_CUT + 1, np.int32)
    return cand, pa.array(rank_pos, mask=rank_mask), pa.array(prerank_pos, mask=prerank_mask)


def _fullflow(all_stage: pa.Table, exposed: pa.Table, cfg: Config, date: dt.date) -> pa.Table:
    rng = np.random.default_rng([cfg.simulate.seed, date.toordinal(), 78])
    req = np.unique(_col(exposed, "request_id"))
    chosen = rng.choice(req, size=min(cfg.simulate.full_flow_requests, len(req)), replace=False)
    cand, rank_pos, prerank_pos = _stage_positions(all_stage, exposed)
    keep = pa.array(np.isin(_col(cand, "request_id"), chosen))
    cand, rank_pos, prerank_pos = cand.filter(keep), rank_pos.filter(keep), prerank_pos.filter(keep)
    n = cand.num_rows
    exp_keys = set(zip(_col(exposed, "request_id").tolist(), _col(exposed, "video_id").tolist()))
    clicks = dict(
        zip(
            zip(_col(exposed, "request_id").tolist(), _col(exposed, "video_id").tolist()),
            _col(exposed, "effective_view").tolist(),
        )
    )
    pairs = list(zip(_col(cand, "request_id").tolist(), _col(cand, "video_id").tolist()))
    ts = _col(cand, "request_timestamp")
    cols = {
        "request_id": _col(cand, "request_id"),
        "item_id": _col(cand, "video_id"),
        "retrieval_pos": np.ones(n, np.int32),  # retrieved, at a position RecFlow does not log
        "prerank_pos": prerank_pos,
        "rank_pos": rank_pos,
        "exposed": np.array([p in exp_keys for p in pairs], bool),
        "click": np.array([clicks.get(p, 0) for p in pairs], np.int8),
        "content_type": (_col(cand, "upload_type") % 128).astype(np.int8),
        "true_affinity": pa.nulls(n, pa.float32()),
        **_item_features(cand, ts, cfg.contract.hash_buckets),
    }
    table = pa.table(cols).cast(schema.FULLFLOW_LOG)
    keys = table.select(["request_id", "item_id"]).to_pandas()
    return table.take(pa.array(np.flatnonzero(~keys.duplicated().to_numpy())))


def import_day(cfg: Config, root: Path, date: dt.date) -> dict[str, int]:
    """Map one RecFlow day into ``landing/dt=D`` (atomic)."""
    name = f"{date.isoformat()}.feather"
    realshow = _read(root / "realshow" / name, REALSHOW_COLUMNS)
    all_stage = _read(root / "all_stage" / name, ALL_STAGE_COLUMNS)
    exposed = realshow.filter(pa.array(_col(realshow, "realshow").astype(bool)))
    exposure = _exposure(exposed, date, cfg.contract.seq_len, cfg.contract.hash_buckets)
    pool = all_stage.select(list(ALL_STAGE_COLUMNS[:14]))
    ranking = _ranking(exposed, all_stage, pool, cfg, date)
    fullflow = _fullflow(all_stage, exposed, cfg, date)
    with atomic_dir(layout.landing_day(cfg, date)) as tmp:
        for log, table in (("exposure", exposure), ("ranking", ranking), ("fullflow", fullflow)):
            pq.write_table(table, tmp / f"{log}.parquet", compression="zstd")
    return {
        "exposures": exposure.num_rows,
        "ranking_rows": ranking.num_rows,
        "fullflow_rows": fullflow.num_rows,
    }


def import_recflow(cfg: Config, root: Path) -> Iterator[tuple[dt.date, dict[str, int]]]:
    """Import every day present in both ``realshow/`` and ``all_stage/``."""
    root = Path(root)
    if not (root / "realshow").is_dir() or not (root / "all_stage").is_dir():
        raise DataContractError(f"{root}: not a RecFlow root (expected realshow/ and all_stage/ folders)")
    days = sorted(
        {p.stem for p in (root / "realshow").glob("*.feather")}
        & {p.stem for p in (root / "all_stage").glob("*.feather")}
    )
    if not days:
        raise DataContractError(f"{root}: no day has both realshow/ and all_stage/ feather files")
    for stem in days:
        date = dt.date.fromisoformat(stem)
        yield date, import_day(cfg, root, date)
