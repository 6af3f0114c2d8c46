"""``orchestration.train_on: gpu-pool`` through a real Prefect worker of the pool.

On the session's Prefect server (``prefect_harness``, 127.0.0.1), the test creates the process work
pool ``gpu-pool``, registers ``train-ghcl`` from its entry in ``prefect.yaml`` (entrypoint, pool,
queue, tags, job env; the only change: the code is this checkout, not the image's ``/opt/hap``),
starts ``prefect worker start --pool gpu-pool --type process`` in a subprocess and runs the daily
flow, whose train step dispatches the deployment to that worker and waits for it.

- The success path: the run is the deployment's, on the pool, executed by that worker, Completed;
  the daily flow evaluates, registers and gates the worker's bundle; that bundle is byte-identical
  to an in-process ``hap train`` of the same day and config (one thread: training is deterministic).
- The fault: the worker's machine is lost mid-training (the worker and its flow-run process are
  killed). Prefect leaves such a run Running for ever; the daily flow's train step now fails within
  ``orchestration.train_heartbeat_timeout_seconds`` of its last sign of life, with one line naming
  the step, the pool and the deployment; the champion stays; a re-run with a fresh worker trains.

The tiny machine's CPU stands in for the GPU: the runs override ``train.device: cpu`` (the
deployment's job env sets ``HAP__TRAIN__DEVICE: cuda``, which the run's overrides win over).
Run alone: ``.venv/bin/python -m pytest tests/system/test_training_pool.py -s`` (infra/README.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from hap.core import layout
from tests import cluster
from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES, tiny_config, tiny_env, tiny_sets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
POOL = "gpu-pool"
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)

# Prefect's shortest flow-run heartbeat period is 30 s: a live run is never silent longer than that
# (plus the event's way to the server), so 45 s of silence means its process is gone.
HEARTBEAT_SECONDS = 30
HEARTBEAT_TIMEOUT = 45
OVERRIDES: dict[str, Any] = {
    **TINY_OVERRIDES,
    "simulate.days": 2,
    **TINY_FLOW_RUN,
    "split.window_days": 1,  # each day trains on itself: D1 makes the champion, D2 a challenger
    "orchestration.train_on": POOL,
    "orchestration.train_heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT,
    "orchestration.dvc_push": False,  # not under test here
    "train.num_threads": 1,  # deterministic on CPU: the worker's bundle equals an in-process one
    "train.device": "cpu",
}
# what the train-ghcl deployment adds to prefect.yaml's job env on this machine
JOB_ENV = {
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}
WORKER_BOOT_S = 90.0


# ---- Prefect helpers ---------------------------------------------------------------------------
def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _train_runs(deployment_id: Any, date: dt.date) -> list:
    """The train-ghcl flow runs for ``date``, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with _client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
        )
    return sorted((r for r in runs if r.parameters.get("date") == date.isoformat()), key=lambda r: r.created)


def _worker_events(flow_run_id: Any) -> list:
    """The pool workers' events about one flow run (submitted, executed)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    with _client() as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(prefix=["prefect.worker."]),
                related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            ),
            limit=20,
        )
    return page.events


def _deploy_train_ghcl() -> Any:
    """``train-ghcl`` as prefect.yaml declares it, its code taken from this checkout."""
    from prefect import Flow

    spec = next(
        d
        for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        if d["name"] == "train-ghcl"
    )
    pool = spec["work_pool"]
    flow = Flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
    return flow.deploy(
        name=spec["name"],
        work_pool_name=pool["name"],
        work_queue_name=pool["work_queue_name"],
        job_variables={"env": {**pool["job_variables"]["env"], **JOB_ENV}},
        tags=spec["tags"],
        description=spec["description"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


# ---- the worker --------------------------------------------------------------------------------
@contextlib.contextmanager
def pool_worker(world: dict[str, Any], name: str) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool gpu-pool --type process`` against the test's server, with this
    checkout on its import path; yields once the server has its heartbeat. Never skips: a worker
    that cannot start fails the test with its log."""
    log = world["root"] / f"worker-{name}.log"
    env = {
        **tiny_env(world["home"]),
        "PREFECT_API_URL": world["api_url"],
        "PREFECT_HOME": str(world["root"] / "prefect-worker-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # picks a new run up within a second (default 10)
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        **JOB_ENV,
    }
    with cluster.pool_worker(POOL, name, env, log, REPO) as proc:
        proc.log = log  # type: ignore[attr-defined]
        yield proc


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> dict[str, Any]:
    """Two landed days, the work pool and the train-ghcl deployment on the session's server."""
    import prefect.settings
    from prefect.client.schemas.actions import WorkPoolCreate

    from hap.sources.simulator import simulate_days

    api_url = prefect.settings.PREFECT_API_URL.value()
    assert api_url and api_url.startswith("http://127.0.0.1:"), api_url
    root = tmp_path_factory.mktemp("pool")
    home = root / "data"
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in OVERRIDES.items()})
    list(simulate_days(cfg, D1, 2, progress=False))
    with _client() as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    return {
        "root": root,
        "home": home,
        "cfg": cfg,
        "api_url": api_url,
        "deployment_id": _deploy_train_ghcl(),
        "kw": {"overrides": OVERRIDES, "home": str(home)},
    }


@pytest.fixture(scope="module")
def first_day(world: dict[str, Any]) -> dict[str, Any]:
    """The daily flow for D1 with training on the pool: the first model, the champion."""
    from flows.daily import daily_retrain

    with pool_worker(world, "gpu-worker-1") as worker:
        started = time.monotonic()
        state = daily_retrain(date=D1.isoformat(), return_state=True, **world["kw"])
        seconds = time.monotonic() - started
        log = worker.log.read_text()  # type: ignore[attr-defined]
    return {"state": state, "seconds": seconds, "worker_log": log}


def _champion(cfg) -> str | None:
    from hap.registry.registration import CHAMPION, alias_version

    version = alias_version(cfg, CHAMPION)
    return None if version is None else str(version.version)


def _summary(cfg, day: dt.date) -> dict[str, Any]:
    return json.loads((layout.metrics_dir(cfg, day) / layout.DAILY_RUN_FILE).read_text())


# ---- the success path --------------------------------------------------------------------------
def test_training_runs_on_the_pool_worker_and_the_flow_goes_on(world, first_day):
    from flows.progress import describe
    from flows.report import render_day
    from hap.registry.registration import version_for_day

    cfg, state = world["cfg"], first_day["state"]
    assert state.is_completed(), f"{state.message}\nworker log:\n{first_day['worker_log'][-3000:]}"
    print(f"daily flow for {D1} with training on the pool: {first_day['seconds']:.1f} s")

    # the train step was a flow run of train-ghcl, on the pool, executed by our worker
    runs = _train_runs(world["deployment_id"], D1)
    assert len(runs) == 1, [(r.name, r.state_type) for r in runs]
    run = runs[0]
    assert run.state.is_completed() and run.work_pool_name == POOL, (run.state, run.work_pool_name)
    assert run.parameters["overrides"]["orchestration.train_on"] == POOL
    events = {e.event: e for e in _worker_events(run.id)}
    assert {"prefect.worker.submitted-flow-run", "prefect.worker.executed-flow-run"} <= set(events), events
    assert all(e.resource.name == "gpu-worker-1" for e in events.values()), events
    print(f"train-ghcl run {run.name}: {run.state.name} on {run.work_pool_name}, worker gpu-worker-1")

    # the flow read the worker's bundle back and went on: evaluate, register, gate
    day = _summary(cfg, D1)
    assert day["status"] == "completed" and day["retrain"] is True, day
    assert day["train"]["flow_run"] == run.name and day["train"]["work_pool"] == POOL
    # the step's line and the day's artifact describe the worker's training as they do a local one
    assert describe("train-on-gpu-pool", day["train"]) == "1 epochs on cpu"
    assert "1 epoch(s) on cpu x1 in " in render_day(day)
    bundle = layout.model_dir(cfg, D1)
    assert (bundle / layout.BUNDLE_META_FILE).exists()
    assert "gt_recall@50" in day["evaluate"], sorted(day["evaluate"])
    assert day["model_version"] and version_for_day(cfg, D1) is not None
    assert day["gate"]["promoted"] is True, day["gate"]  # the first model: nothing to beat
    assert _champion(cfg) == day["model_version"]


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# files whose bytes differ between two processes for the same model: the run's timings, and the
# TorchScript exports (torch.jit.save writes a random .data/serialization_id, and the order of a
# scripted module's constants follows Python's per-process string hashing)
PER_PROCESS_FILES = {layout.RUN_FILE, *(layout.tower_export_file(t) for t in ("light", "expressive"))}


def test_the_pool_model_equals_an_in_process_training(world, first_day):
    """Same day, same config (one thread), trained in this process: byte-identical weights,
    calibration, routing threshold, history and diagnostics, so the same gt_recall@50. (Not the
    same ``hap.bundle_hash``: it covers the TorchScript exports, whose bytes vary per process.)"""
    import torch

    from flows.common import run_config
    from hap.model.evaluate import evaluate_bundle
    from hap.model.serving import load_bundle
    from hap.model.train import train_day

    assert first_day["state"].is_completed()
    cfg = run_config(**world["kw"])
    bundle = layout.model_dir(cfg, D1)
    remote = _file_hashes(bundle)
    aside = bundle.with_name(bundle.name + ".pool")
    threads = torch.get_num_threads()
    bundle.rename(aside)
    try:
        started = time.monotonic()
        train_day(cfg, D1)
        seconds = time.monotonic() - started
        local = _file_hashes(bundle)
        metrics = evaluate_bundle(cfg, load_bundle(bundle), layout.eval_set(cfg, D1)).metrics
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(bundle, ignore_errors=True)
        aside.rename(bundle)
    assert set(local) == set(remote)
    differ = {name for name in local if local[name] != remote[name]}
    assert differ <= PER_PROCESS_FILES, differ
    for name in (*(layout.tower_weights_file(t) for t in ("light", "expressive")), layout.BUNDLE_META_FILE):
        assert local[name] == remote[name], name
    recall = _summary(cfg, D1)["evaluate"]["gt_recall@50"]
    assert metrics["gt_recall@50"] == recall, (metrics["gt_recall@50"], recall)
    print(
        f"in-process training {seconds:.1f} s: {len(local) - len(differ)}/{len(local)} bundle files "
        f"byte-identical (differ: {sorted(differ)}); gt_recall@50 {recall} on both"
    )


# ---- the fault: the worker's machine is lost mid-training --------------------------------------
def _kill_host(worker: subprocess.Popen, run: Any) -> list[int]:
    """SIGKILL the worker's process group and its flow-run process (its own session): what a lost
    machine does. The PIDs killed."""
    pids = [worker.pid]
    with contextlib.suppress(psutil.NoSuchProcess):
        pids += [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
    if run.infrastructure_pid:
        pids.append(int(str(run.infrastructure_pid).rsplit(":", 1)[-1]))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    pids = list(dict.fromkeys(pids))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.wait(timeout=10)
    return pids


def test_a_worker_lost_mid_training_fails_the_step_in_bounded_time(world, first_day):
    from flows.daily import daily_retrain
    from flows.progress import failure_paragraph
    from hap.registry.registration import version_for_day

    cfg = world["cfg"]
    champion = _champion(cfg)
    assert first_day["state"].is_completed() and champion is not None
    checkpoint = layout.checkpoint_dir(cfg, D2) / layout.CHECKPOINT_FILE
    # long enough to be killed mid-training: a checkpoint is written after every epoch
    sets = tiny_sets({**OVERRIDES, "train.epochs": 200})
    cmd = [sys.executable, "-m", "hap.cli", *sets, "run", "--date", D2.isoformat()]
    env = {**tiny_env(world["home"]), "PREFECT_API_URL": world["api_url"]}
    with pool_worker(world, "gpu-worker-lost") as worker:
        flow = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline = time.monotonic() + 240
            while not checkpoint.exists():  # the worker's run has finished its first epoch
                assert flow.poll() is None, flow.communicate()[0][-3000:]
                assert time.monotonic() < deadline, worker.log.read_text()[-3000:]  # type: ignore[attr-defined]
                time.sleep(0.5)
            (run,) = _train_runs(world["deployment_id"], D2)
            killed = _kill_host(worker, run)
            killed_at = time.monotonic()
            out, _ = flow.communicate(timeout=HEARTBEAT_TIMEOUT + 120)
            bound = time.monotonic() - killed_at
        finally:
            if flow.poll() is None:
                flow.kill()
                flow.wait()
    print(f"killed {killed}; `hap run` ended {bound:.1f} s later (exit {flow.returncode}):")
    print("\n".join(line for line in out.splitlines() if "failed at" in line or "error" in line.lower()))

    # the step failed, in bounded time, with one line naming the step, the pool and the deployment
    assert flow.returncode != 0, out[-3000:]
    assert bound < HEARTBEAT_TIMEOUT + 30, (bound, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    assert f"{D2} failed at train-on-gpu-pool (HapError)" in out, out[-3000:]
    day = _summary(cfg, D2)
    assert day["status"] == "failed" and day["failed_step"] == "train-on-gpu-pool" and day["expected"], day
    error = day["error"]
    for words in (
        f"work pool '{POOL}'",
        "deployment train-ghcl/train-ghcl",
        f"run '{run.name}'",
        "no heartbeat",
    ):
        assert words in error, error
    assert "Traceback" not in failure_paragraph(day)
    # the lost run is left Crashed, not Running for ever; nothing was registered; the champion stayed
    (lost,) = _train_runs(world["deployment_id"], D2)
    assert lost.state.is_crashed() and "no heartbeat" in lost.state.message, lost.state
    assert version_for_day(cfg, D2) is None and _champion(cfg) == champion
    print(f"train-ghcl run {lost.name}: {lost.state.name}: {lost.state.message}")

    # a re-run with a fresh worker trains on the pool and completes
    with pool_worker(world, "gpu-worker-2"):
        state = daily_retrain(date=D2.isoformat(), return_state=True, **world["kw"])
    assert state.is_completed(), state.message
    runs = _train_runs(world["deployment_id"], D2)
    assert [r.state.name for r in runs] == ["Crashed", "Completed"], [(r.name, r.state.name) for r in runs]
    day = _summary(cfg, D2)
    assert day["status"] == "completed" and day["train"]["flow_run"] == runs[-1].name, day
    assert version_for_day(cfg, D2) is not None and "promoted" in day["gate"], day["gate"]
