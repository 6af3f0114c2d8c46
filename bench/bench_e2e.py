"""The daily flow end to end, broken down per task, at each volume of ``--volumes`` (requests a day).

Lands ``split.window_days + 1`` simulated days (simulation is the data source, not a flow step),
runs ``daily-retrain`` for each of them in order against a temporary Prefect server, and reads
the task runs of the last run (a full window and an existing champion: every step runs) back
from the Prefect API. Each task's share of the flow's wall time is its ratio to the whole flow,
measured in the same run; the whole flow of every day is listed too. Default: 3,000 (``make
run``'s volume) and 100,000 requests a day; results in ``bench/results/e2e.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_results


def task_breakdown(flow_run_id: Any) -> list[tuple[str, float]]:
    """(task name, seconds) of one flow run's task runs, in start order, via the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted((r for r in runs if r.start_time), key=lambda r: r.start_time)
    return [
        (r.name.rsplit("-", 1)[0], (r.end_time - r.start_time).total_seconds()) for r in runs if r.end_time
    ]


def run(home: Path, requests: int) -> dict[str, Any]:
    from prefect.testing.utilities import prefect_test_harness

    from bench.common import volume_config
    from flows.daily import daily_retrain
    from hap.sources.simulator import simulate_day

    cfg = volume_config(str(home), requests)
    days = [cfg.simulate.start + dt.timedelta(days=i) for i in range(cfg.split.window_days + 1)]
    for day in days:
        simulate_day(cfg, day, progress=False)
    walls: dict[str, float] = {}
    with prefect_test_harness(server_startup_timeout=120):
        for day in days:
            start = time.perf_counter()
            state = daily_retrain(
                date=day.isoformat(),
                home=str(home),
                overrides={"simulate.requests_per_day": requests},
                return_state=True,
            )
            walls[day.isoformat()] = time.perf_counter() - start
            if not state.is_completed():
                raise SystemExit(f"daily-retrain {day} ended {state.type}: {state.message}")
        tasks = task_breakdown(state.state_details.flow_run_id)
    return {
        "requests_per_day": cfg.simulate.requests_per_day,
        "days": walls,
        "last_day": days[-1].isoformat(),
        "tasks": tasks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, help="parent of the data roots (default: a temporary folder)")
    ap.add_argument("--volumes", default="3000,100000", help="requests a day, comma-separated")
    args = ap.parse_args()
    results, tables = {}, []
    for requests in (int(v) for v in args.volumes.split(",")):
        with tempfile.TemporaryDirectory(prefix="hap-bench-e2e-") as tmp:
            out = run((args.home or Path(tmp)) / f"data-{requests}", requests)
        results[str(requests)] = out
        flow_s = out["days"][out["last_day"]]
        rows = [[name, f"{s:.1f}", s / flow_s] for name, s in out["tasks"]]
        rows.append(["whole flow run (baseline)", f"{flow_s:.1f}", 1.0])
        days = ", ".join(f"{d} {s:.0f} s" for d, s in out["days"].items())
        tables.append(
            f"daily-retrain on {out['last_day']} ({requests:,} requests/day; its window is complete "
            f"and a champion exists, so it trains, registers and gates). Every day's flow: {days}.\n\n"
            + markdown_table(["task", "s", "× flow wall time"], rows)
        )
        print(tables[-1], flush=True)
    write_results("e2e", results, "\n\n".join(tables))


if __name__ == "__main__":
    main()
