"""The data path at every scale: the same bytes and verdicts with one worker or several, and a real
Dask cluster (a scheduler and a separate worker process on 127.0.0.1) running a day's validate,
ingest and split through the daily flow's ``data-path`` subflow and its ``DaskTaskRunner``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hap.core import engine, layout
from hap.core.config import Config
from hap.core.errors import ValidationFailed
from hap.data import lake
from hap.data.buckets import load_cut
from hap.data.ingest import ingest_day
from hap.data.split import build_training_set
from hap.data.validate import validate_day
from hap.data.versioning import data_version
from hap.sources.simulator import simulate_days
from tests.conftest import tiny_config
from tests.data.test_validate import requests_duplicated_under_new_ids

DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)]
BAD_DAY = dt.date(2026, 11, 4)  # the same content logged twice under new request ids
# ~240 requests a day in buckets of 60: four buckets, each log read in several slices
SCALE = {
    "engine.bucket_requests": 60,
    "engine.slice_rows": 2000,
    "validation.data_docs": False,
    "split.window_days": 3,
}


def _cfg(home: Path, **overrides: Any) -> Config:
    return tiny_config(home, **{k.replace(".", "__"): v for k, v in {**SCALE, **overrides}.items()})


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four simulated landing days; the last one carries duplicated content across requests."""
    home = tmp_path_factory.mktemp("landed") / "data"
    cfg = _cfg(home)
    list(simulate_days(cfg, DAYS[0], len(DAYS) + 1))
    requests_duplicated_under_new_ids(layout.landing_day(cfg, BAD_DAY))
    return home


def _copy(landed: Path, home: Path) -> Path:
    shutil.copytree(landed, home)
    return home


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


def _lake_hashes(cfg: Config) -> dict[str, str]:
    """The committed lake files' bytes by (table, day, bucket): file names carry a writer's uuid."""
    out = {}
    for table in layout.LAKE_TABLES:
        for day in [*DAYS, BAD_DAY]:
            for part in lake.day_parts(cfg, table, day):
                out[f"{table}/{day}/{part.bucket}"] = hashlib.sha256(Path(part.uri).read_bytes()).hexdigest()
    return out


def _verdict(cfg: Config, day: dt.date) -> dict[str, Any]:
    summary = json.loads((layout.validation_day(cfg, day) / layout.VALIDATION_SUMMARY_FILE).read_text())
    text = json.dumps({k: v for k, v in summary.items() if k not in ("seconds", "docs")}, sort_keys=True)
    return json.loads(text.replace(str(cfg.home), "<home>"))


def _run_days(cfg: Config, mapper: engine.Mapper) -> dict[str, Any]:
    """Validate and ingest every day, rejecting the bad one, then split the window."""
    for day in DAYS:
        validate_day(cfg, day, mapper)
        ingest_day(cfg, day, mapper=mapper)
    with pytest.raises(ValidationFailed) as failed:
        validate_day(cfg, BAD_DAY, mapper)
    build_training_set(cfg, DAYS[-1], mapper=mapper)
    return {
        "lake": _lake_hashes(cfg),
        "training": _tree_hashes(layout.training_set(cfg, DAYS[-1]).parent),
        "data_version": data_version(cfg, DAYS[-1]),
        "verdicts": {d.isoformat(): _verdict(cfg, d) for d in [*DAYS, BAD_DAY]},
        "failure": str(failed.value).replace(str(cfg.home), "<home>"),
    }


@pytest.mark.slow
def test_one_worker_and_two_give_the_same_lake_training_set_and_verdicts(
    landed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    local_cfg = _cfg(_copy(landed, tmp_path / "one"))
    local = _run_days(local_cfg, engine.local_map)
    cluster_cfg = _cfg(_copy(landed, tmp_path / "two"), **{"engine.workers": 2})
    nanny_settings = ("OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    for name in nanny_settings:
        monkeypatch.delenv(name, raising=False)
    with engine.session(cluster_cfg) as mapper:
        assert mapper is not engine.local_map  # a real local cluster of two worker processes
        spread = _run_days(cluster_cfg, mapper)
    # the nannies' settings for their workers (OPENBLAS_NUM_THREADS=1, ...) do not stay in this process
    assert not [name for name in nanny_settings if name in os.environ]

    assert len(local["lake"]) == 2 * 4 * len(DAYS)  # samples + fullflow, one file per bucket and day
    assert local["lake"] == spread["lake"]
    assert local["training"] == spread["training"]
    assert local["data_version"] == spread["data_version"]
    assert local["verdicts"] == spread["verdicts"]
    assert local["failure"] == spread["failure"]
    # the duplicated content spans buckets, and is caught in the key partitions all the same
    assert "(column=content_key" in local["failure"] and "10 bad row(s)" in local["failure"]
    assert local["verdicts"][BAD_DAY.isoformat()]["status"] == "failed"
    # ingest consumed the buckets of the days it published; the rejected day's are gone with it
    assert all(load_cut(local_cfg, d) is None for d in [*DAYS, BAD_DAY])


# ---- a real cluster -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """``dask scheduler`` and ``dask worker`` (two worker processes) as separate processes on
    127.0.0.1; the workers report their task runs to the tests' Prefect server."""
    import os

    from prefect.settings import PREFECT_API_URL

    dask = Path(sys.executable).with_name("dask")
    address = f"tcp://127.0.0.1:{_free_port()}"
    logs = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(Path.cwd())}
    common = ["--no-dashboard"]
    procs = [
        subprocess.Popen(
            [str(dask), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], *common],
            stdout=open(logs / "scheduler.log", "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
    ]
    procs.append(
        subprocess.Popen(
            [str(dask), "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1"]
            + ["--preload", "hap.data.gx_runner", *common],
            stdout=open(logs / "worker.log", "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
    )
    try:
        from distributed import Client

        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout=10) as client:
                    client.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError) as err:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    pytest.fail(f"the Dask cluster did not start on 127.0.0.1: {err}")
                time.sleep(1)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _scheduler_task_counts(address: str) -> dict[str, int]:
    """Tasks the scheduler has seen, per key prefix (prefect-dask names keys after the task)."""
    import cloudpickle
    from distributed import Client

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scheduler cannot import tests
    with Client(address, timeout=10) as client:
        return client.run_on_scheduler(_task_counts)


def _gx_warming() -> bool:
    import sys
    import threading

    return "great_expectations" in sys.modules or any(t.name == "gx-import" for t in threading.enumerate())


def test_local_workers_start_importing_gx_as_they_come_up(tmp_path: Path):
    """``engine.worker_preload``: a fresh worker that has run no task is already importing GX."""
    from distributed import Client, LocalCluster

    cfg = _cfg(tmp_path / "data", **{"engine.workers": 1})
    assert cfg.engine.worker_preload == ["hap.data.gx_runner"]
    with LocalCluster(**engine.local_cluster_kwargs(cfg)) as cluster, Client(cluster) as client:
        assert all(client.run(_gx_warming).values())
    without = _cfg(tmp_path / "data", **{"engine.workers": 1, "engine.worker_preload": []})
    with LocalCluster(**engine.local_cluster_kwargs(without)) as cluster, Client(cluster) as client:
        assert not any(client.run(_gx_warming).values()), "nothing else imports GX in a fresh worker"


def _task_counts(dask_scheduler) -> dict[str, int]:
    return {p: sum(tp.state_counts.values()) for p, tp in dask_scheduler.task_prefixes.items()}


@pytest.mark.slow
@pytest.mark.integration
def test_a_day_runs_through_the_daily_flow_on_a_dask_cluster(landed: Path, tmp_path: Path, dask_cluster: str):
    from flows.common import run_spec
    from flows.daily import _data_steps

    home = _copy(landed, tmp_path / "cluster")
    overrides = {**SCALE, "engine.address": dask_cluster}
    cfg = _cfg(home, **{"engine.address": dask_cluster})
    spec = run_spec({**_tiny_overrides(), **overrides}, str(home))
    before = sum(_scheduler_task_counts(dask_cluster).values())
    for day in DAYS:
        out = _data_steps(cfg, day, spec, ("validate", "ingest"))
        assert out["ingest"]["requests"] > 0
    out = _data_steps(cfg, DAYS[-1], spec, ("split",))
    ran = sum(_scheduler_task_counts(dask_cluster).values()) - before
    # every bucket task (cut slices, bucket checks, key partitions, joins, split units) ran on the cluster
    assert ran >= len(DAYS) * (4 + 4 + 2 * 4 + 4)

    reference = _cfg(_copy(landed, tmp_path / "reference"))
    for day in DAYS:
        validate_day(reference, day)
        ingest_day(reference, day)
    build_training_set(reference, DAYS[-1])
    assert _lake_hashes(cfg) == _lake_hashes(reference)
    assert data_version(cfg, DAYS[-1]) == data_version(reference, DAYS[-1]) == out["split"]["data_version"]


def _tiny_overrides() -> dict[str, Any]:
    from tests.conftest import TINY_OVERRIDES

    return dict(TINY_OVERRIDES)
