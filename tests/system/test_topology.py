"""The production topology on one machine: every role a process of its own, sharing only 127.0.0.1.

Servers: an S3 server (moto) with three buckets (the data root, the DVC remote, MLflow's
artifacts), PostgreSQL, an MLflow server on it (artifacts in the bucket) and a Prefect server on it.
Roles, each in a mount namespace of its own with an empty tmpfs over this test's folders
(``tests.cluster.on_another_host``), so nothing passes between them but the network:

- a Dask scheduler and two Dask workers (one namespace each);
- a ``cpu-pool`` process worker, which runs the ``daily-retrain`` deployment (the flow runner,
  ``HAP_DASK_ADDRESS`` set: its data path runs on the Dask workers);
- a ``gpu-pool`` process worker, which runs ``train-ghcl`` (``orchestration.train_on: gpu-pool``;
  the machine's CPU stands in for the GPU).

Each is configured by environment only (``HAP_HOME=s3://...``, its own ``HAP_WORKDIR``,
``HAP_DVC_REMOTE``, ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``, ``AWS_*``). The test lands three
simulated days in the bucket, runs the deployed ``daily-retrain`` for each day through the server,
and compares with a single-machine ``hap backfill`` of the same params (one training thread on
both sides): the lake's files, every training set's ``data_version``, the served gt_recall@50 and
the gate's verdicts are identical, the registry on the MLflow server holds the same verdicts, and
the DVC remote holds every trained day's training set.

Run alone: ``.venv/bin/python -m pytest tests/system/test_topology.py -s`` (docs/production.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hap.core import layout, storage
from hap.core.config import Config, load_config
from tests import cluster
from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES
from tests.servers import PG_USER, REPO, Servers, real_servers

pytestmark = [pytest.mark.slow, pytest.mark.integration]

VENV_BIN = Path(sys.executable).parent
DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)]
PARAMS: dict[str, Any] = {
    **TINY_OVERRIDES,
    **TINY_FLOW_RUN,
    "simulate.days": len(DAYS),
    "split.window_days": 1,  # every day trains: D1 makes the champion, D2 and D3 challenge it
    "engine.bucket_requests": 120,  # two buckets a day: the Dask workers share them
    "train.num_threads": 1,  # the same thread count on both sides: identical models
    "train.device": "cpu",  # train-ghcl's job env asks for cuda; this machine's CPU stands in
}
TOPOLOGY = {"orchestration.train_on": "gpu-pool"}
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}
BOOT_S = 90.0
RUN_TIMEOUT_S = 420.0


# ---- the roles ---------------------------------------------------------------------------------------------
def _base_env() -> dict[str, str]:
    """What every role inherits: the machine's variables (``AWS_*`` of the S3 server included), none
    of the test's own Prefect, MLflow or hap settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HAP_", "HAP__"))}
    return env | QUIET | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _role_env(servers: Servers, world: dict[str, Any], private: Path, **extra: str) -> dict[str, str]:
    """A flow role's environment: the servers, the data root and the DVC remote in buckets, and a
    working copy and Prefect home on its own disk (``private``, a tmpfs only it sees)."""
    return _base_env() | {
        "PREFECT_API_URL": servers.prefect_api_url,
        "MLFLOW_TRACKING_URI": servers.mlflow_url,
        "PREFECT_HOME": str(private / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "HAP_HOME": world["root_url"],
        "HAP_WORKDIR": str(private / "work"),
        "HAP_DVC_REMOTE": world["dvc_url"],
        **extra,
    }


def _deploy(name: str) -> Any:
    """The deployment ``name`` as prefect.yaml declares it, its code taken from this checkout (the
    image's ``/opt/hap``) and its pool created as a process pool."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    spec = next(
        d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == name
    )
    pool = spec["work_pool"]
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool["name"], type="process"), overwrite=True)
    return Flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"]).deploy(
        name=spec["name"],
        work_pool_name=pool["name"],
        work_queue_name=pool["work_queue_name"],
        job_variables=pool.get("job_variables", {}),
        tags=spec["tags"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


# ---- the world --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The servers, the landed days, the roles; then the deployed daily flow for each day."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from hap.sources.simulator import simulate_days

    tmp = tmp_path_factory.mktemp("topology")
    logs = tmp / "logs"
    logs.mkdir()
    private = tmp / "hosts"  # every role mounts an empty tmpfs here: its own disk
    world: dict[str, Any] = {
        "root_url": f"{s3.create_bucket('topo-root')}/prod",
        "dvc_url": f"{s3.create_bucket('topo-dvc')}/store",
        "tmp": tmp,
        "s3": s3,
    }
    artifacts = f"{s3.create_bucket('topo-mlflow')}/artifacts"
    world["single_machine"] = _start_single_machine(tmp)

    def own_host(command: list[str]) -> list[str]:
        return cluster.on_another_host(command, [private])

    def dask_worker(args: list[str]) -> list[str]:
        return own_host([str(cluster.DASK), "worker", *args])

    def pool(name: str, env: dict[str, str]) -> contextlib.AbstractContextManager[subprocess.Popen]:
        return cluster.pool_worker(name, name, env, logs / f"{name}.log", REPO, own_host)

    with contextlib.ExitStack() as stack:
        stack.callback(_stop_if_running, world["single_machine"][1])
        producer = _reader(world, tmp / "producer")
        list(simulate_days(producer, DAYS[0], len(DAYS), progress=False))
        storage.publish_root(producer)  # the landing days are in the bucket, and only there

        servers = world["servers"] = stack.enter_context(real_servers(artifacts))
        stack.enter_context(temporary_settings({PREFECT_API_URL: servers.prefect_api_url}))
        dask_env = _base_env() | {
            "PREFECT_API_URL": servers.prefect_api_url,
            "PREFECT_HOME": str(private / "prefect-home"),
        }
        roles = {"separate": True, "scheduler": own_host}
        address = stack.enter_context(cluster.dask_cluster(dask_worker, 2, logs, dask_env, **roles))
        world["deployments"] = {name: _deploy(name) for name in ("daily-retrain", "train-ghcl")}
        stack.enter_context(pool("gpu-pool", _role_env(servers, world, private)))
        stack.enter_context(pool("cpu-pool", _role_env(servers, world, private, HAP_DASK_ADDRESS=address)))
        started = time.monotonic()
        world["runs"] = [
            run_deployment(
                "daily-retrain/daily-retrain",
                parameters={"date": day.isoformat(), "overrides": {**PARAMS, **TOPOLOGY}},
                timeout=RUN_TIMEOUT_S,
            )
            for day in DAYS
        ]
        world["seconds"] = time.monotonic() - started
        yield world


def _stop_if_running(proc: subprocess.Popen) -> None:
    """The single-machine run, when the topology failed before the comparison waited for it."""
    if proc.poll() is None:
        proc.kill()


def _reader(world: dict[str, Any], workdir: Path, **params: Any) -> Config:
    """A config on the data root in the bucket, with a working copy of its own at ``workdir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAP_", "HAP__"))}
    env |= {"HAP_HOME": world["root_url"], "HAP_WORKDIR": str(workdir), "HAP_DVC_REMOTE": world["dvc_url"]}
    return load_config(overrides={**PARAMS, **params}, environ=env)


def _logs(world: dict[str, Any]) -> str:
    return "\n".join(
        f"--- {f.name}\n{f.read_text()[-2500:]}" for f in sorted((world["tmp"] / "logs").glob("*.log"))
    )


@pytest.fixture(scope="module")
def deployed(world: dict[str, Any]) -> Config:
    """The topology's results, pulled into a working copy of the test's own."""
    states = [r.state for r in world["runs"]]
    assert all(s is not None and s.is_completed() for s in states), (
        [(s.name, s.message) for s in states if s is not None],
        _logs(world),
    )
    print(f"3 daily runs through the topology: {world['seconds']:.0f} s")
    cfg = _reader(world, world["tmp"] / "reader", **TOPOLOGY)
    storage.pull_root(cfg)
    return cfg


def _start_single_machine(tmp: Path) -> tuple[Config, subprocess.Popen]:
    """``hap backfill`` of the same params on one machine: a local data root, the embedded servers,
    training in-process, no Dask. Started beside the topology's runs, which mostly wait."""
    from hap.sources.simulator import simulate_days

    home = tmp / "single-machine"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "HAP_", "HAP__"))
    }
    env |= {"HAP_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cfg = load_config(overrides=PARAMS, environ=env)
    list(simulate_days(cfg, DAYS[0], len(DAYS), progress=False))
    sets = [a for k, v in PARAMS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    days = ["--start", DAYS[0].isoformat(), "--end", DAYS[-1].isoformat()]
    command = [sys.executable, "-m", "hap.cli", *sets, "backfill", *days]
    out = open(tmp / "logs" / "single-machine.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return cfg, proc


@pytest.fixture(scope="module")
def single_machine(world: dict[str, Any]) -> Config:
    cfg, proc = world["single_machine"]
    proc.wait(timeout=900)
    assert proc.returncode == 0, (world["tmp"] / "logs" / "single-machine.log").read_text()[-4000:]
    return cfg


# ---- what the topology did ---------------------------------------------------------------------------------
def _summary(cfg: Config, day: dt.date) -> dict[str, Any]:
    return json.loads((layout.metrics_dir(cfg, day) / layout.DAILY_RUN_FILE).read_text())


def _lake_files(cfg: Config) -> dict[str, str]:
    """The committed lake files' bytes by (table, day, bucket), read wherever the lake is."""
    from hap.data import lake

    out = {}
    for table in layout.LAKE_TABLES:
        for day in DAYS:
            for part in lake.day_parts(cfg, table, day):
                fs, path = lake.filesystem(cfg, part.uri)
                with fs.open_input_file(path) as f:
                    out[f"{table}/{day}/{part.bucket}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_every_role_did_its_part(world, deployed):
    """The daily runs ran on the cpu-pool worker, their training on the gpu-pool worker, their data
    path on the Dask workers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        for name, deployment_id in world["deployments"].items():
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
            )
            assert len(runs) == len(DAYS), (name, [(r.name, r.state_type) for r in runs])
            assert all(r.state.is_completed() for r in runs), [(r.name, r.state.message) for r in runs]
            assert {r.work_pool_name for r in runs} == {"cpu-pool" if name == "daily-retrain" else "gpu-pool"}
    for day in DAYS:
        summary = _summary(deployed, day)
        assert summary["status"] == "completed" and summary["train"]["work_pool"] == "gpu-pool", summary
    # nothing of the flow runner's working copy reached the test's disk: the roles' tmpfs hid it
    assert not any((world["tmp"] / "hosts").iterdir())


def test_the_topology_gives_what_one_machine_gives(deployed, single_machine):
    """Same lake bytes, same training sets, same models' served quality, same gate verdicts."""
    from hap.data.versioning import data_version

    assert _lake_files(deployed) == _lake_files(single_machine)
    assert len(_lake_files(deployed)) == 2 * 2 * len(DAYS)  # samples + fullflow, two buckets a day
    for day in DAYS:
        here, there = _summary(deployed, day), _summary(single_machine, day)
        assert data_version(deployed, day) == data_version(single_machine, day)
        assert here["evaluate"]["gt_recall@50"] == there["evaluate"]["gt_recall@50"], day
        assert here["gate"]["promoted"] == there["gate"]["promoted"], (day, here["gate"], there["gate"])


def test_the_registry_on_the_server_holds_the_same_verdicts(world, deployed, single_machine):
    from mlflow import MlflowClient

    from hap.registry.registration import CHAMPION, alias_version, version_for_day

    servers = world["servers"]
    client = MlflowClient(tracking_uri=servers.mlflow_url, registry_uri=servers.mlflow_url)
    name = deployed.gate.model_name
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == len(DAYS), [v.version for v in versions]
    champion = client.get_model_version_by_alias(name, CHAMPION)
    local = alias_version(single_machine, CHAMPION)
    assert local is not None
    champion_day = next(
        d for d in DAYS if str(_summary(deployed, d)["model_version"]) == str(champion.version)
    )
    assert version_for_day(single_machine, champion_day) is not None
    assert str(version_for_day(single_machine, champion_day).version) == str(local.version)


def test_the_dvc_remote_holds_every_trained_days_training_set(world, deployed):
    from hap.data.versioning import data_version

    client = world["s3"].client()
    for day in DAYS:
        version = data_version(deployed, day)
        record = json.loads(
            client.get_object(Bucket="topo-dvc", Key=f"store/hap-index/{version}.json")["Body"].read()
        )
        md5 = record["training"]["md5"]
        key = f"store/files/md5/{md5[:2]}/{md5[2:]}"
        assert client.list_objects_v2(Bucket="topo-dvc", Prefix=key).get("KeyCount", 0) == 1, (day, key)


def test_the_servers_keep_their_state_in_postgres(world, deployed):
    """Both servers' tables live in the PostgreSQL the test started, and no role fell back to the
    embedded SQLite store (it would have landed in the data root's bucket)."""
    import psycopg2

    servers = world["servers"]
    tables = {}
    for db in ("mlflow", "prefect"):
        conn = psycopg2.connect(host="127.0.0.1", port=servers.pg_port, user=PG_USER, dbname=db)
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema='public'")
            tables[db] = {row[0] for row in cur.fetchall()}
        conn.close()
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables["mlflow"]
    assert {"flow", "flow_run", "task_run", "deployment"} <= tables["prefect"]
    assert not deployed.path("mlflow_db").exists() and not deployed.path("mlflow_artifacts").exists()


def test_the_champion_is_served_back_from_the_artifact_bucket(world, deployed, tmp_path, monkeypatch):
    """A client configured as a user configures one (the tracking URI in its environment) downloads
    the champion's files through the MLflow server, which keeps them in its bucket."""
    import mlflow.artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["servers"].mlflow_url)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{deployed.gate.model_name}@champion", dst_path=str(tmp_path)
        )
    )
    assert (local / "MLmodel").is_file()
    assert any(p.stat().st_size > 0 for p in local.rglob("*") if p.is_file() and p.name != "MLmodel")
    pages = world["s3"].client().get_paginator("list_objects_v2").paginate(Bucket="topo-mlflow")
    assert any(o["Key"].endswith("/MLmodel") for page in pages for o in page.get("Contents", []))
