"""Thin Prefect tasks around the step functions of ``hap/``.

Each task calls one step function with a ``Config`` and a date and returns a small JSON-friendly
summary (counts, paths, versions), never a DataFrame. Retries: transient faults only (see
``flows.retry``); their number and backoff come from ``params.yaml`` through ``configured``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from flows import faults
from flows.locks import dvc_lock
from flows.retry import backoff, retry_condition
from hap.core import layout, storage
from hap.core.config import REPO_ROOT, Config
from hap.core.engine import Mapper, local_map
from hap.core.errors import HapError
from hap.core.storage import redact
from hap.data import dvc_repo


def summarize(obj: Any) -> Any:
    """A JSON-friendly copy of a step result (dataclass, pydantic model, dict, path, date)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        return {str(k): summarize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [summarize(v) for v in obj]
    if isinstance(obj, (Path, dt.date)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _task(name: str):
    return task(name=name, cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_condition)


def configured(step: Task, cfg: Config) -> Task:
    """The task with this run's retry count and exponential backoff from ``params.yaml``."""
    o = cfg.orchestration
    return step.with_options(retries=o.retries, retry_delay_seconds=backoff(o.retry_delay_seconds, o.retries))


# ---- data steps ----------------------------------------------------------------------------
# ``mapper`` runs a step's buckets: in the task's process, or as ``flows.engine`` bucket tasks.
@_task("ingest")
def ingest(cfg: Config, date: dt.date, mapper: Mapper = local_map) -> dict[str, Any]:
    faults.maybe_inject(cfg, "ingest")
    from hap.data import lake
    from hap.data.ingest import ingest_day

    out = summarize(ingest_day(cfg, date, mapper=mapper))
    out["vacuumed_files"] = sum(lake.vacuum(cfg).values())  # the lake's scheduled clean-up
    return out


@_task("validate")
def validate(cfg: Config, date: dt.date, mapper: Mapper = local_map) -> dict[str, Any]:
    """Raises ``ValidationFailed`` (never retried) after quarantining a bad day."""
    faults.maybe_inject(cfg, "validate")
    from hap.data.validate import validate_day

    report = validate_day(cfg, date, mapper)
    return {
        "rows": summarize(report.rows),
        "expectations": len(report.findings),
        "failures": len(report.failures),
        "warnings": len(report.warnings),
        "docs": summarize(report.docs),
        "seconds": round(report.seconds, 2),
    }


@_task("split")
def split(cfg: Config, date: dt.date, mapper: Mapper = local_map) -> dict[str, Any]:
    faults.maybe_inject(cfg, "split")
    from hap.data.split import build_training_set

    return summarize(build_training_set(cfg, date, mapper=mapper))


DATA_STEPS = {"validate": validate, "ingest": ingest, "split": split}


# ---- model steps ---------------------------------------------------------------------------
@_task("train")
def train(cfg: Config, date: dt.date, resume: bool = False) -> dict[str, Any]:
    """Train in this process (``train_on: local``)."""
    faults.maybe_inject(cfg, "train")
    from hap.model.train import train_day

    return summarize(train_day(cfg, date, resume=resume))


@_task("train-on-gpu-pool")
def train_remote(
    cfg: Config, date: dt.date, run_spec: dict[str, Any], resume: bool = False
) -> dict[str, Any]:
    """Train on the GPU work pool (``train_on: gpu-pool``) through the ``train-ghcl`` deployment.

    The worker writes the bundle under the same data root (shared storage), so the result is read
    back from ``layout.model_dir`` rather than passed through Prefect. The wait is bounded
    (``wait_for_training``): a worker that dies mid-run fails this step instead of hanging it.
    """
    from prefect.deployments import run_deployment

    created = run_deployment(
        cfg.orchestration.train_deployment,
        parameters={**run_spec, "date": date.isoformat(), "resume": resume},
        timeout=0,  # create it; wait_for_training waits, with bounds
    )
    flow_run = wait_for_training(cfg, created.id, date)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise HapError(
            f"{_remote(cfg, flow_run, date)} ended {state.name if state else 'without a state'}"
            f"{': ' + state.message if state and state.message else ''}"
        )
    storage.pull_root(cfg)  # a data root on object storage: the worker published the bundle there
    bundle = layout.model_dir(cfg, date) / layout.BUNDLE_META_FILE
    if not bundle.exists():
        raise HapError(
            f"{_remote(cfg, flow_run, date)} completed but {bundle} is missing; "
            "the GPU worker must write to the same data root"
        )
    # the same summary as a local train step: the bundle's training result plus its run's timings
    timings = bundle.parent / layout.RUN_FILE
    return {
        **json.loads(bundle.read_text()).get("result", {}),
        **(json.loads(timings.read_text()) if timings.exists() else {}),
        "model_dir": str(bundle.parent),
        "flow_run": flow_run.name,
        "work_pool": flow_run.work_pool_name,
    }


# a running flow's engine emits it every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect: 180)
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
POLL_SECONDS = 2.0


def _remote(cfg: Config, run: Any, date: dt.date) -> str:
    """How an error names the remote training: the step, the pool, the deployment and the run."""
    pool = run.work_pool_name or "?"
    return (
        f"training on work pool '{pool}' failed: deployment {cfg.orchestration.train_deployment} "
        f"run '{run.name}' for {date}"
    )


def _signs_of_life(client: Any, run: Any) -> tuple[Any, ...]:
    """What keeps changing while a train-ghcl run is alive: its state, plus its newest flow-run
    heartbeat once it runs, or the newest heartbeat of its pool's workers while it waits for one."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    state = run.state
    if state is not None and state.is_running():
        now = dt.datetime.now(dt.UTC)
        since = run.created or now - dt.timedelta(days=1)
        page = client.read_events(
            EventFilter(  # newest first; `until` leaves room for a worker whose clock is ahead of ours
                occurred=EventOccurredFilter(since=since, until=now + dt.timedelta(days=1)),
                event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
            ),
            limit=1,
        )
        beat = page.events[0].occurred if page.events else None
    else:
        workers = client.read_workers_for_work_pool(run.work_pool_name) if run.work_pool_name else []
        beat = max((w.last_heartbeat_time for w in workers if w.last_heartbeat_time), default=None)
    return (run.state_type, state.timestamp if state else None, beat)


def wait_verdict(cfg: Config, running: bool, elapsed: float, silent: float) -> tuple[str, str] | None:
    """Why to stop waiting for a train-ghcl run that has not ended, and the state to leave it in
    (Crashed, Cancelled or Cancelling); None: keep waiting. ``elapsed``: seconds since it was
    created; ``silent``: seconds since its signs of life last changed."""
    o = cfg.orchestration
    if elapsed > o.train_timeout_seconds:
        # a live worker stops a Cancelling run; one never started is simply never picked up
        limit = f"orchestration.train_timeout_seconds ({o.train_timeout_seconds:g} s)"
        return f"did not end within {limit}", "Cancelling" if running else "Cancelled"
    bound = o.train_heartbeat_timeout_seconds
    if bound is None or silent <= bound:
        return None
    limit = f"orchestration.train_heartbeat_timeout_seconds ({bound:g} s)"
    if running:
        return f"sent no heartbeat for {silent:.0f} s, over {limit}: its worker or machine is gone", "Crashed"
    return f"was never started: no worker of the pool answered for {silent:.0f} s, over {limit}", "Cancelled"


def wait_for_training(cfg: Config, flow_run_id: Any, date: dt.date) -> Any:
    """The train-ghcl flow run once it ends. Prefect leaves a run whose worker or machine died in
    Running (or Scheduled) for ever, and ``run_deployment`` would wait for ever; this wait ends with
    a ``HapError`` instead (``wait_verdict``), and leaves the run in a final state so that no worker
    picks it up later. Silence is measured on this process's clock, from when the run's signs of
    life (``_signs_of_life``) last changed, so clock skew between hosts does not matter."""
    from prefect import states
    from prefect.client.orchestration import get_client

    started = changed = time.monotonic()
    signs: tuple[Any, ...] | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            now, current = time.monotonic(), _signs_of_life(client, run)
            if current != signs:
                signs, changed = current, now
            running = run.state is not None and run.state.is_running()
            verdict = wait_verdict(cfg, running, now - started, now - changed)
            if verdict is None:
                time.sleep(POLL_SECONDS)
                continue
            reason, state_name = verdict
            message = f"{_remote(cfg, run, date)}: it {reason}"
            outcome = f"now {state_name}"
            try:  # so that no worker picks it up or reports it later; the step fails either way
                client.set_flow_run_state(
                    flow_run_id, getattr(states, state_name)(message=message), force=True
                )
            except Exception as err:  # noqa: BLE001 - the API may be what failed
                now_in = getattr(run.state_type, "value", "unknown")
                outcome = f"still {now_in} in Prefect (marking it {state_name} failed: {err})"
            raise HapError(
                f"{message}. The run is {outcome}; check the pool's workers "
                f"(`prefect worker start --pool {run.work_pool_name}`), then re-run the day"
            )


@_task("evaluate")
def evaluate(cfg: Config, date: dt.date) -> dict[str, Any]:
    faults.maybe_inject(cfg, "evaluate")
    from hap.model.evaluate import evaluate_day

    return summarize(evaluate_day(cfg, date))


@_task("unchanged")
def unchanged(cfg: Config, date: dt.date) -> dict[str, Any] | None:
    """The version already registered for this day from the same data, config and code, if any,
    and whether the gate judged it: re-running such a day would retrain an identical model, so the
    flow stops there, or goes straight to the gate when the run that registered it failed first."""
    from hap.registry.registration import TAG_VERDICT, Registry, identity

    found = Registry(cfg).identical(date, identity(cfg, date))
    if found is None:
        return None
    return {"version": found.version, "gated": TAG_VERDICT in (found.tags or {})}


@_task("register")
def register(cfg: Config, date: dt.date) -> str:
    """Log the MLflow run and register the model; retried when the tracking server is down."""
    faults.maybe_inject(cfg, "register")
    from hap.registry.registration import register_day

    return str(register_day(cfg, date))


@_task("gate")
def gate(cfg: Config, date: dt.date) -> dict[str, Any]:
    faults.maybe_inject(cfg, "gate")
    from hap.registry.gate import gate_day

    return summarize(gate_day(cfg, date))


@_task("monitor")
def monitor(cfg: Config, date: dt.date) -> dict[str, Any]:
    faults.maybe_inject(cfg, "monitor")
    from monitoring.daily import monitor_day

    report = monitor_day(cfg, date)
    figures = {k: v for k, v in report.table.items() if isinstance(v, (int, float))}
    figures.update({"drift_share": report.drift_share, "prediction_drift": report.prediction_drift})
    return summarize(
        {
            "champion_version": report.champion_version,
            "figures": {k: v for k, v in figures.items() if v is not None},
            "reference_days": report.reference.dates,
            "alerts": [a.message for a in report.alerts],
            "html_report": report.html_report,
            "table_path": report.table_path,
            "snapshot_id": report.snapshot_id,
            "notes": report.notes,
        }
    )


@_task("champion")
def champion(cfg: Config) -> dict[str, Any] | None:
    """The current champion (version and metrics), or None before the first promotion."""
    from hap.registry.listing import list_models

    models = summarize(list_models(cfg))
    for model in models or []:
        if isinstance(model, dict) and "champion" in (model.get("aliases") or []):
            return model
    return None


# ---- data versioning -----------------------------------------------------------------------
@_task("version-data")
def version_data(cfg: Config, date: dt.date, trained: bool) -> dict[str, Any]:
    """Record the day's data version; push its training set and bundle to the DVC remote by content
    hash; when the data root is the repository's, also commit its dvc.yaml stages to dvc.lock and
    ``dvc push`` them.

    Holds the repository's DVC concurrency slot: parallel DVC operations fail on DVC's repo lock.
    """
    faults.maybe_inject(cfg, "version-data")
    out: dict[str, Any] = {"data_version": None, "dvc": "skipped"}
    if trained:
        from hap.data.versioning import data_version

        out["data_version"] = data_version(cfg, date)
    if not cfg.orchestration.dvc_push:
        out["dvc"] = "disabled (orchestration.dvc_push: false)"
        return out
    if trained:  # by content hash, wherever the data root lives (hap.data.dvc_store)
        from hap.data import dvc_store

        with dvc_lock(cfg.home / dvc_store.PROJECT, cfg.orchestration.date_lock_timeout_seconds):
            pushed = dvc_store.push_day(cfg, date)
        out["pushed"] = f"{', '.join(f'{k} {v}' for k, v in pushed.md5.items())} to {pushed.remote}"
    targets = dvc_repo.dvc_targets(cfg, date)
    if not targets:
        out["dvc"] = (
            "skipped: this date's outputs are not dvc.yaml stages (data root or date outside the pipeline)"
        )
        return out
    if "evaluate" in targets:  # the evaluate stage's plot output, as `hap recall-curve` writes it
        from hap.model.plots import write_recall_curve

        write_recall_curve(cfg, date)
    with dvc_lock(REPO_ROOT, timeout_seconds=cfg.orchestration.date_lock_timeout_seconds):
        remote = dvc_repo.commit_and_push(cfg, targets, REPO_ROOT)
    out["dvc"] = f"committed to dvc.lock and pushed to {redact(remote)}: {', '.join(targets)}"
    return out
