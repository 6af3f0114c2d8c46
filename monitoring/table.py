"""The monitoring table: one summary row per day (every fraction and the counts behind them),
written beside the day's report and read back as the series the alerts and dashboards use."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from monitoring.frame import indicator_columns


def summarize(cfg: Config, frame: pd.DataFrame) -> dict[str, float | None]:
    """The monitoring table's row for a day: every fraction, and the row counts behind them."""
    out: dict[str, float | None] = {}
    for name in indicator_columns(cfg):
        value = frame[name].mean() if name in frame else np.nan
        out[name] = None if pd.isna(value) else float(value)
    out["samples"] = float((frame["row_kind"] == "sample").sum())
    out["candidates"] = float((frame["row_kind"] == "candidate").sum())
    out["requests"] = float(frame["request_id"].nunique())
    ls = frame["light_score"]
    out["light_score_mean"] = None if ls.isna().all() else float(ls.mean())
    return out


def write_table(cfg: Config, date: dt.date, row: dict[str, Any]) -> Path:
    path = layout.monitoring_day(cfg, date) / layout.MONITOR_TABLE_FILE
    atomic_write_json(path, {"date": date.isoformat(), **row})
    return path


def read_tables(cfg: Config, dates: Sequence[dt.date]) -> list[dict[str, Any]]:
    """The monitoring table over ``dates`` (days never monitored are skipped)."""
    rows = []
    for date in dates:
        path = layout.monitoring_day(cfg, date) / layout.MONITOR_TABLE_FILE
        if path.exists():
            rows.append(json.loads(path.read_text()))
    return rows
