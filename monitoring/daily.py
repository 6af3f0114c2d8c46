"""``monitor_day``: the day's monitoring table, Evidently report and alerts.

Alerts follow ``monitor.alerts`` in ``params.yaml``: a fraction that moves more than its rule's
points against the reference, or a drift share / prediction drift above its ceiling. Rules
whose inputs are missing (no reference yet, no champion) are skipped and the report says so.
This module only records breaches; the Prefect flow turns them into an event and a markdown
artifact, and ``monitor.on_alert: retrain`` makes the next daily run retrain.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from monitoring import champion as champion_mod
from monitoring.champion import Champion
from monitoring.frame import day_frame
from monitoring.reference import Reference, reference_dates
from monitoring.table import summarize, write_table

MONITOR_JSON = layout.MONITOR_FILE


@dataclass(frozen=True)
class Alert:
    rule: str  # the key in monitor.alerts
    metric: str
    value: float
    reference: float | None  # None for ceilings (drift share)
    threshold: float
    message: str


@dataclass
class MonitorReport:
    date: dt.date
    champion_version: str | None
    reference: Reference
    table: dict[str, float | None]  # today's monitoring table row
    reference_table: dict[str, float | None]  # the same over the pooled reference days
    drift_share: float | None
    prediction_drift: float | None
    alerts: list[Alert]
    html_report: Path
    table_path: Path
    snapshot_id: str
    on_alert: str
    notes: list[str] = field(default_factory=list)

    @property
    def model_side(self) -> bool:
        return self.champion_version is not None

    @property
    def retrain(self) -> bool:
        """True when an alert fired and ``monitor.on_alert`` asks for a retrain."""
        return bool(self.alerts) and self.on_alert == "retrain"

    @property
    def figures(self) -> dict[str, float | None]:
        """The headline numbers (what the flow's artifact and ``hap run``'s summary show)."""
        t = self.table
        return {
            "hard_fraction_data": t.get("hard_neg"),
            "hard_fraction_model": t.get("near_margin"),
            "routed_share": t.get("routed"),
            "ctr": t.get("ctr"),
            "drift_share": self.drift_share,
            "prediction_drift": self.prediction_drift,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date.isoformat(),
            "champion_version": self.champion_version,
            "model_side": self.model_side,
            "reference": {**asdict(self.reference), "dates": [d.isoformat() for d in self.reference.dates]},
            "figures": self.figures,
            "table": self.table,
            "reference_table": self.reference_table,
            "alerts": [asdict(a) for a in self.alerts],
            "retrain": self.retrain,
            "html_report": str(self.html_report),
            "snapshot_id": self.snapshot_id,
            "notes": self.notes,
        }

    def render(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        head = (
            f"monitor {self.date}: champion {('v' + self.champion_version) if self.model_side else 'none'}; "
            f"reference {self.reference.kind} {[d.isoformat() for d in self.reference.dates]}"
        )
        figs = ", ".join(f"{k}={fmt(v)}" for k, v in self.figures.items())
        lines = [head, f"  {figs}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  ALERT {a.rule}: {a.message}" for a in self.alerts] or ["  no alert"]
        lines.append(f"  report: {self.html_report}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """A markdown summary for the flow's artifact."""

        def cell(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        rows = "\n".join(
            f"| {k} | {cell(v)} | {cell(self.reference_table.get(_TABLE_KEY.get(k, k)))} |"
            for k, v in self.figures.items()
        )
        alerts = "\n".join(f"- **{a.rule}**: {a.message}" for a in self.alerts) or "- none"
        notes = "\n".join(f"- {n}" for n in self.notes)
        return (
            f"# Monitoring {self.date}\n\nChampion: {self.champion_version or 'none'}; reference: "
            f"{self.reference.note}\n\n| figure | today | reference |\n|---|---|---|\n{rows}\n\n"
            f"## Alerts\n{alerts}\n\n{notes}\n\nReport: `{self.html_report}`\n"
        )


_TABLE_KEY = {
    "hard_fraction_data": "hard_neg",
    "hard_fraction_model": "near_margin",
    "routed_share": "routed",
    "ctr": "ctr",
}


def evaluate_alerts(
    cfg: Config,
    table: dict[str, float | None],
    ref: dict[str, float | None] | None,
    drift_share: float | None,
    prediction_drift: float | None,
) -> list[Alert]:
    """Apply ``monitor.alerts``: absolute moves against the reference, and ceilings."""
    rules = cfg.monitor.alerts
    alerts: list[Alert] = []
    # (rule, column, label, relative): an absolute move in points, or a change relative to the base
    moves = [
        ("hard_fraction_model_abs_change", "near_margin", "model-side hard fraction", False),
        ("routed_share_abs_change", "routed", "routed share", False),
        ("hard_fraction_data_abs_change", "hard_neg", "data-side hard fraction", False),
        ("routed_share_rel_change", "routed", "routed share", True),
    ]
    for rule, column, label, relative in moves:
        limit = getattr(rules, rule)
        today, base = table.get(column), (ref or {}).get(column)
        if limit is None or today is None or base is None or (relative and not base):
            continue
        change = (today - base) / base if relative else today - base
        if abs(change) <= limit:
            continue
        moved = (
            f"{100 * change:+.0f}% relative, limit {100 * limit:.0f}%"
            if relative
            else f"moved {100 * change:+.1f} points, limit {100 * limit:.1f}"
        )
        alerts.append(
            Alert(rule, column, today, base, limit, f"{label} {today:.3f} vs reference {base:.3f} ({moved})")
        )
    ceilings = [
        ("drift_share_max", "drift_share", drift_share, "feature drift share"),
        ("prediction_drift_max", "drift:light_score", prediction_drift, "light-score drift"),
    ]
    for rule, metric, value, label in ceilings:
        limit = getattr(rules, rule)
        if limit is not None and value is not None and value > limit:
            alerts.append(Alert(rule, metric, value, None, limit, f"{label} {value:.3f} above {limit:.3f}"))
    return alerts


def monitor_day(
    cfg: Config,
    date: dt.date | str,
    champion: Champion | None | Literal["registry"] = "registry",
) -> MonitorReport:
    """Monitor one ingested day against its reference; write table.json, report.html, monitor.json."""
    from monitoring.reports import run_day_report

    date = layout.day(date)
    notes: list[str] = []
    if champion == "registry":
        champion, why = champion_mod.from_registry(cfg, date)
        if why:
            notes.append(why)
    if champion is None:
        notes.append(
            "no champion: data-side metrics only (routed share, model-side hard fraction and "
            "prediction drift are skipped)"
        )
    frame = day_frame(cfg, date, champion)
    ref = reference_dates(cfg, date, champion)
    if ref.note and ref.kind == "trailing" and cfg.monitor.reference == "champion_window":
        notes.append(ref.note)
    ref_frame = (
        pd.concat([day_frame(cfg, d, champion) for d in ref.dates], ignore_index=True) if ref.dates else None
    )
    if ref_frame is None:
        notes.append("no reference days ingested yet: no drift and no change alerts today")
    table = summarize(cfg, frame)
    ref_table = summarize(cfg, ref_frame) if ref_frame is not None else {}
    version = champion.version if champion else None
    report = run_day_report(cfg, date, frame, ref_frame, version, ref.note)
    drift_share = report.values.get("drift_share")
    prediction_drift = report.values.get("drift:light_score")
    alerts = evaluate_alerts(
        cfg, table, ref_table if ref_frame is not None else None, drift_share, prediction_drift
    )
    table_path = write_table(
        cfg,
        date,
        {
            **table,
            "drift_share": drift_share,
            "prediction_drift": prediction_drift,
            "champion_version": version,
            "alerts": len(alerts),
        },
    )
    result = MonitorReport(
        date=date,
        champion_version=version,
        reference=ref,
        table=table,
        reference_table=ref_table,
        drift_share=drift_share,
        prediction_drift=prediction_drift,
        alerts=alerts,
        html_report=report.html,
        table_path=table_path,
        snapshot_id=report.snapshot_id,
        on_alert=cfg.monitor.on_alert,
        notes=notes,
    )
    atomic_write_json(layout.monitoring_day(cfg, date) / MONITOR_JSON, result.to_json())
    return result


def read_monitor(cfg: Config, date: dt.date | str) -> dict[str, Any] | None:
    """The recorded report of a day (for ``hap run``'s summary and the retrain trigger)."""
    path = layout.monitoring_day(cfg, date) / MONITOR_JSON
    return json.loads(path.read_text()) if path.exists() else None
