"""Object storage (hap.core.storage) against a real S3-compatible server on 127.0.0.1.

The working copy of an ``s3://`` data root syncs both ways, incrementally; an unreachable, silent,
missing or denied bucket fails within the ``storage:`` bounds with one line naming the URL and no
credential. The denied case is a second moto server with its IAM authorization on, which refuses
the (unknown) test key exactly as S3 refuses a wrong one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hap.core import storage
from hap.core.config import load_config
from tests.s3_server import TEST_ACCESS_KEY, TEST_SECRET_KEY, _free_port

TIGHT = {"storage.connect_timeout_seconds": 1, "storage.read_timeout_seconds": 1, "storage.attempts": 2}
BOUND_S = 2 * (1 + 1) + 3  # attempts x (connect + read) + s3fs's backoff and process slack


def _cfg(url: str, workdir: Path, **overrides):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    environ.update(HAP_HOME=url, HAP_WORKDIR=str(workdir))
    return load_config(overrides={**TIGHT, **overrides}, environ=environ)


@contextlib.contextmanager
def silent_store() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: a hung store (or proxy)."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        yield f"http://127.0.0.1:{sink.getsockname()[1]}"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != storage.SYNC_RECORD
    }


def _assert_one_clean_line(err: storage.StorageError, url: str, what: str) -> None:
    text = str(err)
    assert "\n" not in text and url in text and what in text, text
    assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text


def test_working_copy_syncs_both_ways_incrementally(s3, tmp_path):
    url = f"{s3.create_bucket('sync-root')}/hap"
    a, b = _cfg(url, tmp_path / "a"), _cfg(url, tmp_path / "b")
    (a.home / "training/dt=2026-11-01/train").mkdir(parents=True)
    (a.home / "training/dt=2026-11-01/train/part-0.parquet").write_bytes(b"rows" * 100)
    (a.home / "training/dt=2026-11-01/train/_data_version.json").write_text("{}")
    (a.home / ".locks").mkdir()
    (a.home / ".locks/run.lock").write_text("")  # local only (storage.sync_exclude)
    (a.home / "mlflow.db.lock").write_text("")  # the embedded MLflow store's lock: this machine's only

    assert storage.publish_root(a).copied == 2
    assert storage.publish_root(a).copied == 0  # nothing changed, nothing sent
    assert storage.pull_root(b).copied == 2
    local = (".locks", "mlflow.db.lock")
    assert _files(b.home) == {k: v for k, v in _files(a.home).items() if not k.startswith(local)}
    assert storage.pull_root(b).copied == 0

    (b.home / "training/dt=2026-11-01/train/part-0.parquet").unlink()  # b replaces the day
    (b.home / "training/dt=2026-11-01/train/part-1.parquet").write_bytes(b"new")
    synced = storage.publish_root(b)
    assert (synced.copied, synced.removed) == (1, 1)
    pulled = storage.pull_root(a)
    assert (pulled.copied, pulled.removed) == (1, 1)
    assert _files(a.home).keys() - {".locks/run.lock", "mlflow.db.lock"} == _files(b.home).keys()


def test_unreachable_endpoint_fails_in_bounded_time(s3, tmp_path, monkeypatch):
    url = f"{s3.create_bucket('reach')}/hap"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    cfg = _cfg(url, tmp_path)
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.pull_root(cfg)
    assert time.monotonic() - started < BOUND_S
    _assert_one_clean_line(err.value, url, "unreachable")


def test_silent_endpoint_is_cut_by_the_read_timeout(s3, tmp_path, monkeypatch):
    """A server that accepts connections and never answers (a hung proxy) costs the bound, not forever."""
    url = f"{s3.create_bucket('silent')}/hap"
    with silent_store() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as err:
            storage.check(url, _cfg(url, tmp_path).storage)
        assert time.monotonic() - started < BOUND_S
    _assert_one_clean_line(err.value, url, "unreachable")


def test_a_failed_run_on_a_hung_store_reports_its_error_within_the_bound(s3, tmp_path, monkeypatch):
    """The store hangs (accepts, never answers) while a run fails: the run's own error comes out
    after ``storage.after_failure_seconds``, not after every call's timeouts and retries (with
    these bounds, minutes), and the records it could not send reach the bucket on the next publish."""
    url = f"{s3.create_bucket('hung')}/hap"
    loose = {"storage.read_timeout_seconds": 30, "storage.attempts": 3, "storage.after_failure_seconds": 2}
    cfg = _cfg(url, tmp_path, **loose)
    record = cfg.home / "metrics/dt=2026-11-02/daily_run.json"
    with silent_store() as endpoint:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="the run's own error"), storage.synced(cfg):
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            record.parent.mkdir(parents=True)
            record.write_text('{"status": "failed"}')
            raise RuntimeError("the run's own error")
        assert time.monotonic() - started < 2 + 3
    monkeypatch.undo()  # the store answers again
    assert storage.publish_root(cfg).copied == 1
    fs, root = storage.filesystem(url, cfg.storage)
    assert fs.cat(f"{root}/metrics/dt=2026-11-02/daily_run.json") == b'{"status": "failed"}'


def test_an_upload_to_a_silent_store_is_cut_by_the_publish_bound(s3, tmp_path, monkeypatch):
    """A store that accepts and never answers: an upload is not cut by the read timeout, so the
    whole publish is bounded (``storage.publish_seconds`` plus its bytes at the minimum rate)."""
    url = f"{s3.create_bucket('silent-put')}/hap"
    cfg = _cfg(url, tmp_path, **{"storage.read_timeout_seconds": 30, "storage.publish_seconds": 2})
    (cfg.home / "metrics").mkdir(parents=True)
    (cfg.home / "metrics/daily_run.json").write_text("{}")
    with silent_store() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as err:
            storage.publish_root(cfg)
        assert time.monotonic() - started < 2 + 2
    _assert_one_clean_line(err.value, url, "unreachable")


def test_a_refusal_is_told_by_its_code_not_by_digits_in_a_port():
    """A timeout on an endpoint whose port holds the digits 403 is "unreachable", not "denied"."""
    timeout = OSError('Read timeout on endpoint URL: "http://127.0.0.1:44039/silent?list-type=2"')
    assert "unreachable (" in storage.describe("s3://b/p", timeout)
    refused = OSError("An error occurred (403) when calling the HeadObject operation: Forbidden")
    assert "access denied (" in storage.describe("s3://b/p", refused)


def test_missing_bucket_is_named(s3, tmp_path):
    url = "s3://no-such-bucket-here/hap"
    with pytest.raises(storage.StorageError) as err:
        storage.pull_root(_cfg(url, tmp_path))
    _assert_one_clean_line(err.value, url, "no such bucket")


@pytest.fixture
def denying_server():
    """A moto server with authorization on: the test's key is unknown to it, so every call is denied."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the denying moto server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_denied_bucket_fails_at_once_without_credentials(s3, tmp_path, monkeypatch, denying_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", denying_server)
    url = "s3://locked/hap"
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.pull_root(_cfg(url, tmp_path))
    assert time.monotonic() - started < BOUND_S
    _assert_one_clean_line(err.value, url, "access denied")


def test_cli_on_an_unreachable_data_root_prints_one_line(s3, tmp_path):
    url = "s3://hap-root/prod"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    env.update(
        HAP_HOME=url,
        HAP_WORKDIR=str(tmp_path),
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}",
        HAP__STORAGE__CONNECT_TIMEOUT_SECONDS="1",
        HAP__STORAGE__ATTEMPTS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hap.cli", "data-version", "--date", "2026-11-02"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == storage.StorageError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "unreachable" in lines[0], proc.stderr
    assert TEST_SECRET_KEY not in proc.stderr + proc.stdout


def test_redact_removes_credentials(s3):
    text = (
        f"key {TEST_ACCESS_KEY} secret {TEST_SECRET_KEY} "
        "url s3://user:pa55word@bucket/x https://h/o?X-Amz-Credential=AKIAXXXXXXXXXXXXXXXX%2F&X-Amz-Signature=abc"
    )
    out = storage.redact(text)
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, "pa55word", "AKIAXXXXXXXXXXXXXXXX", "=abc"):
        assert secret not in out, out
    assert "s3://***@bucket/x" in out


def test_an_unreachable_dvc_remote_fails_as_storage_in_one_line(s3, tmp_path, monkeypatch):
    """DVC's push fails on a refused connection: a storage failure (exit 9) naming the remote, in
    one line without the push process's traceback."""
    from hap.data import dvc_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    environ.update(HAP_HOME=str(tmp_path / "data"), HAP_DVC_REMOTE="s3://hap-dvc/store")
    cfg = load_config(overrides=TIGHT, environ=environ)
    folder = cfg.home / "training/dt=2026-11-01"
    (folder / "train").mkdir(parents=True)
    (folder / "train/part-0.parquet").write_bytes(b"rows" * 100)
    project = dvc_store._project(cfg, cfg.dvc_remote_url())
    with pytest.raises(storage.StorageError) as err:
        dvc_store._run_add(cfg, project, [f"training-2026-11-01={folder}"])
    text = str(err.value)
    assert err.value.exit_code == 9 and "s3://hap-dvc/store" in text and "unreachable" in text, text
    assert "\n" not in text and "Traceback" not in text and 'File "' not in text, text


def test_a_dvc_remote_that_hangs_is_cut_by_the_publish_bound(s3, tmp_path, monkeypatch):
    """A DVC remote that accepts and never answers: the push is stopped at the publish bound
    (``storage.publish_seconds`` plus its bytes at the minimum rate), a storage failure naming the
    remote, where DVC's own retries of its read timeout took about a minute."""
    from hap.data import dvc_store

    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    environ.update(HAP_HOME=str(tmp_path / "data"), HAP_DVC_REMOTE="s3://hap-dvc/store")
    cfg = load_config(overrides={"storage.publish_seconds": 3}, environ=environ)
    folder = cfg.home / "training/dt=2026-11-01"
    (folder / "train").mkdir(parents=True)
    (folder / "train/part-0.parquet").write_bytes(b"rows" * 100)
    project = dvc_store._project(cfg, cfg.dvc_remote_url())
    with silent_store() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as err:
            dvc_store._run_add(cfg, project, [f"training-2026-11-01={folder}"])
        assert time.monotonic() - started < 3 + 3
    assert "s3://hap-dvc/store" in str(err.value) and "unreachable" in str(err.value)
