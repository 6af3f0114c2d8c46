"""What every flow shares: the config a run uses, and the date it runs for.

Flow parameters stay JSON (deployments and ``run_deployment`` send them over the API): a date
string, ``overrides`` as dotted keys (``{"train.epochs": 1}``), an optional data root ``home``
and an optional ``params_file``. Every flow rebuilds the same ``Config`` from them.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hap.core.config import Config, load_config
from hap.core.errors import HapError

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def quiet_env() -> None:
    """Telemetry off for every library the flows touch (STACK.md)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def bound_prefect(cfg: Config) -> None:
    """Bound the Prefect client's API calls (read when Prefect is first imported)."""
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", str(cfg.orchestration.prefect_api_timeout_seconds))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def log_to_file(cfg: Config) -> Path:
    """Send Prefect's full log (every logger under ``prefect``, DEBUG included) to a file under
    ``<data root>/logs``; the console keeps Prefect's usual lines. The file's path.

    Prefect's logging is set up first: its first set-up replaces the handlers of its loggers, so a
    handler added before it would be dropped (later set-ups are incremental)."""
    import logging

    from prefect.logging.configuration import setup_logging

    setup_logging()

    path = cfg.home / "logs" / f"run-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    for name in ("prefect", "mlflow", "hap", "flows"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
    return path


def run_spec(
    overrides: dict[str, Any] | None = None, home: str | None = None, params_file: str | None = None
) -> dict[str, Any]:
    """The JSON parameters that rebuild a run's config in another flow or on another worker."""
    return {"overrides": dict(overrides or {}), "home": home, "params_file": params_file}


def run_config(
    overrides: dict[str, Any] | None = None, home: str | None = None, params_file: str | None = None
) -> Config:
    environ = dict(os.environ)
    if home:
        environ["HAP_HOME"] = str(home)
    return load_config(params_file, dict(overrides or {}), environ=environ)


def resolve_date(cfg: Config, date: str | dt.date | None) -> dt.date:
    """The day a run processes: the given one, or yesterday in the schedule's timezone."""
    if date is None or date == "":
        return dt.datetime.now(ZoneInfo(cfg.orchestration.timezone)).date() - dt.timedelta(days=1)
    if isinstance(date, dt.date):
        return date
    try:
        return dt.date.fromisoformat(str(date))
    except ValueError:
        raise HapError(f"'{date}' is not a date of the form YYYY-MM-DD") from None


def date_range(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise HapError(f"backfill: end {end} is before start {start}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
