"""The lake's guarantees, on a local folder and on a real S3-compatible server (the ``s3`` fixture):
a day is published, replaced and removed in one commit each; a writer killed between its file
writes and its commit leaves the previous day readable; concurrent writers of one day leave one
copy; a Dask worker killed mid-ingest lets the step finish on the others; an unreachable or
denied store fails fast in one line that names the URL and no credential."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from hap.core import storage
from hap.core.config import Config
from hap.data import lake
from hap.data.ingest import ingest_day
from hap.sources.simulator import simulate_day
from tests.s3_server import TEST_ACCESS_KEY, TEST_SECRET_KEY

DAY = dt.date(2026, 11, 1)
DAY2 = dt.date(2026, 11, 2)


@pytest.fixture(params=["local", "s3"])
def lake_cfg(request, make_cfg) -> Config:
    """A tiny config whose lake is a folder under the data root, or a fresh bucket on the S3 server."""
    if request.param == "local":
        return make_cfg(simulate__requests_per_day=60)
    s3 = request.getfixturevalue("s3")
    bucket = s3.create_bucket(
        f"lake-{request.node.name.split('[')[0][-20:].replace('_', '-')}-{time.time_ns()}"
    )
    return make_cfg(simulate__requests_per_day=60, paths__lake=f"{bucket}/lake")


def _rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"request_id": pa.array(range(start, start + n), pa.int64()), "x": pa.array([1.0] * n)})


def _versions(cfg: Config, table: str) -> int:
    from deltalake import DeltaTable

    return DeltaTable(lake.table_url(cfg, table)).version()


def test_publish_replace_and_remove_are_one_commit_each(lake_cfg: Config) -> None:
    cfg = lake_cfg
    lake.publish_day(cfg, "samples", DAY, {0: _rows(5), 1: _rows(3, 100)})
    lake.publish_day(cfg, "samples", DAY2, {0: _rows(4)})
    v = _versions(cfg, "samples")
    # replacing a day: one commit, the other day untouched, the day holds the new rows only
    lake.publish_day(cfg, "samples", DAY, {0: _rows(7, 1000)})
    assert _versions(cfg, "samples") == v + 1
    assert lake.read_day(cfg, "samples", DAY)["request_id"].to_pylist() == list(range(1000, 1007))
    assert lake.read_day(cfg, "samples", DAY2).num_rows == 4
    # re-running a day leaves one copy
    lake.publish_day(cfg, "samples", DAY, {0: _rows(7, 1000)})
    assert lake.read_day(cfg, "samples", DAY).num_rows == 7
    assert [p.bucket for p in lake.day_parts(cfg, "samples", DAY)] == [0]
    # removing a day: one commit
    assert lake.unpublish_day(cfg, DAY, tables=["samples"])
    assert _versions(cfg, "samples") == v + 3
    assert not lake.has_day(cfg, "samples", DAY) and lake.read_day(cfg, "samples", DAY) is None
    assert lake.read_day(cfg, "samples", DAY2).num_rows == 4
    assert lake.unpublish_day(cfg, DAY, tables=["samples"]) == []  # nothing left to remove


def _parquet_files(cfg: Config, table: str) -> set[str]:
    fs, root = lake.filesystem(cfg, lake.table_url(cfg, table))
    found = fs.get_file_info(pa.fs.FileSelector(root, recursive=True))
    return {f.path for f in found if f.path.endswith(".parquet")}


def test_vacuum_deletes_replaced_and_uncommitted_files_only_past_the_retention(lake_cfg: Config) -> None:
    cfg = lake_cfg
    lake.publish_day(cfg, "samples", DAY, {0: _rows(5), 1: _rows(3, 100)})
    lake.publish_day(cfg, "samples", DAY2, {0: _rows(4)})
    lake.publish_day(cfg, "samples", DAY, {0: _rows(7, 1000)})  # replaces DAY's two files
    fs, root = lake.filesystem(cfg, lake.table_url(cfg, "samples"))
    fs.create_dir(f"{root}/dt={DAY}/bucket=3")
    with fs.open_output_stream(f"{root}/dt={DAY}/bucket=3/part-00003-killed-writer.parquet") as out:
        out.write(b"never committed")
    live = {p.uri for d in (DAY, DAY2) for p in lake.day_parts(cfg, "samples", d)}
    assert len(_parquet_files(cfg, "samples")) == len(live) + 3
    # inside the retention (a reader may still hold an older snapshot): nothing goes
    assert lake.vacuum(cfg.updated({"lake.vacuum_retention_hours": 168}), ["samples"]) == {"samples": 0}
    assert len(_parquet_files(cfg, "samples")) == len(live) + 3
    # past it: the two replaced files and the uncommitted one go, every committed day reads the same
    assert lake.vacuum(cfg.updated({"lake.vacuum_retention_hours": 0}), ["samples"]) == {"samples": 3}
    assert len(_parquet_files(cfg, "samples")) == len(live)
    assert lake.read_day(cfg, "samples", DAY)["request_id"].to_pylist() == list(range(1000, 1007))
    assert lake.read_day(cfg, "samples", DAY2).num_rows == 4


def test_ingest_and_quarantine_on_the_lake(lake_cfg: Config) -> None:
    from hap.data.quarantine import quarantine_day

    cfg = lake_cfg
    simulate_day(cfg, DAY, progress=False)
    report = ingest_day(cfg, DAY, require_validated=False)
    assert lake.read_day(cfg, "samples", DAY).num_rows == report.samples
    assert lake.read_day(cfg, "fullflow", DAY).num_rows == report.fullflow_rows
    assert all(lake.table_url(cfg, "x").split("/x")[0] in p for p in report.paths)
    qdir = quarantine_day(cfg, DAY, {"step": "test", "check": "manual"})
    assert not lake.has_day(cfg, "samples", DAY) and not lake.has_day(cfg, "fullflow", DAY)
    assert (qdir / "landing").is_dir()


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from hap.core.config import Config
    from hap.core.engine import local_map
    from hap.data.ingest import ingest_day

    cfg = Config.model_validate_json(sys.argv[1])

    def mapper(fn, items):
        out = local_map(fn, items)
        if items and isinstance(items[0], int):  # ingest's buckets are written, the commit is next
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    ingest_day(cfg, sys.argv[2], require_validated=False, mapper=mapper)
    """
)


def test_a_writer_killed_between_its_files_and_its_commit_leaves_the_previous_day(lake_cfg: Config) -> None:
    cfg = lake_cfg
    simulate_day(cfg, DAY, progress=False)
    ingest_day(cfg, DAY, require_validated=False)
    before = lake.read_day(cfg, "samples", DAY)
    # the day lands again with other rows; its re-ingest is killed after writing its files
    cfg2 = cfg.updated({"simulate.seed": cfg.simulate.seed + 1})
    simulate_day(cfg2, DAY, progress=False)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, cfg.model_dump_json(), DAY.isoformat()], capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    fs, root = lake.filesystem(cfg, lake.table_url(cfg, "samples"))
    written = fs.get_file_info(pa.fs.FileSelector(f"{root}/dt={DAY}", recursive=True))
    assert len([f for f in written if f.path.endswith(".parquet")]) > len(lake.day_parts(cfg, "samples", DAY))
    assert lake.read_day(cfg, "samples", DAY).equals(before)  # the killed writer's files are invisible


def test_concurrent_writers_of_one_day_leave_exactly_one_copy(lake_cfg: Config) -> None:
    cfg = lake_cfg
    lake.publish_day(cfg, "samples", DAY2, {0: _rows(2)})  # the table exists; DAY is new

    def write(barrier: threading.Barrier, errors: list, start: int, buckets: int) -> None:
        try:
            files = []
            for b in range(buckets):
                writer = lake.PartWriter(cfg, "samples", DAY, b, _rows(1).schema)
                writer.write(_rows(10, start + 100 * b))
                files.append(writer.close())
            barrier.wait()  # both have written their files; both commit now
            lake.commit_day(cfg, "samples", DAY, _rows(1).schema, files)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    for attempt in range(3):
        barrier, errors = threading.Barrier(2), []
        threads = [
            threading.Thread(target=write, args=(barrier, errors, 10_000 * (k + 1), k + 2)) for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        ids = lake.read_day(cfg, "samples", DAY)["request_id"].to_pylist()
        assert len(ids) in (20, 30) and len(set(i // 10_000 for i in ids)) == 1, (attempt, sorted(ids))
    assert lake.read_day(cfg, "samples", DAY2).num_rows == 2


def test_a_dask_worker_killed_mid_ingest_lets_the_step_finish_on_the_others(make_cfg, s3) -> None:
    from distributed import Client, LocalCluster

    from hap.core.engine import client_map, local_cluster_kwargs

    bucket = s3.create_bucket(f"lake-dask-{time.time_ns()}")
    cfg = make_cfg(simulate__requests_per_day=90, engine__bucket_requests=30, engine__workers=2)
    cfg = cfg.updated({"paths.lake": f"{bucket}/lake", "engine.worker_preload": []})
    simulate_day(cfg, DAY, progress=False)
    marker = cfg.home / "killed-once"

    def kill_once(fn, item):
        if isinstance(item, int) and item == 1 and not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-step
        return fn(item)

    with LocalCluster(**local_cluster_kwargs(cfg)) as cluster, Client(cluster) as client:

        def mapper(fn, items):
            return client_map(client, lambda item: kill_once(fn, item), items)

        report = ingest_day(cfg, DAY, require_validated=False, mapper=mapper)
    assert marker.exists()
    parts = lake.day_parts(cfg, "samples", DAY)
    assert [p.bucket for p in parts] == list(range(len(parts))) and len(parts) >= 2
    assert lake.read_day(cfg, "samples", DAY).num_rows == report.samples
    local = make_cfg(
        home=cfg.home.parent / "local", simulate__requests_per_day=90, engine__bucket_requests=30
    )
    simulate_day(local, DAY, progress=False)
    ingest_day(local, DAY, require_validated=False)
    assert lake.read_day(local, "samples", DAY).equals(lake.read_day(cfg, "samples", DAY))


@pytest.mark.parametrize("failure", ["unreachable", "missing_bucket"])
def test_an_unreachable_or_missing_store_fails_fast_in_one_line_without_credentials(
    make_cfg, s3, monkeypatch, failure
) -> None:
    cfg = make_cfg(paths__lake="s3://hap-no-such-bucket/lake")
    if failure == "unreachable":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # nothing listens there once the socket is closed
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        cfg = cfg.updated({"lake.timeout_seconds": 2, "lake.max_retries": 1})
    start = time.monotonic()
    with pytest.raises(lake.LakeUnavailable) as caught:
        lake.publish_day(cfg, "samples", DAY, {0: _rows(3)})
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert elapsed < 30, elapsed
    assert "s3://hap-no-such-bucket/lake/samples" in message and "\n" not in message
    assert TEST_SECRET_KEY not in message and TEST_ACCESS_KEY not in message


def test_redact_removes_credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    text = storage.redact("s3://AKIA:s3cr3t-value@bucket/x failed with s3cr3t-value")
    assert "s3cr3t-value" not in text and "bucket/x" in text


def test_the_lake_url_takes_paths_and_s3_and_refuses_other_schemes(make_cfg, tmp_path: Path) -> None:
    from hap.core import layout

    assert layout.lake_url(make_cfg()) == str(make_cfg().path("lake"))
    assert layout.lake_url(make_cfg(paths__lake="s3://b/lake")) == "s3://b/lake"
    assert layout.lake_url(make_cfg(paths__lake=f"file://{tmp_path}/l")) == f"{tmp_path}/l"
    with pytest.raises(ValueError, match="s3:// URL"):
        make_cfg(paths__lake="gs://b/lake")
    with pytest.raises(ValueError, match="needs a bucket"):
        make_cfg(paths__lake="s3://")


def test_ingest_into_a_missing_bucket_fails_cleanly_and_does_not_quarantine_the_day(make_cfg, s3) -> None:
    """The store is down, not the data: the day stays in landing, nothing is published."""
    from hap.core import layout
    from hap.data import markers

    cfg = make_cfg(simulate__requests_per_day=40, paths__lake="s3://hap-missing-bucket/lake")
    simulate_day(cfg, DAY, progress=False)
    with pytest.raises(lake.LakeUnavailable, match="s3://hap-missing-bucket/lake"):
        ingest_day(cfg, DAY, require_validated=False)
    assert layout.landing_day(cfg, DAY).is_dir() and not markers.is_quarantined(cfg, DAY)
