"""Reading raw logs for validation, and the frames the GX suites run on.

Heavy work that GX on pandas does slowly (joins and per-request aggregation) is done here with
pyarrow, producing derived columns and a per-request frame; GX then applies the expectations
from ``expectations/*.json`` to them. No check is dropped: each derived column is named by the
expectation that uses it (see ``hap.data.suites``). The ``drift`` frame, a day's distributions
against the trailing days', is built by ``hap.data.day_profile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import hashing, schema
from hap.core.errors import is_io_failure, unreachable


@dataclass
class ReadProblem:
    """A file that was reached and cannot be read as Parquet: missing from its landing day, zero
    bytes, truncated or not Parquet. A file that could not be *reached* (I/O, permissions, a
    storage timeout) is no ReadProblem: it raises ``InputUnreachable`` (``hap.core.errors``)."""

    file: str
    check: str
    message: str


def read_table(path: Path, columns: list[str] | None = None) -> tuple[pa.Table | None, ReadProblem | None]:
    """Read a whole Parquet file; every way it can be unreadable becomes a ``ReadProblem``."""
    handle, problem = open_parquet(path)
    if problem:
        return None, problem
    try:
        return handle.read(columns=columns), None
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        return None, unreadable_or_raise(path, err)


def open_parquet(path: Path) -> tuple[pq.ParquetFile | None, ReadProblem | None]:
    """Open a Parquet file by its footer (no data read); a missing, empty or corrupt file is a
    ``ReadProblem``."""
    try:
        if not path.exists():
            return None, ReadProblem(str(path), "file_exists", "missing: the file never landed")
        if path.stat().st_size == 0:
            return None, ReadProblem(str(path), "file_not_empty", "zero-byte file")
        handle = pq.ParquetFile(path)
        handle.schema_arrow  # noqa: B018 - forces the footer to be parsed
        return handle, None
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        return None, unreadable_or_raise(path, err)


def unreadable(path: Path | str, err: BaseException | str) -> ReadProblem:
    return ReadProblem(str(path), "parquet_readable", f"unreadable Parquet, truncated or corrupt ({err})")


def unreadable_or_raise(path: Path | str, err: BaseException) -> ReadProblem:
    """The ``ReadProblem`` of content that was read and is not valid Parquet; an I/O failure (the
    file not reached) raises ``InputUnreachable`` instead, so it never quarantines a day."""
    if is_io_failure(err):
        raise unreachable(path, err) from None
    return unreadable(path, err)


def type_name(t: pa.DataType) -> str:
    """Arrow type as text, ignoring the list item's field name (Parquet writes 'element')."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_name(t.value_type)}>"
    return str(t)


def schema_frame(table: pa.Table, contract: pa.Schema, keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """The schema frame of a table in memory (see ``schema_frame_of``)."""
    nulls = {c: int(table[c].null_count) for c in table.column_names}
    return schema_frame_of(table.schema, nulls, contract, keys)


def schema_frame_of(
    file_schema: pa.Schema, null_counts: dict[str, int], contract: pa.Schema, keys: tuple[str, ...] = ()
) -> pd.DataFrame:
    """One row per column of the file or the contract: presence, Arrow types, nullability and
    null count (exact: summed over the slices that were read), for the suites' schema checks."""
    rows = []
    for name in [*contract.names, *[n for n in file_schema.names if n not in contract.names]]:
        in_file, in_contract = name in file_schema.names, name in contract.names
        rows.append(
            {
                "column": name,
                "in_file": in_file,
                "in_contract": in_contract,
                "arrow_type": type_name(file_schema.field(name).type) if in_file else "<missing>",
                "contract_type": type_name(contract.field(name).type) if in_contract else "<not in contract>",
                "nullable": contract.field(name).nullable if in_contract else True,
                "key": name in keys,
                "null_count": int(null_counts.get(name, 0)) if in_file else 0,
            }
        )
    return pd.DataFrame(rows)


# Columns the row-level expectations read. Feature columns are covered by the schema frame
# (types and exact null counts from Arrow), so they are not converted to pandas.
EXPOSURE_ROW_COLUMNS = (
    "request_id",
    "timestamp",
    "user_id",
    "item_id",
    "position",
    "content_type",
    "click",
    "like",
    "comment",
    "share",
    "dwell",
    *schema.USER_DENSE,
    *schema.USER_CATEGORICAL,
    *schema.CONTEXT_CATEGORICAL,
)
RANKING_ROW_COLUMNS = (
    "request_id",
    "item_id",
    "source",
    "content_type",
    "true_affinity",
    *schema.ITEM_DENSE,
    *schema.ITEM_CATEGORICAL,
)
FULLFLOW_ROW_COLUMNS = (
    "request_id",
    "item_id",
    "retrieval_pos",
    "prerank_pos",
    "rank_pos",
    "exposed",
    "click",
    "content_type",
    "true_affinity",
    *schema.ITEM_DENSE,
    *schema.ITEM_CATEGORICAL,
)
# The files a landing day holds; ``_SUCCESS`` is the completion flag some producers (Spark, Hadoop)
# write. Anything else fails validation: a late or extra file is never silently ignored.
LANDING_FILES = frozenset({*(f"{name}.parquet" for name in schema.RAW_LOGS), "_SUCCESS"})
RANKING_POSITION_COLUMNS = ("request_id", "retrieval_pos", "prerank_pos", "rank_pos")
SOURCE_POSITIONS = {  # batch -> (the ranking-log source it holds, the stage position its checks read)
    "rank_neg_positions": ("rank_neg", "rank_pos"),
    "prerank_neg_positions": ("prerank_neg", "prerank_pos"),
    "exposed_positions": ("exposed", "rank_pos"),
}
TRAINING_ROW_COLUMNS = (
    "dt",
    "request_id",
    "item_id",
    "source",
    "group",
    "difficulty",
    "label",
    "retrieval_pos",
    "prerank_pos",
    "rank_pos",
    "content_type",
)


def _frame(table: pa.Table, columns: tuple[str, ...]) -> pd.DataFrame:
    """Selected columns as pandas, numbers widened to int64/float64: GX's pandas range checks are
    vectorized only for those dtypes (int32 or float32 fall back to a Python loop per value).
    Widened Arrow-side, then handed to pandas a column per block: a column without nulls becomes
    a view of Arrow's buffer instead of a copy into pandas' consolidated blocks."""
    table = table.select([c for c in columns if c in table.column_names])
    wide = pa.schema(
        [
            field.with_type(
                pa.int64()
                if pa.types.is_integer(field.type)
                else pa.float64()
                if pa.types.is_floating(field.type)
                else field.type
            )
            for field in table.schema
        ]
    )
    return table.cast(wide).to_pandas(strings_to_categorical=True, split_blocks=True)


def _list_len(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each row's list length as int64 (Arrow gives int32, which GX checks value by value); NaN
    for a null list, as float64, so that the length's not-null check counts it."""
    return _lengths(pc.list_value_length(col))


def _lengths(lengths: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``_list_len`` of lengths already computed."""
    if lengths.null_count:
        return lengths.to_numpy(zero_copy_only=False).astype(np.float64)
    return lengths.to_numpy(zero_copy_only=False).astype(np.int64)


def landing_files(folder: Path) -> pd.DataFrame:
    """One row per entry of a landing day's folder: is it a file the contract knows?"""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return pd.DataFrame({"file": names, "known": [n in LANDING_FILES for n in names]})


def _sequence_stats(col: pa.ChunkedArray | pa.Array) -> dict[str, np.ndarray]:
    """Per row of a list column: its length, smallest and largest id (0 where it has no id), and
    the null ids inside. One numpy reduction per statistic over the flattened ids, segment by
    segment (faster than Arrow's hash group-by on row numbers, which it replaced: 0.34 -> 0.18 s
    on 200k lists of 50 ids, as a bucket meets them, with its memory freshly returned)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(col)
    counts = lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(col)  # the ids of the non-null lists, in row order
    valid = flat.is_valid().to_numpy(zero_copy_only=False)
    ids = flat.fill_null(0).to_numpy(zero_copy_only=False)
    lo, hi, nulls = np.zeros(len(col)), np.zeros(len(col)), np.zeros(len(col), np.int64)
    rows = np.flatnonzero(counts)
    if len(rows):
        starts = (np.cumsum(counts) - counts)[rows]  # reduceat over the non-empty rows' segments
        nulls[rows] = np.add.reduceat((~valid).astype(np.int64), starts)
        top, bottom = np.iinfo(ids.dtype).max, np.iinfo(ids.dtype).min
        has_id = nulls[rows] < counts[rows]
        lo[rows] = np.where(has_id, np.minimum.reduceat(np.where(valid, ids, top), starts), 0)
        hi[rows] = np.where(has_id, np.maximum.reduceat(np.where(valid, ids, bottom), starts), 0)
    return {"len": _lengths(lengths), "min": lo, "max": hi, "nulls": nulls}


def exposure_rows(exposure: pa.Table, ranking: pa.Table) -> pd.DataFrame:
    """Exposure rows without the list column, plus the click sequence's length, id range and
    null ids, ``has_ranking_row`` and ``engaged_without_click`` (like, comment or share, no click)."""
    seq = schema.USER_SEQUENCE
    frame = _frame(exposure, EXPOSURE_ROW_COLUMNS)
    for stat, values in _sequence_stats(exposure[seq]).items():
        frame[f"{seq}_{stat}"] = values
    frame["has_ranking_row"] = has_ranking_row(exposure, ranking)
    engaged = (frame["like"] != 0) | (frame["comment"] != 0) | (frame["share"] != 0)
    frame["engaged_without_click"] = (engaged & (frame["click"] == 0)).to_numpy()
    return frame


def fullflow_rows(fullflow: pa.Table, exposure: pa.Table) -> pd.DataFrame:
    """Full-flow rows, plus ``in_exposure_log`` (its request was exposed that day) and
    ``click_unexposed`` (a click on a candidate that was never shown)."""
    frame = _frame(fullflow, FULLFLOW_ROW_COLUMNS)
    exposed_requests = pc.unique(exposure["request_id"])
    frame["in_exposure_log"] = pc.is_in(fullflow["request_id"], value_set=exposed_requests).to_numpy(
        zero_copy_only=False
    )
    frame["click_unexposed"] = ((frame["click"] != 0) & ~frame["exposed"].astype(bool)).to_numpy()
    return frame


def has_ranking_row(exposure: pa.Table, ranking: pa.Table) -> np.ndarray:
    """For each exposure row: is ``(request_id, item_id)`` logged with source 'exposed'?"""
    n = exposure.num_rows
    keys = pa.table(
        {
            "request_id": exposure["request_id"],
            "item_id": exposure["item_id"],
            "_row": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    exposed = ranking.filter(pc.equal(ranking["source"], schema.RankingSource.EXPOSED.value))
    logged = exposed.select(["request_id", "item_id"]).group_by(["request_id", "item_id"]).aggregate([])
    logged = logged.append_column("_hit", pa.array(np.ones(logged.num_rows, dtype=bool)))
    joined = keys.join(logged, keys=["request_id", "item_id"], join_type="left outer")
    hit = np.zeros(n, dtype=bool)
    hit[joined["_row"].to_numpy()] = joined["_hit"].fill_null(False).to_numpy(zero_copy_only=False)
    return hit


def ranking_rows(ranking: pa.Table) -> pd.DataFrame:
    """Ranking rows; ``source`` as a categorical keeps the string column cheap in pandas."""
    return _frame(ranking, RANKING_ROW_COLUMNS)


def ranking_positions(ranking: pa.Table) -> pd.DataFrame:
    """The ranking log's stage positions (null where a source skipped the stage)."""
    return _frame(ranking, RANKING_POSITION_COLUMNS)


def source_positions(ranking: pa.Table) -> dict[str, pd.DataFrame]:
    """Per batch of ``SOURCE_POSITIONS``: the rows of its source, with their request id and the stage
    position its checks read. The source strings are matched once (one hash lookup per row), then
    each batch's rows are picked by an integer code."""
    batches = list(SOURCE_POSITIONS.items())
    codes = pc.index_in(ranking["source"], value_set=pa.array([source for _, (source, _) in batches]))
    return {
        batch: _frame(ranking.filter(pc.equal(codes, i)), ("request_id", column))
        for i, (batch, (_, column)) in enumerate(batches)
    }


def content_keys(exposure: pa.Table) -> pd.DataFrame:
    """Per request: a hash of its user and of what it showed where. Two requests with the same key
    are the same content logged twice (a replayed or duplicated upstream batch under new ids)."""
    req = exposure["request_id"].to_numpy()
    row_hash = hashing.mix64(exposure["item_id"].to_numpy(), exposure["position"].to_numpy(), salt=1)
    user_hash = hashing.mix64(exposure["user_id"].to_numpy(), 0, salt=2)
    order = np.argsort(req, kind="stable")
    ids, starts = np.unique(req[order], return_index=True)
    with np.errstate(over="ignore"):
        key = np.add.reduceat(row_hash[order], starts) if len(order) else np.zeros(0, np.uint64)
        key = key + user_hash[order][starts] if len(order) else key
    return pd.DataFrame({"request_id": ids, "content_key": (key >> np.uint64(1)).astype(np.int64)})


def requests_frame(exposure: pa.Table, ranking: pa.Table, global_neg_per_pos: int) -> pd.DataFrame:
    """One row per request seen in either log, with exposure, click and per-source counts, the
    display positions' range and the request's content key."""
    exp = (
        exposure.group_by("request_id")
        .aggregate([("item_id", "count"), ("click", "sum"), ("position", "min"), ("position", "max")])
        .to_pandas()
    )
    exp.columns = [{"item_id_count": "n_exposures", "click_sum": "n_clicks"}.get(c, c) for c in exp.columns]
    exp = exp.merge(content_keys(exposure), on="request_id", how="left")
    counts = (
        ranking.select(["request_id", "source"])
        .group_by(["request_id", "source"])
        .aggregate([("source", "count")])
        .to_pandas()
    )
    per_source = counts.pivot(index="request_id", columns="source", values="source_count")
    out = exp.set_index("request_id").join(per_source, how="outer")
    for src in schema.RANKING_SOURCES:
        out[f"n_{src}"] = out[src].fillna(0).astype("int64") if src in out.columns else 0
    out["n_exposures"] = out["n_exposures"].fillna(0).astype("int64")
    out["n_clicks"] = out["n_clicks"].fillna(0).astype("int64")
    out["exposed_gap"] = out["n_exposures"] - out["n_exposed"]
    # positions are exactly 1..k: unique per request (a row check), smallest 1, largest k
    out["position_min"] = out["position_min"].fillna(1).astype("int64")
    out["position_gap"] = (out["position_max"].fillna(0) - out["n_exposures"]).astype("int64")
    out["global_neg_gap"] = out["n_global_neg"] - global_neg_per_pos * out["n_clicks"]
    keep = [
        "n_exposures",
        "n_clicks",
        *[f"n_{s}" for s in schema.RANKING_SOURCES],
        "exposed_gap",
        "global_neg_gap",
        "position_min",
        "position_gap",
        "content_key",
    ]
    return out[keep].reset_index()


def training_rows(table: pa.Table, partition_difficulty: str) -> pd.DataFrame:
    """Training-set rows of one Hive partition, plus ``partition_matches`` (folder == column)."""
    seq = schema.USER_SEQUENCE
    frame = _frame(table, TRAINING_ROW_COLUMNS)
    frame[f"{seq}_len"] = _list_len(table[seq])
    frame["partition_matches"] = (frame["difficulty"].astype(str) == partition_difficulty).to_numpy()
    return frame


# ---- keys that span requests, and the day-level values -----------------------------------------------
EXPOSURE_KEY_COLUMNS = ("user_id", "timestamp", "item_id", "request_id")


def exposure_keys(exposure: pa.Table) -> pa.Table:
    """The exposure key that spans requests (a user shown an item at an instant), with its request."""
    return exposure.select(list(EXPOSURE_KEY_COLUMNS))


def exposure_key_part(keys: pa.Table, parts: int) -> np.ndarray:
    """Partition of each exposure key by its own hash: duplicates always meet in one partition."""
    user = keys["user_id"].fill_null(0).to_numpy()
    item = keys["item_id"].fill_null(0).to_numpy()
    ts = pc.cast(keys["timestamp"], pa.int64()).fill_null(0).to_numpy()
    return (hashing.mix64(user ^ ts, item, salt=3) % np.uint64(parts)).astype(np.int32)


def content_key_part(content: pd.DataFrame, parts: int) -> np.ndarray:
    return (content["content_key"].to_numpy().astype(np.uint64) % np.uint64(parts)).astype(np.int32)


def day_frames(totals: dict[str, int]) -> dict[str, pd.DataFrame]:
    """One row per raw log of day-level values, reduced from the buckets' counts (``totals``)."""
    rows = totals.get("exposure_rows", 0)
    return {
        "exposure": pd.DataFrame(
            {
                "rows": [rows],
                "ctr": [totals.get("exposure_clicks", 0) / rows if rows else 0.0],
            }
        ),
        "ranking": pd.DataFrame({"rows": [totals.get("ranking_rows", 0)]}),
        "fullflow": pd.DataFrame(
            {"requests": [totals.get("fullflow_requests", 0)], "clicks": [totals.get("fullflow_clicks", 0)]}
        ),
    }


def bucket_counts(exposure: pa.Table, ranking: pa.Table, fullflow: pa.Table) -> dict[str, int]:
    """The additive counts a bucket contributes to the day-level checks."""
    return {
        "exposure_rows": exposure.num_rows,
        "exposure_clicks": int(pc.sum(exposure["click"]).as_py() or 0),
        "ranking_rows": ranking.num_rows,
        "fullflow_requests": int(pc.count_distinct(fullflow["request_id"]).as_py()),
        "fullflow_clicks": int(pc.sum(fullflow["click"]).as_py() or 0),
    }
