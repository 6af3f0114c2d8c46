"""Command line of the flows: ``python -m flows.cli run|backfill|schedule``.

``hap run``, ``hap backfill`` and ``hap schedule`` call this module in a subprocess, so the
library ``hap/`` never imports ``flows/`` (or Prefect). Expected failures print one line.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from hap.cli import ForceTrainOpt, RunDateOpt, VerboseOpt
from hap.core.config import Config, parse_override
from hap.core.errors import HapError

app = typer.Typer(
    help="Run the HAP flows through Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _Opts:
    params: str | None = None
    overrides: dict[str, Any] = {}
    verbose: bool = False


opts = _Opts()


@app.callback()
def _global(
    params: Annotated[Path | None, typer.Option(help="params.yaml to use.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    opts.params = str(params) if params else None
    opts.overrides = dict(parse_override(o) for o in set_ or [])
    opts.verbose = verbose
    from flows.common import bound_prefect, quiet_env, run_config

    quiet_env()  # before any Prefect client starts a temporary server
    bound_prefect(run_config(opts.overrides, None, opts.params))


def _raise_on_failure(
    state: Any, cfg: Config, term: TextIO, days: list[dt.date], since: float, log: Path
) -> Any:
    """The flow's result; or, after a paragraph for each failed day on ``term``, its ``HapError``
    re-raised (so the exit code is the step's own) and marked as already reported."""
    from flows.progress import failed_days, failure_paragraph

    result = state.result(raise_on_failure=False)
    if state.is_completed():
        return result
    error = (
        result if isinstance(result, HapError) else HapError(state.message or f"flow run ended {state.name}")
    )
    paragraphs = [failure_paragraph(summary, log) for summary in failed_days(cfg, days, since)]
    if paragraphs:
        print("\n" + "\n\n".join(paragraphs), file=term)
        error.reported = True  # type: ignore[attr-defined]
    raise error


def _cfg() -> Config:
    from flows.common import run_config

    return run_config(opts.overrides, None, opts.params)


@app.command()
def run(date: RunDateOpt = None, force_train: ForceTrainOpt = False) -> None:
    """Run the daily retraining flow for one day."""
    from flows.common import log_to_file, resolve_date
    from flows.daily import daily_retrain
    from flows.progress import console
    from flows.report import gate_verdict

    cfg, since = _cfg(), time.time()
    log = log_to_file(cfg)
    with console(log, opts.verbose) as term:
        state = daily_retrain(
            date=date,
            force_train=force_train,
            overrides=opts.overrides,
            params_file=opts.params,
            return_state=True,
        )
        summary = _raise_on_failure(state, cfg, term, [resolve_date(cfg, date)], since, log)
        print(
            f"{summary['date']}: retrain={summary.get('retrain')} ({summary.get('retrain_reason')}); "
            f"model version {summary.get('model_version') or '-'}; gate {gate_verdict(summary.get('gate'))}",
            file=term,
        )


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD (inclusive).")],
    force_train: ForceTrainOpt = False,
) -> None:
    """Run the daily flow over a date range, in order."""
    from flows.backfill import backfill as backfill_flow
    from flows.common import date_range, log_to_file, resolve_date
    from flows.progress import console

    cfg, since = _cfg(), time.time()
    days = date_range(resolve_date(cfg, start), resolve_date(cfg, end))
    log = log_to_file(cfg)
    with console(log, opts.verbose) as term:
        state = backfill_flow(
            start=start,
            end=end,
            force_train=force_train,
            overrides=opts.overrides,
            params_file=opts.params,
            return_state=True,
        )
        for row in _raise_on_failure(state, cfg, term, days, since, log):
            print(f"{row['date']}: {row['state']}", file=term)


@app.command()
def unlock(date: Annotated[str, typer.Option("--date", "-d", help="Day whose run lock to free.")]) -> None:
    """Free the run lock of a date held by a run that died (check first that none is running)."""
    from flows.common import resolve_date, run_config
    from flows.locks import date_limit_name
    from flows.locks import unlock as free

    name = date_limit_name(resolve_date(run_config(opts.overrides, None, opts.params), date))
    typer.echo(f"freed lock '{name}'" if free(name) else f"no lock '{name}': nothing to free")


@app.command()
def schedule() -> None:
    """Serve the daily-retrain deployment on this machine (cron and timezone from params.yaml)."""
    from prefect.schedules import Cron

    from flows.common import run_config
    from flows.daily import daily_retrain

    cfg = run_config(opts.overrides, None, opts.params)
    o = cfg.orchestration
    typer.echo(
        f"serving daily-retrain: cron '{o.cron}' ({o.timezone}); needs a Prefect server "
        "(PREFECT_API_URL) for the schedule to fire; Ctrl-C to stop"
    )
    daily_retrain.serve(
        name="daily-retrain",
        schedules=[Cron(o.cron, timezone=o.timezone)],
        parameters={"overrides": opts.overrides, "params_file": opts.params},
        tags=["hap", "daily"],
    )


class _NoExpectedTraceback(logging.Filter):
    """Console only: drop Prefect's "Encountered exception" record (with its traceback) when the
    exception is an expected ``HapError``; the step's message is printed once below, and the Prefect
    API log (another handler) keeps the full record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HapError)


def quiet_expected_failures() -> None:
    """Install the console filter on Prefect's stream handlers (after Prefect sets up logging)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler).__name__ != "APILogHandler" and isinstance(handler, logging.StreamHandler):
                if not any(isinstance(f, _NoExpectedTraceback) for f in handler.filters):
                    handler.addFilter(_NoExpectedTraceback())


def main() -> None:
    from hap.core.procs import install_interrupt

    install_interrupt()
    quiet_expected_failures()
    try:
        app()
    except HapError as err:
        if not getattr(err, "reported", False):
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(getattr(err, "exit_code", 1))
    except BaseException as err:  # SIGTERM (Prefect's TerminationSignal, Interrupted) or Ctrl-C
        signum = getattr(err, "signum", None) or getattr(err, "signal", None)
        if signum is None and not isinstance(err, KeyboardInterrupt):
            raise
        signum = signum or signal.SIGINT
        typer.secho(
            f"stopped by {signal.Signals(signum).name}: the flow run is marked crashed, its locks are "
            "released, no alias moved after the signal; re-run the day to finish it",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
