"""The ``hap`` command line: one thin command per pipeline step.

Each command parses its flags, loads the config and calls one step function from the library.
Heavy libraries are imported inside the commands, so ``hap --help`` stays fast. Expected
failures (``HapError``) print one clear message and exit non-zero, without a traceback.
"""

from __future__ import annotations

import datetime as dt
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from hap.core.config import Config, load_config
from hap.core.errors import DayRejected, HapError

app = typer.Typer(
    help="HAP pre-ranking: simulate, ingest, validate, split, train, evaluate, gate, monitor.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DateOpt = Annotated[str, typer.Option("--date", "-d", help="Partition date, YYYY-MM-DD.")]
# the daily flow's options, shared with ``flows.cli`` (which ``hap run`` calls)
RunDateOpt = Annotated[str | None, typer.Option("--date", "-d", help="Day to process (default: yesterday).")]
ForceTrainOpt = Annotated[bool, typer.Option("--force-train", help="Retrain even if the skip rule says no.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show the libraries' own output too.")]


class _State:
    params: Path | None = None
    overrides: list[str] = []
    _cfg: Config | None = None
    sync: bool = True  # a data root on object storage: pull its changes before the command
    synced: bool = False

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self.params, self.overrides)
            if self._cfg.root_url and self.sync:
                from hap.core.storage import pull_root

                pull_root(self._cfg)
                self.synced = True
        return self._cfg

    def publish(self, quiet: bool = False) -> None:
        """Send the command's outputs to the object-store data root it pulled (``quiet``: after a
        failure, whose own message is the one to show)."""
        if self._cfg is None or not self.synced:
            return
        from hap.core.storage import publish_after_failure, publish_root

        if quiet:
            publish_after_failure(self._cfg)
        else:
            publish_root(self._cfg)


state = _State()


@app.callback()
def _global(
    params: Annotated[Path | None, typer.Option(help="params.yaml to use (default: the repo's).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=2 (repeatable)."),
    ] = None,
) -> None:
    state.params = params
    state.overrides = list(set_ or [])
    state._cfg = None
    state.sync, state.synced = True, False


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise HapError(f"'{text}' is not a date of the form YYYY-MM-DD") from None


# ---- foundation ----------------------------------------------------------------------------
@app.command()
def simulate(
    start: Annotated[
        str | None, typer.Option(help="First day, YYYY-MM-DD (default: simulate.start).")
    ] = None,
    days: Annotated[int | None, typer.Option(help="Number of days (default: simulate.days).")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests per day.")] = None,
    scenario: Annotated[str | None, typer.Option(help="stable | retrieval_degrades | content_shift")] = None,
) -> None:
    """Write simulated raw daily logs (exposure, ranking, full-flow) into the landing folder."""
    from hap.sources.simulator import simulate_days

    overrides = {
        k: v
        for k, v in {"simulate.requests_per_day": requests, "simulate.scenario": scenario}.items()
        if v is not None
    }
    cfg = state.cfg.updated(overrides) if overrides else state.cfg
    first = parse_date(start) if start else cfg.simulate.start
    for date, stats in simulate_days(cfg, first, days or cfg.simulate.days):
        typer.echo(
            f"simulated {date}: {stats.requests} requests, {stats.exposures} exposures, "
            f"{stats.ranking_rows} ranking rows, {stats.fullflow_rows} full-flow rows"
        )


def _data_step(step: Callable[..., Any], *dates: str | dt.date) -> None:
    """Run a data step over each day's buckets on the configured engine (one engine session, days
    in the order given); print each day's report."""
    from hap.core.engine import session

    with session(state.cfg) as mapper:
        for date in dates:
            report = step(state.cfg, date if isinstance(date, dt.date) else parse_date(date), mapper=mapper)
            typer.echo(report.render())


@app.command()
def ingest(
    date: Annotated[str | None, typer.Option("--date", "-d", help="Partition date, YYYY-MM-DD.")] = None,
    all_validated: Annotated[
        bool,
        typer.Option(
            "--all-validated",
            help="Every validated day of the landing folder, oldest first: what `dvc repro`'s ingest "
            "stage builds, since each lake table (one Delta log over all days) is one DVC output.",
        ),
    ] = False,
) -> None:
    """Join a day's exposure and ranking logs per request into the lake (atomic, idempotent)."""
    from hap.data.ingest import ingest_day
    from hap.data.markers import validated_days

    if (date is None) == (not all_validated):
        raise HapError("hap ingest: give either --date D or --all-validated")
    _data_step(ingest_day, *([date] if date else validated_days(state.cfg)))


@app.command()
def vacuum() -> None:
    """Delete lake files no snapshot of the last ``lake.vacuum_retention_hours`` reads (replaced or
    removed days, uncommitted leftovers); the daily flow runs it after every ingest."""
    from hap.data import lake

    for table, n in lake.vacuum(state.cfg).items():
        typer.echo(f"vacuumed {table}: {n} files deleted")


@app.command("import-recflow")
def import_recflow(
    path: Annotated[Path, typer.Argument(help="RecFlow root holding all_stage/ and realshow/.")],
) -> None:
    """Map RecFlow's daily feather files into our raw log contracts, one landing day per file."""
    from hap.sources.recflow import import_recflow as run_import

    for date, counts in run_import(state.cfg, path):
        typer.echo(f"imported {date}: {counts}")


# ---- validation -----------------------------------------------------------------------------
@app.command()
def validate(date: DateOpt) -> None:
    """Run the GX suites on a day's raw logs; mark it validated, or quarantine it and exit non-zero."""
    from hap.data.validate import validate_day

    _data_step(validate_day, date)


@app.command("release-quarantine")
def release_quarantine(date: DateOpt) -> None:
    """Take a fixed day out of quarantine, so that it can be ingested and validated again."""
    from hap.data.quarantine import release_quarantine as release

    typer.echo(release(state.cfg, parse_date(date)).render())


# ---- split and data version ------------------------------------------------------
@app.command()
def split(date: DateOpt) -> None:
    """Build the difficulty-split training set and the full-flow eval set for the window ending on D."""
    from hap.data.split import build_training_set

    _data_step(build_training_set, date)


@app.command("data-version")
def data_version(date: DateOpt) -> None:
    """Print the content hash of the training set for the window ending on D."""
    from hap.data.versioning import data_version as compute

    typer.echo(compute(state.cfg, parse_date(date)))


@app.command("recall-curve")
def recall_curve(date: DateOpt) -> None:
    """Write the per-K recall curve (DVC plot data) from the day's eval.json."""
    from hap.model.plots import write_recall_curve

    typer.echo(f"wrote {write_recall_curve(state.cfg, parse_date(date))}")


# ---- registry and promotion gate ------------------------------------------------
@app.command()
def register(date: DateOpt) -> None:
    """Log the day's training run to MLflow and register its bundle as a model version."""
    from hap.registry.registration import register_day

    version = register_day(state.cfg, parse_date(date))
    typer.echo(f"registered {state.cfg.gate.model_name} v{version} for {date}")


@app.command()
def gate(date: DateOpt) -> None:
    """Compare the day's model with the champion on the same eval set; promote it or not."""
    from hap.registry.gate import blessing_path, gate_day

    blessing = gate_day(state.cfg, parse_date(date))
    typer.echo(blessing.render())
    typer.echo(f"blessing: {blessing_path(state.cfg, date)}")


@app.command()
def rollback() -> None:
    """Move the champion alias back to the previous champion."""
    from hap.registry.registration import rollback as run_rollback

    typer.echo(run_rollback(state.cfg).render())


@app.command()
def models() -> None:
    """List registered versions with aliases, key metrics, data version and gate verdict."""
    from hap.registry.listing import list_models, render_models

    typer.echo(render_models(state.cfg, list_models(state.cfg)))


@app.command()
def serve(
    alias: Annotated[str, typer.Option(help="Registry alias whose version to serve.")] = "champion",
    port: Annotated[int | None, typer.Option(help="Port (default: serving.port).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn workers, one model copy each (default: serving.workers).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per worker (default: serving.threads, else torch's).")
    ] = None,
) -> None:
    """Serve a registered version (the champion) with MLflow's scoring server on serving.host:
    POST /invocations with {"dataframe_split": ...}, one row per candidate; Ctrl-C or SIGTERM stops it."""
    from hap.registry.endpoint import serve as run_server

    raise typer.Exit(run_server(state.cfg, alias, port, workers, threads))


# ---- data versions in the DVC remote --------------------------------------------------------
data_app = typer.Typer(
    help="Training sets and bundles in the DVC remote, by content hash.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("push")
def data_push(date: DateOpt) -> None:
    """Push a day's training set and model bundle to the DVC remote by content hash (the daily
    flow does this after every training run)."""
    from hap.data.dvc_store import push_day

    pushed = push_day(state.cfg, parse_date(date))
    typer.echo(f"data version {pushed.data_version}: {pushed.md5} in {pushed.remote}")


@data_app.command("pull")
def data_pull(
    version: Annotated[str, typer.Option("--version", help="A model version's data_version tag.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder to restore into (default: ./training-<version[:12]>).")
    ] = None,
) -> None:
    """Restore the training set of a data version from the DVC remote (HAP_DVC_REMOTE, or the data
    root's) on any machine, and check that its content hash is that version."""
    from hap.data.dvc_store import pull_version

    state.sync = False  # needs only the DVC remote, not the data root
    dest = out or Path(f"training-{version[:12]}")
    pull_version(state.cfg, version, dest)
    typer.echo(f"restored data version {version} into {dest}/ (content hash checked)")


# ---- orchestration: through Prefect, in a subprocess so hap/ never imports flows/ ----
def _flows(*args: str, verbose: bool = False) -> None:
    """``python -m flows.cli ARGS`` in its own process group: SIGTERM or Ctrl-C stops the flow and
    its temporary Prefect server too, within 10 s, instead of orphaning them."""
    from hap.core.procs import run_supervised

    cmd = [sys.executable, "-m", "flows.cli", *(["--verbose"] if verbose else [])]
    if state.params:
        cmd += ["--params", str(state.params)]
    for override in state.overrides:
        cmd += ["--set", override]
    code = run_supervised([*cmd, *args])
    if code:
        raise typer.Exit(code)


@app.command("run")
def run_day(date: RunDateOpt = None, force_train: ForceTrainOpt = False, verbose: VerboseOpt = False) -> None:
    """Run the daily retraining flow (Prefect) for one day."""
    flags = [*(["--date", date] if date else []), *(["--force-train"] if force_train else [])]
    _flows("run", *flags, verbose=verbose)


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD (inclusive).")],
    force_train: ForceTrainOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the daily flow (Prefect) over a date range, in date order."""
    flags = ["--start", start, "--end", end, *(["--force-train"] if force_train else [])]
    _flows("backfill", *flags, verbose=verbose)


@app.command()
def unlock(date: DateOpt) -> None:
    """Free a date's run lock left by a run that died (make sure no run of that date is alive)."""
    parse_date(date)
    _flows("unlock", "--date", date)


@app.command()
def schedule() -> None:
    """Serve the daily-retrain deployment on this machine (flow.serve with params' cron)."""
    _flows("schedule")


# ---- monitoring (monitoring/) --------------------------------------------------------------
@app.command()
def monitor(
    date: DateOpt,
    no_champion: Annotated[
        bool, typer.Option("--no-champion", help="Data-side only; skip the registry.")
    ] = False,
) -> None:
    """Monitor a day: hard fractions, routed share, drift, CTR; Evidently snapshot, HTML, alerts."""
    from monitoring.daily import monitor_day

    report = monitor_day(state.cfg, parse_date(date), champion=None if no_champion else "registry")
    typer.echo(report.render())


@app.command()
def dashboard(
    port: Annotated[int | None, typer.Option(help="Port (default: monitor.ui_port).")] = None,
) -> None:
    """Serve the monitoring dashboards with `evidently ui` on 127.0.0.1 and print the URL."""
    from monitoring.dashboards import serve

    raise typer.Exit(serve(state.cfg, port))


# ---- model: train and evaluate ----------------------------------------------------
@app.command()
def train(
    date: DateOpt,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint of this date.")] = False,
) -> None:
    """Train the light and expressive towers (GHCL) on the day's training set; writes the bundle.

    Under torchrun, run `torchrun --nproc-per-node N -m hap.model.train --date D` (same function, DDP)."""
    from hap.model.train import train_day

    typer.echo(train_day(state.cfg, parse_date(date), resume=resume).render())


@app.command()
def evaluate(date: DateOpt) -> None:
    """Evaluate the day's bundle and the reference rankers on its full-flow eval set; writes
    metrics/dt=D/eval.json (every metric) and eval_requests.parquet (per-request vectors)."""
    from hap.core import layout
    from hap.model.evaluate import EVAL_FILE, evaluate_day, render_table

    day = parse_date(date)
    metrics = evaluate_day(state.cfg, day)
    typer.echo("\n".join(render_table(state.cfg, metrics)))
    typer.echo(f"wrote {layout.metrics_dir(state.cfg, day) / EVAL_FILE} ({len(metrics)} metrics)")


def main() -> None:
    """Entry point: run the app and turn expected failures into a clear message, no traceback."""
    try:
        try:
            app()
        except SystemExit as exit_:  # typer ends every command with one, 0 on success
            state.publish(quiet=bool(exit_.code))
            raise
    except HapError as err:
        message = str(err)
        if isinstance(err, DayRejected) and state._cfg is not None:  # a step found data it must not use
            from hap.data.quarantine import reject

            where = reject(state._cfg, err)
            if where:
                message += f"\n  the day was moved to {where}; fix the data, then `hap release-quarantine`"
        state.publish(quiet=True)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        # Half-written files of the failed step (a Parquet writer on a full disk) fail once more
        # when collected at exit; the error above already reports it, so that echo is dropped.
        sys.unraisablehook = lambda _unraisable: None
        sys.exit(err.exit_code)
    finally:
        # Arrow readers that are garbage but not yet collected may still have I/O tasks in Arrow's
        # thread pools; left to the interpreter's teardown, a pool destroyed under a live task
        # aborts the process after its work is done ("terminate called without an active
        # exception", exit -6: seen once on `hap split` under load; upstream report:
        # https://github.com/apache/arrow/issues/34314). Collected here, while Arrow is alive, they
        # finish first.
        gc.collect()


if __name__ == "__main__":
    main()
