"""Reading raw logs for validation, and the frames the GX suites run on.

Heavy work that GX on pandas does slowly (joins and per-request aggregation) is done here with
pyarrow, producing derived columns and a per-request frame; GX then applies the expectations
from ``expectations/*.json`` to them. No check is dropped: each derived column is named by the
expectation that uses it (see ``hap.suites``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import schema


@dataclass
class ReadProblem:
    """A file that could not be read at all: missing, zero bytes, truncated or not Parquet."""

    file: str
    check: str
    message: str


def read_table(path: Path, columns: list[str] | None = None) -> tuple[pa.Table | None, ReadProblem | None]:
    """Read a whole Parquet file; every way it can be unreadable becomes a ``ReadProblem``."""
    if not path.exists():
        return None, ReadProblem(str(path), "file_exists", "missing: the file never landed")
    if path.stat().st_size == 0:
        return None, ReadProblem(str(path), "file_not_empty", "zero-byte file")
    try:
        return pq.read_table(path, columns=columns), None
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        return None, ReadProblem(
            str(path), "parquet_readable", f"unreadable Parquet, truncated or corrupt ({err})"
        )


def type_name(t: pa.DataType) -> str:
    """Arrow type as text, ignoring the list item's field name (Parquet writes 'element')."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_name(t.value_type)}>"
    return str(t)


def schema_frame(table: pa.Table, contract: pa.Schema, keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per column of the file or the contract: presence, Arrow types, nullability and
    null count (exact and cheap from Arrow), for the suites' schema checks."""
    rows = []
    for name in [*contract.names, *[n for n in table.column_names if n not in contract.names]]:
        in_file, in_contract = name in table.column_names, name in contract.names
        rows.append(
            {
                "column": name,
                "in_file": in_file,
                "in_contract": in_contract,
                "arrow_type": type_name(table.schema.field(name).type) if in_file else "<missing>",
                "contract_type": type_name(contract.field(name).type) if in_contract else "<not in contract>",
                "nullable": contract.field(name).nullable if in_contract else True,
                "key": name in keys,
                "null_count": int(table[name].null_count) if in_file else 0,
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
)
RANKING_ROW_COLUMNS = (
    "request_id",
    "item_id",
    "source",
    "retrieval_pos",
    "prerank_pos",
    "rank_pos",
    "content_type",
)
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
    vectorized only for those dtypes (int32 or float32 fall back to a Python loop per value)."""
    frame = table.select([c for c in columns if c in table.column_names]).to_pandas(
        strings_to_categorical=True
    )
    for name, dtype in frame.dtypes.items():
        if pd.api.types.is_integer_dtype(dtype) and dtype != "int64":
            frame[name] = frame[name].astype("int64")
        elif pd.api.types.is_float_dtype(dtype) and dtype != "float64":
            frame[name] = frame[name].astype("float64")
    return frame


def _list_len(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.list_value_length(col)


def exposure_rows(exposure: pa.Table, ranking: pa.Table) -> pd.DataFrame:
    """Exposure rows without the list column, plus ``u_click_seq_len`` and ``has_ranking_row``."""
    seq = schema.USER_SEQUENCE
    frame = _frame(exposure, EXPOSURE_ROW_COLUMNS)
    frame[f"{seq}_len"] = _list_len(exposure[seq]).to_pandas()
    frame["has_ranking_row"] = has_ranking_row(exposure, ranking)
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


def requests_frame(exposure: pa.Table, ranking: pa.Table, global_neg_per_pos: int) -> pd.DataFrame:
    """One row per request seen in either log, with exposure, click and per-source counts."""
    exp = exposure.group_by("request_id").aggregate([("item_id", "count"), ("click", "sum")]).to_pandas()
    exp.columns = [
        "n_exposures" if c == "item_id_count" else "n_clicks" if c == "click_sum" else c for c in exp.columns
    ]
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
    out["global_neg_gap"] = out["n_global_neg"] - global_neg_per_pos * out["n_clicks"]
    keep = [
        "n_exposures",
        "n_clicks",
        *[f"n_{s}" for s in schema.RANKING_SOURCES],
        "exposed_gap",
        "global_neg_gap",
    ]
    return out[keep].reset_index()


def training_rows(table: pa.Table, partition_difficulty: str) -> pd.DataFrame:
    """Training-set rows of one Hive partition, plus ``partition_matches`` (folder == column)."""
    seq = schema.USER_SEQUENCE
    frame = _frame(table, TRAINING_ROW_COLUMNS)
    frame[f"{seq}_len"] = _list_len(table[seq]).to_pandas()
    frame["partition_matches"] = (frame["difficulty"].astype(str) == partition_difficulty).to_numpy()
    return frame
