"""The data path at every scale: the same bytes and verdicts with one worker or several, and a real
Dask cluster (a scheduler and a separate worker process on 127.0.0.1) running a day's validate,
ingest and split through the daily flow's ``data-path`` subflow and its ``DaskTaskRunner``."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
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
from tests import cluster
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
@pytest.fixture(scope="module")
def dask_cluster(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """``dask scheduler`` and ``dask worker`` (two worker processes) as separate processes on
    127.0.0.1; the workers report their task runs to the tests' Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(Path.cwd())}
    dask = str(Path(sys.executable).with_name("dask"))

    def worker(args: list[str]) -> list[str]:
        return [dask, "worker", *args, "--preload", "hap.data.gx_runner"]

    with cluster.dask_cluster(worker, 2, tmp_path_factory.mktemp("dask"), env) as address:
        yield address


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
    from flows.data_path import data_steps

    home = _copy(landed, tmp_path / "cluster")
    overrides = {**SCALE, "engine.address": dask_cluster}
    cfg = _cfg(home, **{"engine.address": dask_cluster})
    spec = run_spec({**_tiny_overrides(), **overrides}, str(home))
    before = sum(_scheduler_task_counts(dask_cluster).values())
    for day in DAYS:
        out = data_steps(cfg, day, spec, ("validate", "ingest"))
        assert out["ingest"]["requests"] > 0
    out = data_steps(cfg, DAYS[-1], spec, ("split",))
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


# ---- workers that cannot see the client's disk ---------------------------------------------------------
@contextlib.contextmanager
def _blind_cluster(tmp_path: Path, hidden: Path, **environ: str) -> Iterator[str]:
    """A scheduler and one worker on 127.0.0.1, the worker in a mount namespace of its own with an
    empty tmpfs over ``hidden`` (as root: ``unshare --mount``): another host's view of this test's
    files, which are not there. ``environ``: the worker's own variables (its storage endpoint)."""
    from distributed import Client

    hidden.mkdir(exist_ok=True)
    logs = tmp_path / f"logs-{len(list(tmp_path.glob('logs-*')))}"
    logs.mkdir()
    dask = Path(sys.executable).with_name("dask")

    def worker(args: list[str]) -> list[str]:
        return cluster.on_another_host([str(dask), "worker", *args], [hidden])

    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), **environ}
    with cluster.dask_cluster(worker, 1, logs, env) as address:
        with Client(address, timeout=10) as client:  # the worker really does not see the client's files
            (hidden / "probe").write_text("here")
            assert not any(client.run(os.path.exists, str(hidden / "probe")).values())
        yield address


@pytest.fixture
def blind_cluster(tmp_path: Path):
    """A cluster whose one worker cannot see ``tmp_path / "client"``; yields (address, that folder)."""
    hidden = tmp_path / "client"
    with _blind_cluster(tmp_path, hidden) as address:
        yield address, hidden


@pytest.mark.slow
def test_a_worker_that_cannot_see_the_landing_files_fails_the_step_and_quarantines_nothing(
    landed: Path, blind_cluster: tuple[str, Path]
):
    """The good day is not "corrupt": validate exits with the storage code (9), names the file and
    the host, prints no traceback, and the day stays in landing/, not quarantined; run here, the
    same day then validates."""
    address, hidden = blind_cluster
    home = _copy(landed, hidden / "data")
    cfg = _cfg(home)
    day = DAYS[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP_")}
    env |= {"HAP_HOME": str(home), "HAP_DASK_ADDRESS": address}
    started = time.monotonic()
    proc = _cli("validate", "--date", day.isoformat(), env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 9, out[-3000:]
    assert "Traceback" not in out and "not bad data" in out, out[-3000:]
    assert str(layout.raw_log(cfg, day, "exposure").parent) in out or "landing" in out, out[-3000:]
    assert time.monotonic() - started < 120
    assert layout.landing_day(cfg, day).exists() and not layout.quarantine_day(cfg, day).exists()
    assert validate_day(cfg, day).success  # in this process, which sees the files: the day is good


def _hap(*args: str) -> list[str]:
    """The ``hap`` command line of this module's configuration."""
    sets = [a for k, v in {**_tiny_overrides(), **SCALE}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return [sys.executable, "-m", "hap.cli", *sets, *args]


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_hap(*args), capture_output=True, text=True, env=env, timeout=timeout)


def _bucket_keys(s3, bucket: str, prefix: str) -> list[str]:
    """The objects under ``prefix``, without the empty folder markers pyarrow leaves."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]


def _part_hashes(cfg: Config, day: dt.date) -> dict[str, str]:
    """The day's committed lake files' bytes by (table, bucket), read wherever the lake is."""
    out = {}
    for table in layout.LAKE_TABLES:
        for part in lake.day_parts(cfg, table, day):
            fs, path = lake.filesystem(cfg, part.uri)
            with fs.open_input_file(path) as f:
                out[f"{table}/{part.bucket}"] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.slow
def test_an_object_store_root_runs_on_workers_that_cannot_see_the_client(landed: Path, s3, tmp_path: Path):
    """``HAP_HOME=s3://...`` with a cluster whose worker sees neither the client's working copy nor
    any file of it (another host): the worker reads the landing day from the bucket and the cut is
    shared through it, so validate and ingest give the lake an in-process run gives, and leave no
    scratch behind. A worker that cannot reach the storage fails the step as storage (exit 9, no
    traceback, in bounded time) and the day stays in landing/, quarantined nowhere."""
    from hap.core import storage
    from hap.core.config import load_config

    url = f"{s3.create_bucket('hap-blind')}/prod"
    hidden = tmp_path / "client"

    def environ(workdir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAP_")}
        return env | {"HAP_HOME": url, "HAP_WORKDIR": str(workdir)}

    overrides = {**_tiny_overrides(), **SCALE}
    producer = load_config(overrides=overrides, environ=environ(tmp_path / "producer"))
    shutil.copytree(landed / "landing", producer.home / "landing")
    storage.publish_root(producer)  # the landing days are in the bucket, and only there for the client
    client_env = environ(hidden / "work")
    day, other = DAYS[0], DAYS[1]
    with _blind_cluster(tmp_path, hidden) as address:
        env = client_env | {"HAP_DASK_ADDRESS": address}
        before = sum(_scheduler_task_counts(address).values())
        for step in ("validate", "ingest"):
            proc = _cli(step, "--date", day.isoformat(), env=env)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert sum(_scheduler_task_counts(address).values()) - before >= 4 + 4  # the cut and the checks
    client = load_config(overrides=overrides, environ=client_env)
    reference = _cfg(_copy(landed, tmp_path / "reference"))
    validate_day(reference, day)
    ingest_day(reference, day)
    assert _part_hashes(client, day) == _part_hashes(reference, day)
    assert len(_part_hashes(client, day)) == 2 * 4
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    assert not _bucket_keys(s3, bucket, f"{prefix}/{client.paths.shared_staging}/")  # ingest dropped the cut
    assert not (client.home / client.paths.shared_staging).exists()

    # the worker's storage endpoint does not answer: storage's failure, not the data's
    with _blind_cluster(
        tmp_path, hidden, AWS_ENDPOINT_URL=f"http://127.0.0.1:{cluster.free_port()}"
    ) as address:
        started = time.monotonic()
        proc = _cli("validate", "--date", other.isoformat(), env=client_env | {"HAP_DASK_ADDRESS": address})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 9, out[-3000:]
    assert "Traceback" not in out and "not bad data" in out and "landing/dt=" in out, out[-3000:]
    assert time.monotonic() - started < 60
    assert _bucket_keys(s3, bucket, f"{prefix}/landing/{layout.partition(other)}/")
    assert not _bucket_keys(s3, bucket, f"{prefix}/quarantine/")
    assert not layout.quarantine_day(client, other).exists()
    assert not _bucket_keys(s3, bucket, f"{prefix}/{client.paths.shared_staging}/")


@pytest.mark.slow
def test_a_dask_worker_killed_mid_step_is_replaced_and_the_lake_is_the_same(landed: Path, tmp_path: Path):
    """``kill -9`` of a worker process while validate's tasks run on it: its nanny starts another,
    the scheduler runs its tasks again, and validate and ingest complete with the lake an in-process
    run gives."""
    import signal

    from distributed import Client

    logs = tmp_path / "logs"
    logs.mkdir()
    dask = Path(sys.executable).with_name("dask")
    home = _copy(landed, tmp_path / "cluster")
    day = DAYS[0]

    def worker(args: list[str]) -> list[str]:
        return [str(dask), "worker", *args]

    with cluster.dask_cluster(worker, 2, logs, {**os.environ, "PYTHONPATH": str(Path.cwd())}) as address:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAP_")}
        env |= {"HAP_HOME": str(home), "HAP_DASK_ADDRESS": address}
        with Client(address, timeout=10) as client:
            pids = client.run(os.getpid)
            proc = subprocess.Popen(
                _hap("validate", "--date", day.isoformat()),
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            killed = None
            deadline = time.monotonic() + 120
            while killed is None and proc.poll() is None and time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed = busy[0]
                time.sleep(0.02)
            out, _ = proc.communicate(timeout=300)
        assert killed is not None, "no task was seen running on a worker"
        assert proc.returncode == 0, out[-3000:]
        ingested = _cli("ingest", "--date", day.isoformat(), env=env)
        assert ingested.returncode == 0, (ingested.stdout + ingested.stderr)[-3000:]
    reference = _cfg(_copy(landed, tmp_path / "reference"))
    validate_day(reference, day)
    ingest_day(reference, day)
    assert _lake_hashes(_cfg(home)) == _lake_hashes(reference) != {}
