"""``backfill(start, end)``: the daily flow over a date range, strictly in date order.

Order matters: each day's gate compares against the champion the previous day left. Re-running
a range is idempotent: every step replaces its day's outputs atomically. A failed day (for
example a quarantined one) leaves the champion unchanged; the backfill goes on with the next day
and ends Failed, naming the failed days.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.common import date_range, quiet_env, resolve_date, run_config
from flows.daily import daily_retrain
from hap.core.errors import HapError


@flow(name="backfill", log_prints=True)
def backfill(
    start: str,
    end: str,
    force_train: bool = False,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
    params_file: str | None = None,
) -> list[dict[str, Any]]:
    """Run ``daily_retrain`` for every day from ``start`` to ``end`` inclusive, in order."""
    quiet_env()
    cfg = run_config(overrides, home, params_file)
    days = date_range(resolve_date(cfg, start), resolve_date(cfg, end))
    logger = get_run_logger()
    results: list[dict[str, Any]] = []
    for day in days:
        state = daily_retrain(
            date=day.isoformat(),
            force_train=force_train,
            overrides=overrides,
            home=home,
            params_file=params_file,
            return_state=True,
        )
        ok = state.is_completed()
        results.append(
            {"date": day.isoformat(), "state": state.name, "message": None if ok else state.message}
        )
        logger.info("backfill %s: %s", day, state.name)
    failed = [r for r in results if r["state"] != "Completed"]
    if failed:
        raise HapError("backfill: " + "; ".join(f"{r['date']} {r['state']}: {r['message']}" for r in failed))
    return results
