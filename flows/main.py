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

from flows.common import bound_prefect, log_to_file, quiet_env, run_config
from hap.core import layout
from hap.core.config import Config


def champion_table(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """The champion next to the reference rankers of its eval set (metrics as logged to MLflow)."""
    from hap.model.evaluate import render_table
    from hap.registry.registration import metric_key

    return ["  " + line for line in render_table(cfg, metrics, metric_key)]


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
    run_file = layout.metrics_dir(cfg, last) / layout.DAILY_RUN_FILE
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
    bound_prefect(cfg)
    from flows.backfill import backfill
    from hap.sources.simulator import simulate_days

    start, days = cfg.simulate.start, cfg.simulate.days
    print(f"simulating {days} days from {start} into {cfg.path('landing')}")
    last = start
    for last, stats in simulate_days(cfg, start, days):
        print(f"  {last}: {stats.requests} requests, {stats.exposures} exposures, {stats.clicks} clicks")
    print(f"full Prefect log: {log_to_file(cfg)}")
    state = backfill(start=start.isoformat(), end=last.isoformat(), return_state=True)
    print(_summary(cfg, last, time.perf_counter() - started))
    if not state.is_completed():
        print(f"backfill ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
