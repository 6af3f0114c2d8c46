"""``python -m flows.main`` (``make run``): a week of simulated logs, backfilled through the daily flow.

1. simulates ``simulate.days`` days from ``simulate.start`` with the default params;
2. backfills ``daily_retrain`` over them in order (champion/challenger decisions, monitoring);
3. prints the champion with its metrics, the last day's drift, and how to open the UIs.

``HAP_HOME`` moves the data root; ``HAP__SECTION__KEY`` env vars override params as everywhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any, TextIO

from flows import progress
from flows.common import bound_prefect, log_to_file, quiet_env, run_config
from flows.report import alert_text
from hap.core import layout
from hap.core.config import Config

# today's monitoring figures the closing summary shows; daily_run.json and the report have all
HEADLINE_FIGURES = ("hard_neg", "near_margin", "routed", "ctr", "drift_share", "prediction_drift")


def champion_table(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """The champion next to the reference rankers of its eval set (metrics as logged to MLflow)."""
    from hap.model.evaluate import render_table
    from hap.registry.registration import metric_key

    return ["  " + line for line in render_table(cfg, metrics, metric_key)]


def _summary(cfg: Config, last: Any, elapsed: float) -> str:
    """The closing report: the champion against the reference rankers, every version's verdict,
    today's monitoring headline and where to look next (the full figures are in the artifacts)."""
    from hap.registry.listing import list_models
    from hap.registry.tracking import tracking_uri

    rows = list_models(cfg)
    lines = ["", f"== summary: {len(rows)} model versions registered, {elapsed:.0f} s =="]
    champ = next((r for r in rows if "champion" in r.aliases), None)
    if champ:
        lines.append(
            f"champion: {cfg.gate.model_name} v{champ.version} "
            f"(trained {champ.date}, data {champ.data_version[:12]})"
        )
        lines += champion_table(cfg, champ.metrics)
    else:
        lines.append("champion: none promoted")
    if rows:
        verdicts = ", ".join(f"v{r.version} {r.date} {r.verdict}" for r in rows)
        lines.append(f"gate verdicts: {verdicts}")
    run_file = layout.metrics_dir(cfg, last) / layout.DAILY_RUN_FILE
    if run_file.exists():
        day = json.loads(run_file.read_text())
        mon = day.get("monitor") or {}
        figures = mon.get("figures") or {}
        headline = ", ".join(
            f"{k} {figures[k]:.4g}" for k in HEADLINE_FIGURES if isinstance(figures.get(k), (int, float))
        )
        alerts = mon.get("alerts") or []
        lines.append(f"monitoring {last}: {headline}; {len(alerts)} alerts")
        lines += [f"  - {alert_text(a)}" for a in alerts]
        if mon.get("html_report"):
            lines.append(f"  Evidently report: {mon['html_report']}")
        if day.get("monitor_note"):
            lines.append(f"  {day['monitor_note']}")
    lines += [
        "open the UIs (127.0.0.1 only): `hap dashboard` (Evidently) and",
        f"  mlflow ui --backend-store-uri {tracking_uri(cfg)} --host 127.0.0.1 --port 5000",
    ]
    return "\n".join(lines)


def _simulate(cfg: Config, term: TextIO) -> list[dt.date]:
    """Simulate the week into the landing folder: one line, and a bar on a terminal."""
    from tqdm import tqdm

    from hap.sources.simulator import simulate_days

    start, n_days = cfg.simulate.start, cfg.simulate.days
    began, days, totals = time.perf_counter(), [], [0, 0, 0]
    bar = tqdm(total=n_days, desc="simulate", unit="day", file=term, disable=not term.isatty(), leave=False)
    for day, stats in simulate_days(cfg, start, n_days, progress=False):
        days.append(day)
        totals = [totals[0] + stats.requests, totals[1] + stats.exposures, totals[2] + stats.clicks]
        bar.update()
    bar.close()
    detail = (
        f"{n_days} days into {cfg.path('landing')}: "
        f"{totals[0]} requests, {totals[1]} exposures, {totals[2]} clicks"
    )
    label = f"{days[0]}..{days[-1].day:02d}" if days else "-"
    print(progress.step_line(label, "simulate", "ok", time.perf_counter() - began, detail), file=term)
    return days


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own output too")
    args = parser.parse_args(argv)
    quiet_env()
    started, wall_started = time.perf_counter(), time.time()
    cfg = run_config()
    bound_prefect(cfg)
    log_path = log_to_file(cfg)
    with progress.console(log_path, verbose=args.verbose) as term:
        days = _simulate(cfg, term)
        from flows.backfill import backfill

        state = backfill(start=days[0].isoformat(), end=days[-1].isoformat(), return_state=True)
        print(_summary(cfg, days[-1], time.perf_counter() - started), file=term)
        if state.is_completed():
            return 0
        failed = progress.failed_days(cfg, days, since=wall_started)
        for summary in failed:
            print("\n" + progress.failure_paragraph(summary, log_path), file=term)
        if not failed:
            print(f"\nthe backfill ended {state.name}: {state.message}. Full log: {log_path}.", file=term)
        return 1


if __name__ == "__main__":
    sys.exit(main())
