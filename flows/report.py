"""The daily run's markdown artifact: counts, metrics, gate verdict, drift, where to look.

Rendering is a pure function of the run summary (a dict of the tasks' JSON summaries), so it is
tested without Prefect and the same text is printed by ``python -m flows.main``.
"""

from __future__ import annotations

import re
from typing import Any

KEY_METRICS = (
    "recall@10",
    "recall@50",
    "recall@100",
    "rank50_recall@50",
    "ndcg@50",
    "gauc",
    "auc",
    "logloss",
    "auc_slice_easy",
    "auc_slice_hard",
    "flops_per_request",
    "latency_ms_per_1k",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e12 else f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    chosen = [k for k in KEY_METRICS if k in metrics]
    return [(k, metrics[k]) for k in (chosen or sorted(metrics)[:15])]


def _counts(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    ingest = summary.get("ingest") or {}
    for key in ("requests", "samples", "fullflow_rows"):
        if key in ingest:
            rows.append((f"ingested {key}", ingest[key]))
    for source, n in sorted((ingest.get("by_source") or {}).items()):
        rows.append((f"  {source}", n))
    split = summary.get("split") or {}
    for key in ("rows", "eval_requests", "eval_rows"):
        if key in split:
            rows.append((f"training set {key}", split[key]))
    for difficulty, n in sorted((split.get("by_difficulty") or {}).items()):
        rows.append((f"  {difficulty}", n))
    return rows


def gate_verdict(gate: dict[str, Any] | None) -> str:
    if not gate:
        return "not run"
    promoted = "promoted to champion" if gate.get("promoted", gate.get("blessed")) else "not promoted"
    verdict = gate.get("verdict")
    reason = (
        gate.get("reason") or "; ".join(str(r) for r in gate.get("reasons") or []) or gate.get("undecided")
    )
    return (f"{verdict}, {promoted}" if verdict else promoted) + (f" ({reason})" if reason else "")


def render_day(summary: dict[str, Any]) -> str:
    """Markdown for one daily run."""
    date = summary.get("date")
    out = [
        f"# HAP daily retrain, {date}",
        "",
        f"**Status:** {summary.get('status', 'completed')}  ",
        f"**Retrain:** {'yes' if summary.get('retrain') else 'no'} ({summary.get('retrain_reason', '')})  ",
    ]
    if summary.get("error"):
        out += ["", f"**Failure:** {summary['error']}"]
    counts = _counts(summary)
    if counts:
        out += ["", "## Counts", "", _table(counts, ("what", "rows"))]
    train = summary.get("train") or {}
    if train:
        out += [
            "",
            "## Training",
            "",
            f"- {train.get('epochs_run', '?')} epoch(s) on {train.get('device', '?')}"
            f" x{train.get('world_size', 1)}"
            f" in {_fmt(train.get('train_seconds', '?'))} s; validation {train.get('val_metric', {})}",
        ]
    metrics = summary.get("evaluate") or {}
    if isinstance(metrics, dict) and metrics:
        out += ["", "## Offline metrics (eval set)", "", _table(_metric_rows(metrics), ("metric", "value"))]
    out += [
        "",
        "## Gate",
        "",
        f"- model version: {summary.get('model_version') or 'none registered'}",
        f"- verdict: {gate_verdict(summary.get('gate'))}",
    ]
    champ = summary.get("champion") or {}
    out += [f"- champion now: {champ.get('version', 'none') if champ else 'none'}"]
    monitor = summary.get("monitor") or {}
    if monitor:
        figures = monitor.get("figures") or {}
        out += ["", "## Drift and hard-sample fraction", ""]
        overall = (
            {k: v for k, v in figures.items() if not re.search(r"_ct\d+$", k)}
            if isinstance(figures, dict)
            else {}
        )
        if overall:
            out += [
                _table(
                    sorted(overall.items()), ("figure (overall; per content type in the report)", "value")
                ),
                "",
            ]
        out += [f"- note: {n}" for n in monitor.get("notes") or []]
        alerts = monitor.get("alerts") or []
        out += [f"- alerts: {len(alerts)}"] + [f"  - {a}" for a in alerts]
    elif summary.get("monitor_note"):
        out += ["", "## Drift", "", f"- {summary['monitor_note']}"]
    out += ["", "## Where to look", ""]
    if summary.get("model_version"):
        out.append(
            f"- MLflow model: `{summary.get('model_name', 'hap-prerank')}` version {summary['model_version']}"
            f" (tracking: `{summary.get('tracking_uri', '')}`)"
        )
    if monitor.get("html_report"):
        out.append(f"- Evidently report: `{monitor['html_report']}`")
    versioning = summary.get("version_data") or {}
    if versioning:
        out.append(f"- data version: `{versioning.get('data_version')}`; DVC: {versioning.get('dvc')}")
        if versioning.get("pushed"):
            out.append(f"- in the DVC remote by hash: {versioning['pushed']}")
    for key in ("model_dir", "metrics_dir", "quarantine"):
        if summary.get(key):
            out.append(f"- {key.replace('_', ' ')}: `{summary[key]}`")
    return "\n".join(out) + "\n"


def alert_text(alert: Any) -> str:
    """One alert as the on-call engineer reads it: its rule and what moved (``rule: message``)."""
    if isinstance(alert, dict) and alert.get("rule"):
        return f"{alert['rule']}: {alert.get('message', '')}".rstrip(": ")
    return str(alert)


def render_alert(date: str, alerts: list[Any], html_report: str | None) -> str:
    lines = [f"# Monitoring alert, {date}", "", f"{len(alerts)} rule(s) breached:", ""]
    lines += [f"- {alert_text(a)}" for a in alerts]
    if html_report:
        lines += ["", f"Evidently report: `{html_report}`"]
    return "\n".join(lines) + "\n"
