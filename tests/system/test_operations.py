"""Operations under real processes: killed lock holders, shared days, a full disk, stale temps.
Tiny data; each test runs in seconds. (SIGTERM to ``hap run``: ``test_ops_signals.py``.)"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hap.core import layout
from hap.core.config import REPO_ROOT
from tests.conftest import TINY_OVERRIDES, tiny_config

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)

HOLD = """
import sys, time, datetime as dt
from tests.conftest import tiny_config
from flows.locks import run_lock
cfg = tiny_config(sys.argv[1])
with run_lock(cfg, dt.date.fromisoformat(sys.argv[2]), None):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(home: Path, day: dt.date) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(home), day.isoformat()],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_kill_9_while_holding_the_date_lock_frees_it(tmp_path: Path) -> None:
    from flows.locks import RunRefused, run_lock

    cfg = tiny_config(tmp_path / "data")
    holder = _hold(cfg.home, D2)
    with pytest.raises(RunRefused, match="refusing rather than interleaving"), run_lock(cfg, D2, 0.5):
        pass
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    started = time.monotonic()
    with run_lock(cfg, D2, 10):
        waited = time.monotonic() - started
    assert waited < 2, waited


def test_runs_sharing_a_day_are_serialized(tmp_path: Path) -> None:
    """A run for D2 (window D1..D2) holds D1: a run for D1 (its validation) waits, then refuses."""
    from flows.locks import RunRefused, run_lock

    cfg = tiny_config(tmp_path / "data")
    holder = _hold(cfg.home, D2)
    try:
        with pytest.raises(RunRefused), run_lock(cfg, D1, 0.5):
            pass
        with run_lock(cfg, D2 + dt.timedelta(days=2), 0.5):  # a window without D1, D2: no wait
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs: a real full disk (needs root and mount, as CI has; fails where it cannot mount)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:120]}): no full disk to test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_gives_one_clean_error_and_no_partial_files(tiny_lake, small_disk: Path) -> None:
    from hap.core import layout
    from hap.data import markers

    for day in (D1, D2):
        markers.mark_validated(tiny_lake, day, {"by": "test_operations"})
    earlier = small_disk / "dt=2026-10-01"  # what an earlier day left there stays intact
    earlier.mkdir()
    (earlier / "kept.txt").write_text("earlier data\n")
    env = {**os.environ, "HAP_HOME": str(tiny_lake.home)}
    sets = [a for k, v in TINY_OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hap.cli",
            *sets,
            "--set",
            f"paths.training={small_disk}",
            "split",
            "--date",
            "2026-11-02",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith("error: cannot write") and str(small_disk) in err[0], err
    assert "No space left on device" in err[0]
    assert sorted(p.name for p in small_disk.iterdir()) == ["dt=2026-10-01"], list(small_disk.iterdir())
    assert (earlier / "kept.txt").read_text() == "earlier data\n"
    assert not layout.training_set(tiny_lake.updated({"paths.training": str(small_disk)}), D2).exists()


def test_atomic_write_removes_the_stale_temp_of_a_killed_write(tmp_path: Path) -> None:
    from hap.core.atomic import STALE_SECONDS, atomic_dir, atomic_write_text

    target = tmp_path / "out"
    killed = tmp_path / ".tmp-out-0123abcd"  # what a write killed mid-way left
    killed.mkdir()
    (killed / "part.parquet").write_bytes(b"half")
    live = tmp_path / ".tmp-out-4567cdef"  # a write in progress right now: left alone
    live.mkdir()
    old = time.time() - STALE_SECONDS - 60
    os.utime(killed, (old, old))
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert not killed.exists() and live.exists() and (target / "a.txt").read_text() == "new"
    atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_bundle_identity_ignores_run_timings(tmp_path: Path) -> None:
    from hap.registry.registration import bundle_hash

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / layout.BUNDLE_META_FILE).write_text('{"routing": {"threshold": 0.5}}')
    (bundle / layout.RUN_FILE).write_text('{"train_seconds": 12.5}')
    first = bundle_hash(bundle)
    (bundle / layout.RUN_FILE).write_text('{"train_seconds": 13.1}')  # the same model, trained again
    assert bundle_hash(bundle) == first
    (bundle / layout.BUNDLE_META_FILE).write_text('{"routing": {"threshold": 0.6}}')  # another model
    assert bundle_hash(bundle) != first


def test_dvc_targets_come_from_dvc_yaml(tmp_path: Path) -> None:
    import shutil

    import pyarrow as pa

    from hap.core import layout
    from hap.data import lake, markers
    from hap.data.dvc_repo import dvc_targets

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    cfg = tiny_config(repo / "data")
    # the lake's ingest stage owns whole Delta tables: a target once every validated day is in them
    assert dvc_targets(cfg, D1, repo) == ["simulate@2026-11-01", "validate@2026-11-01"]
    rows = pa.table({"request_id": pa.array([1], pa.int64())})
    for day in (D1, D2):
        markers.mark_validated(cfg, day, {"by": "test"})
    lake.publish_day(cfg, "samples", D1, {0: rows})
    lake.publish_day(cfg, "fullflow", D1, {0: rows})
    assert dvc_targets(cfg, D1, repo)[2:] == []  # D2 is validated but not in the lake yet
    lake.publish_day(cfg, "samples", D2, {0: rows})
    lake.publish_day(cfg, "fullflow", D2, {0: rows})
    assert dvc_targets(cfg, D1, repo) == ["simulate@2026-11-01", "validate@2026-11-01", "ingest"]
    layout.model_dir(cfg, D2).mkdir(parents=True)  # pipeline.date with its model: the window stages too
    assert dvc_targets(cfg, D2, repo)[3:] == ["split", "train", "evaluate"]
    assert dvc_targets(tiny_config(tmp_path / "elsewhere"), D1, repo) == []  # data root outside the repo
