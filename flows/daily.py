"""``daily_retrain(date)``: validate -> ingest -> split -> train -> evaluate -> register -> gate ->
monitor -> version the data (``dvc push``).

- Failures: a transient fault is retried (``flows.retry``); a ``HapError`` such as
  ``ValidationFailed`` is not. Validation runs on the landing files before ingest publishes them;
  a rejection anywhere (validate, ingest, train's non-finite check: any ``DayRejected``) leaves the
  day quarantined, nothing published and the champion where it was, and ends the flow Failed with
  the step's own one-line message (Prefect's log keeps the details).
- Concurrency: the whole run locks the days of its window (one run per day of data; a second
  one waits, then refuses) and DVC operations lock the repository (``flows.locks``).
- Skip rule: ``flows.policy`` decides whether the day retrains; an alert can force the next one.
- Scale: the data steps (validate, ingest, split) map their request-hash buckets in-process by
  default, or run in the ``data-path`` subflow on the Dask cluster ``engine.address``
  (``HAP_DASK_ADDRESS``) names, or on ``engine.workers`` local worker processes (``flows.engine``).
- Storage: with the data root on object storage (``HAP_HOME=s3://...``) the run pulls the bucket's
  changes into its local working copy first and publishes each step's outputs as the step ends
  (``hap.core.storage``); an unreachable or denied bucket fails the run at its start.
- Output: a markdown artifact ``daily-retrain-<D>`` and ``metrics/dt=D/daily_run.json``; a
  monitoring alert also emits the Prefect event ``hap.monitor.alert`` and an alert artifact; an
  undecided gate under ``gate.on_undecided: alert`` emits ``hap.gate.undecided`` and an artifact.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows import policy, progress, report, tasks
from flows.common import quiet_env, resolve_date, run_config, run_spec
from flows.data_path import data_steps, run_step
from flows.locks import run_lock
from hap.core import layout, storage
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import DataContractError, DayRejected, HapError, StorageError, ValidationFailed
from hap.data.quarantine import reject
from hap.registry.tracking import check_reachable

SUMMARY_FILE = layout.DAILY_RUN_FILE
ALERT_EVENT = "hap.monitor.alert"
GATE_ALERT_EVENT = "hap.gate.undecided"


def _where(cfg: Config, day: dt.date) -> dict[str, Any]:
    from hap.registry.tracking import tracking_uri

    return {
        "model_name": cfg.gate.model_name,
        "tracking_uri": tracking_uri(cfg),
        "metrics_dir": str(layout.metrics_dir(cfg, day)),
    }


def _train(cfg: Config, day: dt.date, spec: dict[str, Any], summary: dict[str, Any]) -> None:
    if cfg.orchestration.train_on == "gpu-pool":
        run_step(tasks.train_remote, cfg, day, spec, record=(summary, "train"))
    else:
        run_step(tasks.train, cfg, day, record=(summary, "train"))


def _retrain(cfg: Config, day: dt.date, spec: dict[str, Any], summary: dict[str, Any]) -> None:
    summary.update(data_steps(cfg, day, spec, ("split",)))
    same = run_step(tasks.unchanged, cfg, day)
    if same is not None and not same["gated"]:  # registered by a run that failed before its gate
        summary.update(model_version=same["version"], retrain=False)
        progress.skipped(day, "train", f"unchanged: v{same['version']} has no gate verdict yet: gating it")
        _gate(cfg, day, summary)
        return
    if same is not None:  # same data, config and code as a gated version: nothing to do
        same = same["version"]
        summary.update(model_version=same, retrain=False)
        summary["retrain_reason"] = (
            f"unchanged: v{same} was trained for {day.isoformat()} from the same data version, "
            "config and code; no new version, no alias moved"
        )
        get_run_logger().info(summary["retrain_reason"])
        progress.skipped(day, "train", f"unchanged: v{same} was trained from the same data, config and code")
        return
    _train(cfg, day, spec, summary)
    summary["model_dir"] = str(layout.model_dir(cfg, day))
    run_step(tasks.evaluate, cfg, day, record=(summary, "evaluate"))
    run_step(tasks.register, cfg, day, record=(summary, "model_version"))
    _gate(cfg, day, summary)


def _gate(cfg: Config, day: dt.date, summary: dict[str, Any]) -> None:
    run_step(tasks.gate, cfg, day, record=(summary, "gate"))
    if summary["gate"].get("alert"):
        raise_gate_alert(day, summary["gate"])
    policy.consume_request(cfg, day)


def raise_gate_alert(day: dt.date, gate: dict[str, Any]) -> None:
    """An undecided gate under ``gate.on_undecided: alert``: the champion stays, and the on-call
    engineer gets a Prefect event and an artifact saying why the comparison could not decide."""
    iso = day.isoformat()
    emit_event(
        event=GATE_ALERT_EVENT,
        resource={"prefect.resource.id": f"hap.gate.{iso}", "prefect.resource.name": f"HAP gate {iso}"},
        payload={
            "date": iso,
            "challenger": gate.get("challenger_version"),
            "undecided": gate.get("undecided"),
        },
    )
    create_markdown_artifact(
        f"# HAP gate undecided, {iso}\n\n{gate.get('undecided')}\n",
        key=f"gate-undecided-{iso}",
        description=f"HAP gate could not decide on {iso}",
    )
    get_run_logger().warning(f"gate {iso}: {gate.get('undecided')}")


def _monitor(cfg: Config, day: dt.date, summary: dict[str, Any]) -> None:
    """Monitoring that cannot run yet (no champion, no reference days) is a note, not a failure."""
    try:
        result = run_step(tasks.monitor, cfg, day)
    except StorageError:  # the store, not monitoring's prerequisites: the run fails, by name
        raise
    except HapError as err:
        summary["monitor_note"] = f"monitoring skipped: {err}"
        get_run_logger().warning(summary["monitor_note"])
        return
    summary["monitor"] = result
    alerts = result.get("alerts") or []
    if alerts:
        raise_alert(cfg, day, alerts, result.get("html_report"))


def raise_alert(cfg: Config, day: dt.date, alerts: list[Any], html_report: str | None) -> None:
    """A breach: a Prefect event (automations can page or trigger a run), an artifact, and a
    retrain request for the next run when ``monitor.on_alert: retrain``."""
    iso = day.isoformat()
    emit_event(
        event=ALERT_EVENT,
        resource={
            "prefect.resource.id": f"hap.monitor.{iso}",
            "prefect.resource.name": f"HAP monitoring {iso}",
        },
        payload={
            "date": iso,
            "alerts": [str(a) for a in alerts],
            "html_report": html_report,
            "on_alert": cfg.monitor.on_alert,
        },
    )
    create_markdown_artifact(
        report.render_alert(iso, alerts, html_report),
        key=f"monitor-alert-{iso}",
        description=f"HAP monitoring alert for {iso}",
    )
    if cfg.monitor.on_alert == "retrain":
        policy.request_retrain(cfg, day, alerts)


def run_day(cfg: Config, day: dt.date, force_train: bool, spec: dict[str, Any]) -> dict[str, Any]:
    """Every step for one day, in order; the summary is written even when a step fails."""
    summary: dict[str, Any] = {"date": day.isoformat(), "status": "running", **_where(cfg, day)}
    try:
        # the landing files are validated before ingest publishes them
        summary.update(data_steps(cfg, day, spec, ("validate", "ingest")))
        decision = policy.decide(cfg, day, force=force_train)
        summary.update(retrain=decision.retrain, retrain_reason=decision.reason)
        if decision.retrain:
            _retrain(cfg, day, spec, summary)
        else:
            progress.skipped(day, "train", decision.reason)
        run_step(tasks.champion, cfg, record=(summary, "champion"))
        _monitor(cfg, day, summary)
        run_step(tasks.version_data, cfg, day, decision.retrain, record=(summary, "version_data"))
        summary["status"] = "completed"
    except BaseException as err:
        summary.update(
            status="failed",
            error=str(err),
            error_type=type(err).__name__,
            failed_step=getattr(err, "failed_step", None),
            expected=isinstance(err, HapError),
        )
        where = reject(cfg, err) if isinstance(err, DayRejected) else None
        if where:  # say where the rejected day went, in the one line the user sees
            err.args = (
                f"{err}\n  the day was moved to {where}; fix the data, then `hap release-quarantine`",
            )
        if (
            isinstance(err, (ValidationFailed, DataContractError))
            and layout.quarantine_day(cfg, day).exists()
        ):
            where = layout.quarantine_day(cfg, day)
        if where:
            summary.update(quarantine=str(where), error=str(err))
            summary["retrain_reason"] = f"{type(err).__name__}: day quarantined, no model, champion unchanged"
        raise
    finally:
        atomic_write_json(layout.metrics_dir(cfg, day) / SUMMARY_FILE, summary)
        create_markdown_artifact(
            report.render_day(summary),
            key=f"daily-retrain-{day.isoformat()}",
            description=f"HAP daily retrain for {day.isoformat()}",
        )
    return summary


@flow(name="daily-retrain", log_prints=True)
def daily_retrain(
    date: str | None = None,
    force_train: bool = False,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
    params_file: str | None = None,
) -> dict[str, Any]:
    """Retrain the HAP pre-ranker on the day ``date`` (default: yesterday in the schedule's timezone)."""
    quiet_env()
    spec = run_spec(overrides, home, params_file)
    cfg = run_config(**spec)
    day = resolve_date(cfg, date)
    check_reachable(cfg)  # a dead tracking server fails the run now, not after training
    with run_lock(cfg, day, cfg.orchestration.date_lock_timeout_seconds):
        return _run_synced(cfg, day, force_train, spec)


def _run_synced(cfg: Config, day: dt.date, force_train: bool, spec: dict[str, Any]) -> dict[str, Any]:
    """``run_day`` between the pull of the data root and its last publish. Either can fail on the
    store (unreachable as the run starts; silent once the last step is done, when the day's record
    already says completed): the day's record then says which, so the run's closing paragraph
    names the day and the step, and says whether a promotion stands."""
    started = False
    try:
        with storage.synced(cfg):
            started = True
            return run_day(cfg, day, force_train, spec)
    except StorageError as err:
        _record_store_failure(cfg, day, err, "publish" if started else "pull")
        raise


def _record_store_failure(cfg: Config, day: dt.date, err: StorageError, step: str) -> None:
    """Mark the day's record failed at ``step`` (the pull or the last publish), unless a step of
    ``run_day`` already recorded its own failure. After the last publish, the record keeps what
    the steps did (a promotion stands) and is offered to the store once more, within the
    after-failure bound; the next run sends it otherwise."""
    path = layout.metrics_dir(cfg, day) / SUMMARY_FILE
    ran = step == "publish" and path.exists()
    summary = json.loads(path.read_text()) if ran else {"date": day.isoformat(), **_where(cfg, day)}
    if summary.get("status") == "failed":
        return
    err.failed_step = step  # type: ignore[attr-defined]
    summary.update(status="failed", failed_step=step, expected=True)
    summary.update(error=str(err), error_type=type(err).__name__)
    atomic_write_json(path, summary)
    if ran:
        storage.publish_after_failure(cfg)
