"""The day's monitoring frame: one row per logged sample and per full-flow candidate.

Every fraction the dashboards plot is the mean of one indicator column, NaN where the row does
not belong to that fraction's population. Evidently's ``MeanValue`` then gives each fraction
directly, and the same frame feeds feature drift (the 29 features) and prediction drift (the
champion's light scores). Indicator columns:

- ``hard_neg``: data-side hard fraction, 1 for a hard-source negative (``schema.HARD_SOURCES``),
  0 for an easy one; NaN for positives and candidates;
- ``routed``: model-side, 1 when the champion's light score is above its calibrated routing
  threshold; full-flow candidates only (the population the router really sees);
- ``near_margin``: model-side hard fraction, 1 when a logged negative's light score is within
  ``monitor.margin`` of the best light score of its request's positives; requests without a
  click have no reference positive and stay NaN;
- ``ctr``: the click of an exposure (``expose_pos``/``expose_neg``);
- ``exposed_share``: 1 for an exposure, the denominator of the content mix;
- ``*_ct{k}``: the same indicator restricted to items of content type ``k`` (the content mix
  is ``exposed_ct{k}``: the share of exposures of type ``k``).

Without a champion the model-side columns are NaN and the report says so.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import layout, schema
from hap.core.atomic import atomic_write_bytes
from hap.core.config import Config
from hap.core.errors import HapError
from hap.data import lake
from monitoring.champion import Champion

FEATURES: tuple[str, ...] = schema.FEATURE_COLUMNS
# Indicator columns; each is also split per content type.
INDICATORS: tuple[str, ...] = ("hard_neg", "routed", "near_margin", "ctr")
MODEL_SIDE: tuple[str, ...] = ("routed", "near_margin", "light_score")


def content_types(cfg: Config) -> list[int]:
    return list(range(cfg.contract.n_content_types))


def indicator_columns(cfg: Config) -> list[str]:
    """Every fraction column of the frame, overall then per content type; fixed by the config."""
    cts = content_types(cfg)
    cols = [*INDICATORS, "exposed_share"]
    for name in INDICATORS:
        cols += [f"{name}_ct{k}" for k in cts]
    cols += [f"exposed_ct{k}" for k in cts]
    return cols


# ---- reading the lake -------------------------------------------------------------------------
def _read_lake(cfg: Config, table: str, date: dt.date) -> pa.Table:
    # retrieval_pos: the champion's scores read it (model.cross_features 'retrieval')
    columns = ["request_id", "item_id", "label", "content_type", "retrieval_pos", *FEATURES]
    if table == "samples":
        columns.append("source")
    parts = lake.require_day(cfg, table, date, "monitor")
    return lake.parts_dataset(cfg, parts).to_table(columns=columns)


def _last_clicks(column: pa.ChunkedArray) -> np.ndarray:
    """Drift needs scalars: the click sequence is summarised by its most recent click's id (its
    first element; 0 when there is none), read from the list's values, no Python per row."""
    seq = column.combine_chunks()
    lengths = pc.list_value_length(seq).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(seq).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros(len(lengths), np.int64)
    has = lengths > 0
    out[has] = flat[(np.cumsum(lengths) - lengths)[has]]
    return out


def _near_margin(frame: pd.DataFrame, scores: np.ndarray, margin: float) -> np.ndarray:
    """1/0 for negatives within ``margin`` of their request's best positive, NaN elsewhere."""
    pos = frame["source"].to_numpy() == schema.Source.EXPOSE_POS.value
    best = pd.Series(np.where(pos, scores, -np.inf)).groupby(frame["request_id"].to_numpy()).transform("max")
    best = best.to_numpy()
    out = (scores >= best - margin).astype(np.float64)
    out[pos | ~np.isfinite(best)] = np.nan
    return out


def build_frame(cfg: Config, date: dt.date, champion: Champion | None) -> pd.DataFrame:
    """The day's monitoring frame (see the module docstring)."""
    samples = _read_lake(cfg, "samples", date)
    cands = _read_lake(cfg, "fullflow", date)
    cands = cands.append_column("source", pa.array(["candidate"] * cands.num_rows, samples["source"].type))
    rows = pa.concat_tables([samples, cands.select(samples.column_names)], promote_options="permissive")
    # the champion scores the Arrow rows (its sequences stay Arrow lists); the frame keeps scalars
    scores = None if champion is None else np.asarray(champion.score(rows), np.float64)
    frame = rows.drop_columns([schema.USER_SEQUENCE]).to_pandas()
    frame[schema.USER_SEQUENCE] = _last_clicks(rows[schema.USER_SEQUENCE])
    frame["row_kind"] = np.where(np.arange(len(frame)) < samples.num_rows, "sample", "candidate")
    is_sample = frame["row_kind"].to_numpy() == "sample"
    source = frame["source"].to_numpy()
    is_neg = is_sample & (source != schema.Source.EXPOSE_POS.value)
    is_exposure = np.isin(source, [schema.Source.EXPOSE_POS.value, schema.Source.EXPOSE_NEG.value])

    frame["hard_neg"] = np.where(is_neg, np.isin(source, schema.HARD_SOURCES), np.nan)
    frame["ctr"] = np.where(is_exposure, frame["label"].to_numpy(), np.nan)
    frame["exposed_share"] = np.where(is_sample, is_exposure, np.nan)
    if champion is not None and scores is not None:
        if scores.shape != (len(frame),):
            raise HapError(
                f"monitor: champion v{champion.version} returned {scores.shape} scores for {len(frame)} rows"
            )
        frame["light_score"] = scores
        frame["routed"] = np.where(~is_sample, scores > champion.threshold, np.nan)
        near = np.full(len(frame), np.nan)
        near[is_sample] = _near_margin(
            frame[is_sample].reset_index(drop=True), scores[is_sample], cfg.monitor.margin
        )
        frame["near_margin"] = np.where(is_neg, near, np.nan)
        frame["champion_version"] = float(champion.version) if str(champion.version).isdigit() else np.nan
    else:
        for name in (*MODEL_SIDE, "champion_version"):
            frame[name] = np.nan

    ctype = frame["content_type"].to_numpy()
    for k in content_types(cfg):
        mine = ctype == k
        for name in INDICATORS:
            frame[f"{name}_ct{k}"] = np.where(mine, frame[name].to_numpy(), np.nan)
        frame[f"exposed_ct{k}"] = np.where(is_exposure, mine, np.nan)
    _request_level(frame)
    frame.insert(0, "dt", date.isoformat())
    return frame


def _request_level(frame: pd.DataFrame) -> None:
    """Keep request-side features on one row per request, NaN elsewhere.

    A request contributes hundreds of rows with the same user and context; counted per row,
    a few hundred requests look like a huge sample and drift tests fire on noise. Drift tests
    drop NaN, so request features are tested per request and item features per candidate.
    """
    first = ~frame["request_id"].duplicated().to_numpy()
    for name in schema.REQUEST_FEATURES:
        values = frame[name].to_numpy(np.float64, copy=True)
        values[~first] = np.nan
        frame[name] = values
    for name in schema.ITEM_FEATURES:
        frame[name] = frame[name].to_numpy(np.float64)


# ---- the frame, cached per (day, champion) -------------------------------------------------
def frame_path(cfg: Config, date: dt.date) -> Path:
    return layout.monitoring_day(cfg, date) / layout.MONITOR_FRAME_FILE


def day_frame(cfg: Config, date: dt.date, champion: Champion | None) -> pd.DataFrame:
    """``build_frame``, cached on disk per (day, champion version): reference days are reused."""
    path = frame_path(cfg, date)
    version = (
        f"{champion.version if champion else ''}"
        f"|margin={cfg.monitor.margin}|types={cfg.contract.n_content_types}"
    )
    if path.exists():
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        if meta.get(b"hap.champion", b"").decode() == version:
            return table.to_pandas()
    frame = build_frame(cfg, date, champion)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"hap.champion": version.encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return frame
