"""The daily flow with the data root and the DVC remote in buckets of a real S3 server.

Machine A lands three simulated days into ``s3://hap-root/prod``; machine B (another working copy,
nothing shared but the bucket) runs the daily flow for the first two with ``HAP_HOME`` on that URL
and ``HAP_DVC_REMOTE`` on a second bucket. Then a fresh clone on an empty machine (only the remote's
URL and the ``AWS_*`` variables) restores a registered version's training set
with ``hap data pull --version`` and its content hash is the version's ``data_version`` tag; no
credential appears in any log, tag, record or object. Last, the store hangs as the third day's
ingest begins (a proxy that accepts and stops answering): the run fails at ingest in bounded time,
and a re-run once the store answers completes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hap.core import layout, storage
from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES
from tests.s3_server import TEST_ACCESS_KEY, TEST_SECRET_KEY, HangingProxy

pytestmark = pytest.mark.slow

D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)
OVERRIDES: dict[str, Any] = {**TINY_OVERRIDES, "simulate.days": 3, **TINY_FLOW_RUN, "split.window_days": 1}


def _environ(url: str, workdir: Path, remote: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    env.update(HAP_HOME=url, HAP_WORKDIR=str(workdir), HAP_DVC_REMOTE=remote)
    return env


@pytest.fixture(scope="module")
def two_days(s3, prefect_harness, tmp_path_factory) -> dict[str, Any]:
    from flows.daily import daily_retrain
    from hap.core.config import load_config
    from hap.sources.simulator import simulate_days

    url = f"{s3.create_bucket('hap-root')}/prod"
    remote = f"{s3.create_bucket('hap-dvc')}/store"
    root = tmp_path_factory.mktemp("s3root")
    producer = load_config(overrides=OVERRIDES, environ=_environ(url, root / "machine-a", remote))
    list(simulate_days(producer, D1, 3, progress=False))  # the third day is the store-loss test's
    storage.publish_root(producer)  # the landing days are in the bucket, and only there for B

    env = _environ(url, root / "machine-b", remote)
    mp = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("HAP")]:
        mp.delenv(key)
    for key, value in env.items():
        if key.startswith("HAP"):
            mp.setenv(key, value)
    try:
        states = [daily_retrain(date=d.isoformat(), overrides=OVERRIDES, return_state=True) for d in (D1, D2)]
    finally:
        mp.undo()
    cfg = load_config(overrides=OVERRIDES, environ=env)
    return {"states": states, "cfg": cfg, "url": url, "remote": remote, "root": root, "s3": s3}


def _objects(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def test_two_days_complete_with_everything_in_buckets(two_days):
    assert [s.type.value for s in two_days["states"]] == ["COMPLETED", "COMPLETED"], [
        s.message for s in two_days["states"]
    ]
    cfg, s3 = two_days["cfg"], two_days["s3"]
    keys = set(_objects(s3, "hap-root"))
    for day in (D1, D2):
        iso = day.isoformat()
        train_rel = layout.training_set(cfg, day).relative_to(cfg.home).as_posix()
        assert f"prod/{train_rel}/{layout.DATA_VERSION_FILE}" in keys  # the training set is in the bucket
        assert f"prod/models/dt={iso}/{layout.BUNDLE_META_FILE}" in keys
        summary = json.loads((layout.metrics_dir(cfg, day) / layout.DAILY_RUN_FILE).read_text())
        assert summary["status"] == "completed"
        assert summary["version_data"]["pushed"], summary["version_data"]
        assert f"prod/metrics/dt={iso}/{layout.DAILY_RUN_FILE}" in keys
    dvc_keys = set(_objects(s3, "hap-dvc"))
    assert any(k.startswith("store/files/md5/") for k in dvc_keys)
    # dvc add --to-remote leaves each upload's temporary object behind on a store; the push removes them
    assert not [k for k in dvc_keys if k.endswith(".tmp")], sorted(dvc_keys)[:5]


def test_the_lake_is_a_delta_table_in_the_root_bucket_not_in_the_working_copy(two_days):
    """A relative lake on an object-store root lives in that bucket, committed by Delta: each day
    is one commit per table, and the working copy never holds (or re-uploads) its files."""
    from hap.data import lake

    cfg, s3 = two_days["cfg"], two_days["s3"]
    assert layout.lake_url(cfg) == f"{two_days['url']}/lake"
    keys = set(_objects(s3, "hap-root"))
    for table in ("samples", "fullflow"):
        assert any(k.startswith(f"prod/lake/{table}/_delta_log/") for k in keys), table
    assert lake.has_day(cfg, "samples", D1) and lake.has_day(cfg, "samples", D2)
    assert not (cfg.home / "lake").exists()


def test_a_fresh_clone_restores_a_registered_training_set_by_its_data_version(two_days, tmp_path):
    """A fresh ``git clone`` of HEAD on an empty machine: no data root, no MLflow, only the DVC
    remote's URL and the ``AWS_*`` variables. The clone's own DVC project is left untouched."""
    from hap.core.config import REPO_ROOT
    from hap.data.dvc_repo import dvc_dir_md5
    from hap.data.versioning import content_hash
    from hap.registry import registration as registry

    cfg = two_days["cfg"]
    tags = registry.version_for_day(cfg, D2).tags  # the registered version's record of its data
    version = tags[registry.TAG_DATA_VERSION]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAP", "MLFLOW"))}
    env.update(HAP_DVC_REMOTE=two_days["remote"], HAP_WORKDIR=str(tmp_path / "work"))
    proc = subprocess.run(
        [sys.executable, "-m", "hap.cli", "data", "pull", "--version", version, "--out", "restored"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restored = clone / "restored"
    train = restored / Path(tags[registry.TAG_TRAIN_PATH]).relative_to(tags[registry.TAG_DVC_OUT])
    assert content_hash(train)[0] == version
    assert dvc_dir_md5(restored) == tags[registry.TAG_DVC_MD5]
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True
    ).stdout.splitlines()
    assert all(line.startswith("?? restored/") for line in changed), changed


def test_unknown_data_version_is_one_clear_error(two_days, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP")}
    env.update(HAP_DVC_REMOTE=two_days["remote"], HAP_WORKDIR=str(tmp_path / "work"))
    proc = subprocess.run(
        [sys.executable, "-m", "hap.cli", "data", "pull", "--version", "0" * 64],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "no training set with data version" in proc.stderr


def test_no_credential_in_logs_tags_records_or_objects(two_days):
    from hap.registry import registration as registry

    cfg, s3 = two_days["cfg"], two_days["s3"]
    texts: list[tuple[str, bytes]] = []
    for bucket in ("hap-root", "hap-dvc"):
        texts += [(f"s3://{bucket}/{k}", v) for k, v in _objects(s3, bucket).items()]
    for path in two_days["root"].rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            texts.append((str(path), path.read_bytes()))
    for mv in registry.versions(cfg):
        texts.append((f"version {mv.version} tags", json.dumps(mv.tags).encode()))
    for state in two_days["states"]:
        texts.append(("flow state", str(state.message).encode()))
    for name, blob in texts:
        for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY):
            assert secret.encode() not in blob, f"{secret[:4]}... found in {name}"


class _HungStore:
    """The root bucket as machine B reaches it, through a ``HangingProxy``: ``hang_after(step)``
    hangs it right after that step's ``ok`` line of ``day`` (``hung_at``: when), ``proxy.hang()``
    at once."""

    def __init__(self, proxy: HangingProxy, day: dt.date) -> None:
        self.proxy, self.day = proxy, day
        self.after: str | None = None
        self.hung_at: float | None = None

    def hang_after(self, step: str | None) -> None:
        self.after, self.hung_at = step, None


@contextlib.contextmanager
def _hung_store(
    two_days: dict[str, Any], monkeypatch: pytest.MonkeyPatch, day: dt.date
) -> Iterator[_HungStore]:
    """Machine B's environment with the bucket behind a proxy that hangs on cue (``_HungStore``)."""
    store = _HungStore(HangingProxy(two_days["s3"].endpoint), day)

    class HangOnCue(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if store.after is None or store.hung_at is not None:
                return
            if record.getMessage().startswith(f"{store.day}  {store.after:<12} ok"):
                store.proxy.hang()
                store.hung_at = time.monotonic()

    for key, value in _environ(two_days["url"], two_days["root"] / "machine-b", two_days["remote"]).items():
        if key.startswith("HAP"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.proxy.endpoint)
    trigger, lines = HangOnCue(level=logging.INFO), logging.getLogger("flows.progress")
    level = lines.level
    lines.setLevel(logging.INFO)
    lines.addHandler(trigger)
    try:
        yield store
    finally:
        lines.removeHandler(trigger)
        lines.setLevel(level)
        store.proxy.close()


def test_a_store_that_hangs_mid_run_fails_that_step_in_bounded_time(two_days, monkeypatch):
    """The store stops answering as ingest begins (it accepts connections and never replies): the
    run fails at ingest within 60 s, naming the day, the step and the bucket, without a traceback;
    the champion stays, the day stays in landing/ and nothing is quarantined; once the store
    answers again, a re-run of the day completes."""
    from flows.daily import daily_retrain
    from flows.progress import failure_paragraph
    from hap.registry.registration import CHAMPION, alias_version

    cfg, s3, url = two_days["cfg"], two_days["s3"], two_days["url"]
    champion = alias_version(cfg, CHAMPION).version
    with _hung_store(two_days, monkeypatch, D3) as store:
        store.hang_after("validate")
        # the lake's calls at half their default timeout: about 20 s of them, then the failed run's
        # records' bound (10 s), well inside 60 s on a loaded machine (the defaults took ~52 s)
        hung = {**OVERRIDES, "lake.timeout_seconds": 5}
        state = daily_retrain(date=D3.isoformat(), overrides=hung, return_state=True)
        assert store.hung_at is not None, "the store was never hung: no validate line for the day"
        took = time.monotonic() - store.hung_at
        assert state.is_failed() and took < 60, (state.message, took)
        summary = json.loads((layout.metrics_dir(cfg, D3) / layout.DAILY_RUN_FILE).read_text())
        assert summary["failed_step"] == "ingest", summary
        paragraph = failure_paragraph(summary)
        assert f"{D3} failed at ingest" in paragraph and url in paragraph, paragraph
        assert "Traceback" not in paragraph
        assert alias_version(cfg, CHAMPION).version == champion
        keys = set(_objects(s3, "hap-root"))
        assert f"prod/landing/dt={D3}/exposure.parquet" in keys
        assert not any(k.startswith("prod/quarantine/") for k in keys)

        store.proxy.resume()
        rerun = daily_retrain(date=D3.isoformat(), overrides=OVERRIDES, return_state=True)
        assert rerun.is_completed(), rerun.message


# a hung store costs seconds here, not the defaults' half minute: one try, short answers
FAST_FAILING_STORE = {
    "storage.attempts": 1,
    "storage.read_timeout_seconds": 2,
    "storage.publish_seconds": 4,
    "storage.after_failure_seconds": 3,
}


def test_a_store_that_hangs_around_the_steps_leaves_a_record_that_says_where(two_days, monkeypatch):
    """A fourth day, with the store hanging at three moments: as the run starts (the pull fails),
    right after register (the gate's own work is done, the publish after it fails: the record
    keeps the gate's verdict, so the paragraph says whether a promotion stands, as the registry
    does), and after the last step (the final publish fails: the record says failed, not
    completed). Once the store answers, the day completes."""
    from flows.daily import daily_retrain
    from flows.progress import failure_paragraph
    from hap.core.config import load_config
    from hap.registry.registration import CHAMPION, alias_version
    from hap.sources.simulator import simulate_days

    cfg, url, remote = two_days["cfg"], two_days["url"], two_days["remote"]
    d4 = D3 + dt.timedelta(days=1)
    producer = load_config(overrides=OVERRIDES, environ=_environ(url, two_days["root"] / "machine-a", remote))
    list(simulate_days(producer, d4, 1, progress=False))
    storage.publish_root(producer)

    overrides = {**OVERRIDES, **FAST_FAILING_STORE}
    record = layout.metrics_dir(cfg, d4) / layout.DAILY_RUN_FILE
    with _hung_store(two_days, monkeypatch, d4) as store:

        def failed_run(step: str) -> dict[str, Any]:
            state = daily_retrain(date=d4.isoformat(), overrides=overrides, return_state=True)
            assert state.is_failed(), state.message
            summary = json.loads(record.read_text())
            assert summary["status"] == "failed" and summary["failed_step"] == step, summary
            paragraph = failure_paragraph(summary)
            assert f"{d4} failed at {step}" in paragraph and "Traceback" not in paragraph, paragraph
            store.proxy.resume()
            return summary

        store.proxy.hang()  # as the run starts
        failed_run("pull")

        champion = alias_version(cfg, CHAMPION).version
        store.hang_after("register")
        summary = failed_run("gate")
        assert "gate" in summary and summary["model_version"], summary
        promoted = alias_version(cfg, CHAMPION).version != champion
        assert bool(summary["gate"].get("promoted")) == promoted, summary["gate"]
        stands = "that stands" in failure_paragraph(summary)
        assert stands == promoted and ("did not move" in failure_paragraph(summary)) != promoted

        store.hang_after("version-data")  # the re-run gates nothing new; its last publish hangs
        failed_run("publish")

        store.hang_after(None)
        rerun = daily_retrain(date=d4.isoformat(), overrides=overrides, return_state=True)
        assert rerun.is_completed(), rerun.message
        assert json.loads(record.read_text())["status"] == "completed"
