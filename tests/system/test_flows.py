"""Flow tests: the daily retraining under Prefect's test harness, on tiny simulated days.

Real components throughout (Prefect's temporary server, MLflow on SQLite, the real steps); the
only fault is a real ``OSError`` raised by the fault-injection hook on a task's first attempt.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hap.core import layout
from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES, tiny_config

pytestmark = pytest.mark.slow

D1, D2, D3 = (dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(3))

FLOW_OVERRIDES: dict[str, Any] = {
    **TINY_OVERRIDES,
    "simulate.days": 3,
    **TINY_FLOW_RUN,
}


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> dict[str, Any]:
    """Three simulated (landed, not ingested) days under a fresh data root."""
    from hap.sources.simulator import simulate_days

    home = tmp_path_factory.mktemp("flows") / "data"
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in FLOW_OVERRIDES.items()})
    list(simulate_days(cfg, D1, 3, progress=False))
    return {"home": str(home), "cfg": cfg, "kw": {"overrides": FLOW_OVERRIDES, "home": str(home)}}


@pytest.fixture(scope="module")
def backfilled(world: dict[str, Any]) -> dict[str, Any]:
    """The success path: backfill D1..D2 with a transient fault in ingest and in register."""
    from flows.backfill import backfill

    mp = pytest.MonkeyPatch()
    mp.setenv("HAP_INJECT_FAULTS", "ingest:1,register:1")
    try:
        state = backfill(start=D1.isoformat(), end=D2.isoformat(), return_state=True, **world["kw"])
    finally:
        mp.undo()
    return {"state": state}


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _champion(cfg) -> str | None:
    from hap.registry.registration import CHAMPION, alias_version

    version = alias_version(cfg, CHAMPION)
    return None if version is None else str(version.version)


# ---- acceptance ------------------------------------------------------------------------------
def test_success_path_promotes_a_model_and_creates_an_artifact(world, backfilled):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = world["cfg"]
    assert backfilled["state"].is_completed(), backfilled["state"].message
    first = json.loads((layout.metrics_dir(cfg, D1) / layout.DAILY_RUN_FILE).read_text())
    assert first["status"] == "completed" and first["retrain"] is False  # warm-up: window incomplete
    day = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert day["status"] == "completed" and day["retrain"] is True
    assert day["gate"]["promoted"] is True, day["gate"].get("reasons")
    assert _champion(cfg) == day["model_version"]
    assert (layout.model_dir(cfg, D2) / layout.BUNDLE_META_FILE).exists()
    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"daily-retrain-{D2}"]))
        )
    assert arts and arts[0].type == "markdown"
    text = arts[0].data
    assert f"version {day['model_version']}" in text and "promoted" in text and "recall@50" in text


def test_transient_faults_are_retried_and_the_run_succeeds(world, backfilled):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    assert backfilled["state"].is_completed()
    home = Path(world["home"])
    assert (home / ".faults" / "ingest").read_text() == "1"  # the first attempt did raise
    assert (home / ".faults" / "register").read_text() == "1"
    with _client() as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="register")))
    retried = [r for r in runs if r.run_count == 2 and r.state.is_completed()]
    assert retried, [(r.name, r.run_count, r.state.name) for r in runs]


def test_corrupt_day_fails_without_training_and_keeps_the_champion(world, backfilled):
    from flows.daily import daily_retrain
    from hap.registry.registration import version_for_day

    cfg = world["cfg"]
    champion_before = _champion(cfg)
    assert champion_before is not None
    path = layout.raw_log(cfg, D3, "exposure")
    table = pq.read_table(path)  # every exposure clicked: CTR 1.0, far outside validation's range
    table = table.set_column(
        table.schema.get_field_index("click"), "click", pa.array([1] * table.num_rows, type=pa.int8())
    )
    pq.write_table(table, path)

    state = daily_retrain(date=D3.isoformat(), return_state=True, **world["kw"])
    assert state.is_failed()
    assert "ValidationFailed" in state.message and "2026-11-03" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    names = {r.name.rsplit("-", 1)[0]: r for r in runs}
    assert names["validate"].run_count == 1  # a HapError is never retried
    assert not {"split", "train", "register", "gate"} & set(names)
    assert not layout.model_dir(cfg, D3).exists()
    assert version_for_day(cfg, D3) is None
    assert _champion(cfg) == champion_before
    summary = json.loads((layout.metrics_dir(cfg, D3) / layout.DAILY_RUN_FILE).read_text())
    assert summary["status"] == "failed" and layout.quarantine_day(cfg, D3).exists()


def test_two_runs_for_one_date_do_not_interleave(world, backfilled):
    from flows.daily import daily_retrain

    states: list = []

    def go() -> None:
        states.append(daily_retrain(date=D1.isoformat(), return_state=True, **world["kw"]))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(states) == 2 and all(s.is_completed() for s in states), [s.message for s in states]
    spans = []
    for s in states:
        runs = _task_runs(s.state_details.flow_run_id)
        assert len(runs) >= 3
        spans.append((min(r.start_time for r in runs), max(r.end_time for r in runs)))
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, f"task runs of the two runs interleave: {spans}"


def test_second_run_refuses_when_the_date_stays_locked(world, backfilled):
    from flows.daily import daily_retrain
    from flows.locks import run_lock

    kw = {**world["kw"], "overrides": {**FLOW_OVERRIDES, "orchestration.date_lock_timeout_seconds": 1}}
    with run_lock(world["cfg"], D1, None):
        started = time.perf_counter()
        state = daily_retrain(date=D1.isoformat(), return_state=True, **kw)
    assert state.is_failed() and "refusing rather than interleaving" in state.message
    assert time.perf_counter() - started < 60


def _aliases(cfg) -> dict[str, str]:
    from hap.registry.registration import Registry

    reg = Registry(cfg)
    return reg.c.get_registered_model(reg.name).aliases


def test_rerun_of_a_day_makes_no_new_version_and_moves_no_alias(world, backfilled):
    from flows.daily import daily_retrain
    from hap.registry.registration import versions

    cfg = world["cfg"]
    before, aliases = [v.version for v in versions(cfg)], _aliases(cfg)
    state = daily_retrain(date=D2.isoformat(), force_train=True, return_state=True, **world["kw"])
    assert state.is_completed(), state.message
    day = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert day["retrain"] is False and day["retrain_reason"].startswith("unchanged"), day
    assert [v.version for v in versions(cfg)] == before and _aliases(cfg) == aliases
    # a changed config retrains and registers a new version as before
    kw = {**world["kw"], "overrides": {**FLOW_OVERRIDES, "train.lr": 0.02}}
    state = daily_retrain(date=D2.isoformat(), force_train=True, return_state=True, **kw)
    assert state.is_completed(), state.message
    assert len(versions(cfg)) == len(before) + 1


def test_dead_tracking_server_fails_fast_and_keeps_the_champion(world, backfilled, monkeypatch):
    import socket

    from flows.daily import daily_retrain

    cfg = world["cfg"]
    aliases = _aliases(cfg)
    with socket.socket() as s:  # a port nobody listens on: the server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    state = daily_retrain(date=D2.isoformat(), force_train=True, return_state=True, **world["kw"])
    took = time.perf_counter() - started
    assert state.is_failed() and f"127.0.0.1:{port} is unreachable" in state.message, state.message
    assert took < 120, took
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _aliases(cfg) == aliases


def test_an_undecided_gate_under_the_alert_policy_leaves_an_artifact(world):
    """``gate.on_undecided: alert``: the daily flow's alert for the on-call engineer (the Prefect
    event ``hap.gate.undecided`` and an artifact naming why the comparison could not decide)."""
    from prefect import flow
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.daily import raise_gate_alert

    gate = {
        "challenger_version": "7",
        "undecided": "undecided: rank50_recall@50 interval ±0.0091 is wider than ±0.0050 (0.5 x the "
        "margin 0.01); policy alert: champion kept, alert raised",
    }

    @flow(name="gate-alert-probe")
    def probe() -> None:
        raise_gate_alert(D3, gate)

    probe()
    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"gate-undecided-{D3}"]))
        )
    assert arts and gate["undecided"] in arts[0].data


def test_an_unreachable_dask_scheduler_fails_the_run_at_once_and_names_it(world, backfilled):
    """``HAP_DASK_ADDRESS`` pointing at a closed port: the run fails within the connect timeout
    (not retried as a transient fault), at its first data step, naming the scheduler; the day and
    the champion are untouched."""
    import socket
    import time

    from flows.daily import daily_retrain
    from flows.progress import failure_paragraph

    cfg = world["cfg"]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    champion_before = _champion(cfg)
    overrides = {**FLOW_OVERRIDES, "engine.address": address, "engine.connect_timeout_seconds": 5}
    started = time.monotonic()
    state = daily_retrain(date=D2.isoformat(), return_state=True, **{**world["kw"], "overrides": overrides})
    elapsed = time.monotonic() - started
    assert state.is_failed() and elapsed < 60, (state.message, elapsed)
    summary = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert summary["failed_step"] == "validate" and summary["expected"] is True, summary
    assert f"Dask scheduler at {address}" in summary["error"], summary["error"]
    paragraph = failure_paragraph(summary)
    assert f"{D2} failed at validate" in paragraph and address in paragraph and "Traceback" not in paragraph
    assert layout.raw_log(cfg, D2, "exposure").exists() and not layout.quarantine_day(cfg, D2).exists()
    assert _champion(cfg) == champion_before


def test_storage_lost_while_publishing_a_step_names_that_step(world, backfilled, monkeypatch):
    """The data root's bucket stops answering as a step's outputs are published: that step fails,
    by name, with the storage URL, and nothing is promoted."""
    from flows import daily
    from flows.progress import failure_paragraph
    from hap.core.storage import StorageError

    cfg = world["cfg"]
    champion_before = _champion(cfg)

    def lost(_cfg) -> None:
        raise StorageError("object storage s3://hap-root/prod is unreachable (connect timeout)")

    monkeypatch.setattr(daily.storage, "publish_root", lost)
    state = daily.daily_retrain(date=D2.isoformat(), return_state=True, **world["kw"])
    assert state.is_failed()
    summary = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert summary["failed_step"] == "validate" and summary["error_type"] == "StorageError", summary
    paragraph = failure_paragraph(summary)
    assert f"{D2} failed at validate (StorageError)" in paragraph and "s3://hap-root/prod" in paragraph
    assert _champion(cfg) == champion_before


def test_a_version_registered_by_a_run_that_failed_before_its_gate_is_gated_on_the_rerun(
    world, backfilled, monkeypatch
):
    """The gate fails on every attempt (the store lost as it moves the aliases): the version stays
    registered without a verdict. The re-run retrains nothing and registers nothing, and gates
    that version, where it used to stop at "unchanged" and leave it never judged."""
    from flows.daily import daily_retrain
    from hap.registry.registration import TAG_VERDICT, versions

    cfg = world["cfg"]
    kw = {**world["kw"], "overrides": {**FLOW_OVERRIDES, "train.lr": 0.03}}  # a new model for D2
    monkeypatch.setenv("HAP_INJECT_FAULTS", "gate:9")
    state = daily_retrain(date=D2.isoformat(), force_train=True, return_state=True, **kw)
    assert state.is_failed(), state.message
    failed = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert failed["failed_step"] == "gate", failed
    registered = versions(cfg)
    assert TAG_VERDICT not in registered[-1].tags

    monkeypatch.delenv("HAP_INJECT_FAULTS")
    state = daily_retrain(date=D2.isoformat(), force_train=True, return_state=True, **kw)
    assert state.is_completed(), state.message
    day = json.loads((layout.metrics_dir(cfg, D2) / layout.DAILY_RUN_FILE).read_text())
    assert day["retrain"] is False and day["model_version"] == registered[-1].version, day
    assert day["gate"], day
    after = versions(cfg)
    assert [v.version for v in after] == [v.version for v in registered]
    assert TAG_VERDICT in after[-1].tags
