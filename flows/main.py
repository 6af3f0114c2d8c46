"""``python -m flows.main`` (``make run``): a week of simulated logs, backfilled through the daily flow.

1. simulates ``simulate.days`` days from ``simulate.start`` with the default params;
2. backfills ``daily_retrain`` over them in order (champion/challenger decisions, monitoring);
3. prints the champion with its metrics, the last day's drift, and how to open the UIs.

``HAP_HOME`` moves the data root; ``HAP__SECTION__KEY`` env vars override params as everywhere.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from flows.common import quiet_env, run_config
from hap.core import layout
from hap.core.config import Config

RANKERS = (
    ("champion", ""),
    ("its light model", "light_"),
    ("logged ranking order", "ref_ranking_"),
    ("logged pre-ranking order", "ref_prerank_"),
    ("logged retrieval order", "ref_retrieval_"),
    ("random order", "ref_random_"),
    ("ground truth", "ref_truth_"),
)
TABLE_METRICS = ("gt_recall@50", "exp_clicks@10", "recall@50", "ndcg@50")


def champion_table(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """The champion next to the reference rankers of its eval set (metrics as logged to MLflow)."""
    from hap.registry.registration import metric_key

    def cell(name: str) -> str:
        value = metrics.get(metric_key(name))
        return f"{value:>14.4f}" if value is not None else f"{'-':>14}"

    lines = [f"  {'ranker (same eval requests)':<28}" + "".join(f"{m:>14}" for m in TABLE_METRICS)]
    for label, prefix in RANKERS:
        if any(metric_key(prefix + m) in metrics for m in TABLE_METRICS):
            lines.append(f"  {label:<28}" + "".join(cell(prefix + m) for m in TABLE_METRICS))
    primary = cfg.evaluate.primary_metric
    half = metrics.get(metric_key(f"ci/{primary}/halfwidth"))
    if half is not None:
        n = metrics.get(metric_key("n_requests"), float("nan"))
        lines.append(f"  {primary}: 95% interval half-width {half:.4f} over {n:.0f} eval requests")
    for key in ("gauc", "auc_light", "auc_expressive", "logloss", "logloss_constant", "flops_per_request"):
        if metric_key(key) in metrics:
            lines.append(f"  {key:<28}{metrics[metric_key(key)]:.4g}")
    return lines


def _summary(cfg: Config, last: Any, elapsed: float) -> str:
    from hap.registry.registration import list_models
    from hap.registry.tracking import tracking_uri

    lines = ["", "=" * 72, "HAP daily retraining: summary", "=" * 72]
    rows = list_models(cfg)
    champ = next((r for r in rows if "champion" in r.aliases), None)
    lines.append(f"model versions registered: {len(rows)}")
    if champ:
        lines.append(
            f"champion: {cfg.gate.model_name} v{champ.version} "
            f"(trained {champ.date}, data {champ.data_version[:12]})"
        )
        lines += champion_table(cfg, champ.metrics)
    else:
        lines.append("champion: none promoted")
    for row in rows:
        lines.append(f"  v{row.version} {row.date} gate={row.verdict} aliases={','.join(row.aliases) or '-'}")
    run_file = layout.metrics_dir(cfg, last) / "daily_run.json"
    if run_file.exists():
        day = json.loads(run_file.read_text())
        mon = day.get("monitor") or {}
        lines.append(f"today ({last}): retrain={day.get('retrain')} ({day.get('retrain_reason')})")
        for key, value in sorted((mon.get("figures") or {}).items()):
            lines.append(f"  {key:<32} {value:.4g}" if isinstance(value, float) else f"  {key:<32} {value}")
        lines.append(
            f"  alerts: {len(mon.get('alerts') or [])}"
            + "".join(f"\n    - {a}" for a in mon.get("alerts") or [])
        )
        if mon.get("html_report"):
            lines.append(f"  Evidently report: {mon['html_report']}")
        if day.get("monitor_note"):
            lines.append(f"  {day['monitor_note']}")
    lines += [
        "",
        "open the UIs (127.0.0.1 only):",
        f"  mlflow ui --backend-store-uri {tracking_uri(cfg)} --host 127.0.0.1 --port 5000",
        "  hap dashboard            # evidently ui on the monitoring workspace",
        f"took {elapsed:.0f} s",
    ]
    return "\n".join(lines)


def main() -> int:
    quiet_env()
    started = time.perf_counter()
    cfg = run_config()
    from flows.backfill import backfill
    from hap.sources.simulator import simulate_days

    start, days = cfg.simulate.start, cfg.simulate.days
    print(f"simulating {days} days from {start} into {cfg.path('landing')}")
    last = start
    for last, stats in simulate_days(cfg, start, days):
        print(f"  {last}: {stats.requests} requests, {stats.exposures} exposures, {stats.clicks} clicks")
    state = backfill(start=start.isoformat(), end=last.isoformat(), return_state=True)
    print(_summary(cfg, last, time.perf_counter() - started))
    if not state.is_completed():
        print(f"backfill ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
