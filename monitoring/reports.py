"""The day's Evidently report (0.7 API): fractions, feature drift, prediction drift, CTR.

One ``Report`` per day compares the day's monitoring frame with its reference frame:
``MeanValue`` of every indicator column (the fractions, see ``monitoring.frame``),
``DriftedColumnsCount`` over the features with the method and threshold of ``params.yaml``
(never Evidently's defaults, which fire on any large sample), and ``ValueDrift`` of the
champion's light scores. The snapshot goes into the local workspace project (one snapshot per
day: a re-run replaces the day's snapshot) and a static HTML copy is saved with the day.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hap.core import hashing, layout, schema
from hap.core.config import Config
from monitoring import dashboards
from monitoring.frame import FEATURES, indicator_columns

META_DATE = "hap_date"
META_KIND = "hap_kind"
REPORT_HTML = layout.MONITOR_REPORT_HTML
SNAPSHOT_ID = "snapshot_id"
# Fractions kept in table.json but not sent to Evidently (no panel plots them; each costs a widget).
TABLE_ONLY = ("ctr_ct", "exposed_share")


@dataclass
class DayReport:
    values: dict[str, float | None]  # metric name -> value (MeanValue:<col>, drift_share, ...)
    html: Path
    snapshot_id: str
    drift_columns: list[str]


def drift_columns(cfg: Config) -> list[str]:
    return [c for c in FEATURES if c not in set(cfg.monitor.drift_exclude)]


def categorical_columns(cfg: Config, reference: pd.DataFrame | None, current: pd.DataFrame) -> list[str]:
    """Low-cardinality categorical features drift by category share; hashed ids with more
    than ``monitor.max_categories`` values drift as a histogram of their hash buckets."""
    base = reference if reference is not None and len(reference) else current
    return [
        c
        for c in FEATURES
        if (c in schema.CATEGORICAL_FEATURES or c == schema.USER_SEQUENCE)
        and base[c].nunique(dropna=True) <= cfg.monitor.max_categories
    ]


def _cap(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """About ``rows`` rows, whole requests sampled deterministically (Evidently's cost grows
    with rows; sampling requests, not rows, keeps the per-request features and fractions intact)."""
    if len(frame) <= rows:
        return frame
    ids = frame["request_id"].to_numpy()
    keep_share = rows / len(frame)
    return frame[hashing.unit_hash(ids, 0, seed) < keep_share]


def build_report(cfg: Config, columns: list[str], *, reference: bool, champion: bool):
    from evidently import Report
    from evidently.metrics import DriftedColumnsCount, MeanValue, RowCount, ValueDrift

    mon = cfg.monitor
    metrics: list[Any] = [RowCount(), *[MeanValue(column=c) for c in columns]]
    if reference:
        metrics.append(
            DriftedColumnsCount(
                columns=drift_columns(cfg),
                method=mon.drift_method,
                threshold=mon.drift_threshold,
                drift_share=mon.alerts.drift_share_max or 0.5,
            )
        )
        if champion:
            metrics.append(
                ValueDrift(column="light_score", method=mon.drift_method, threshold=mon.drift_threshold)
            )
    return Report(metrics)


def _value(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def extract_values(snapshot: Any) -> dict[str, float | None]:
    """Flat metric values of a snapshot: ``mean:<col>``, ``drift_share``, ``drift_count``, ..."""
    out: dict[str, float | None] = {}
    for item in snapshot.dict()["metrics"]:
        conf, value = item["config"], item["value"]
        kind = conf["type"].rsplit(":", 1)[-1]
        if kind == "MeanValue":
            out[f"mean:{conf['column']}"] = _value(value)
        elif kind == "DriftedColumnsCount":
            out["drift_share"] = _value(value["share"])
            out["drift_count"] = _value(value["count"])
        elif kind == "ValueDrift":
            out[f"drift:{conf['column']}"] = _value(value)
        elif kind == "RowCount":
            out["rows"] = _value(value)
    return out


def run_day_report(
    cfg: Config,
    date: dt.date,
    current: pd.DataFrame,
    reference: pd.DataFrame | None,
    champion_version: str | None,
    ref_note: str,
) -> DayReport:
    """Run the day's report, save its HTML, and put its snapshot in the workspace project."""
    from evidently import DataDefinition, Dataset

    seed = date.toordinal()
    current = _cap(current, cfg.monitor.max_rows, seed)
    has_champion = champion_version is not None
    columns = [c for c in indicator_columns(cfg) if current[c].notna().any() and not c.startswith(TABLE_ONLY)]
    if has_champion:
        columns += ["light_score", "champion_version"]
    cats = categorical_columns(cfg, reference, current)
    numeric = [c for c in FEATURES if c not in cats] + columns
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=cats)
    keep = [*FEATURES, *columns]
    cur_ds = Dataset.from_pandas(current[keep], data_definition=definition)
    ref_ds = None
    if reference is not None and len(reference):
        reference = _cap(reference, cfg.monitor.max_rows, seed + 1)
        ref_ds = Dataset.from_pandas(reference[keep], data_definition=definition)
    report = build_report(cfg, columns, reference=ref_ds is not None, champion=has_champion)
    metadata = {
        META_DATE: date.isoformat(),
        META_KIND: "daily",
        "reference": ref_note,
        "champion": champion_version or "none",
    }
    snapshot = report.run(
        cur_ds,
        ref_ds,
        timestamp=dt.datetime.combine(date, dt.time(12)),
        metadata=metadata,
        tags=["daily", f"champion-{champion_version or 'none'}"],
        name=f"monitor {date.isoformat()}",
    )
    html = layout.monitoring_day(cfg, date) / REPORT_HTML
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.with_name(f".tmp-{html.name}")
    snapshot.save_html(str(tmp))
    tmp.replace(html)
    snapshot_id = add_snapshot(cfg, date, snapshot)
    return DayReport(
        values=extract_values(snapshot), html=html, snapshot_id=snapshot_id, drift_columns=drift_columns(cfg)
    )


def add_snapshot(cfg: Config, date: dt.date, snapshot: Any) -> str:
    """Add the day's snapshot to the project, replacing the day's earlier one (one point per day)."""
    from hap.core.atomic import atomic_write_text

    ws, project = dashboards.open_project(cfg)
    marker = layout.monitoring_day(cfg, date) / SNAPSHOT_ID
    if marker.exists():
        old = marker.read_text().strip()
        if old in {str(s) for s in ws.list_runs(project.id)}:
            ws.delete_run(project.id, old)
    snapshot_id = str(ws.add_run(project.id, snapshot, include_data=False).id)
    atomic_write_text(marker, snapshot_id + "\n")
    return snapshot_id
