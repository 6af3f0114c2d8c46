"""SIGTERM to ``hap run`` mid-flow: the command exits within 10 s and leaves no process behind.

Real processes throughout: ``hap run`` starts ``python -m flows.cli`` under its supervisor, the
flow starts a temporary Prefect server; the test signals only the ``hap`` process, as an
operator's ``kill`` or a container runtime would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hap.core import layout
from hap.core.procs import group_members
from hap.data import lake
from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES, tiny_config

pytestmark = pytest.mark.slow

D1 = "2026-11-01"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _hap_in_own_session(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``hap ARGS`` in a session of its own: the test signals hap only, as an operator's kill would."""
    hap = Path(sys.executable).with_name("hap")
    return subprocess.Popen(
        [str(hap), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _set_flags(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def test_sigterm_to_hap_run_stops_within_10s_and_leaves_no_process(tmp_path):
    from hap.sources.simulator import simulate_days

    home = tmp_path / "data"
    overrides = {**TINY_OVERRIDES, **TINY_FLOW_RUN, "simulate.days": 1, "split.window_days": 1}
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in overrides.items()})
    list(simulate_days(cfg, cfg.simulate.start, 1, progress=False))
    env = {
        **os.environ,
        "HAP_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a new database on 2 busy cores
    }
    env.pop("PREFECT_API_URL", None)
    hap = [sys.executable, "-c", "from hap.cli import main; main()"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [*hap, *_set_flags(overrides), "run", "--date", D1], env=env, stdout=log, stderr=log
    )
    # mid-flow: the day is in the lake (ingest done), the run goes on to validate, split, train
    deadline = time.monotonic() + 240
    while not lake.has_day(cfg, "samples", D1):
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the flow never reached ingest"
        time.sleep(0.2)
    flow_pids = _children(proc.pid)
    assert flow_pids, "hap run has no flow child"
    pgid = flow_pids[0]  # the supervisor starts the flow as the leader of a new process group
    assert len(group_members(pgid)) >= 2, "expected the flow and its temporary Prefect server"

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    took = time.monotonic() - sent
    log.close()
    output = (tmp_path / "run.log").read_text()

    print(f"time to exit after SIGTERM: {took:.2f}s")
    assert took < 10, f"hap run took {took:.1f}s to exit after SIGTERM"
    assert code == 128 + signal.SIGTERM, output[-2000:]
    time.sleep(0.5)
    assert group_members(pgid) == [], f"left behind: {group_members(pgid)}"
    summary = json.loads((layout.metrics_dir(cfg, D1) / layout.DAILY_RUN_FILE).read_text())
    assert summary["status"] == "failed", summary
    assert "model_version" not in summary and "gate" not in summary
    from hap.registry.registration import CHAMPION, alias_version

    assert alias_version(cfg, CHAMPION) is None  # no alias moved


def test_sigterm_to_hap_dashboard_stops_its_evidently_ui_too(tmp_path):
    """``hap dashboard`` serves ``evidently ui``; SIGTERM to ``hap`` stops both within 10 s."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")} | {
        "HAP_HOME": str(tmp_path / "data")
    }
    proc = _hap_in_own_session("dashboard", "--port", str(port), env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until evidently ui answers on its port
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("evidently ui did not start listening within 120 s")
        children = _children(proc.pid)
        assert children, "hap dashboard runs evidently ui as a child"
        ui_group = os.getpgid(children[0])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while group_members(ui_group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_members(ui_group), "evidently ui outlived hap dashboard"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_hap_schedule_stops_every_process_it_started(tmp_path):
    """``hap schedule`` serves the daily deployment (here on a temporary Prefect server it starts
    itself, no ``PREFECT_API_URL``); SIGTERM to ``hap`` stops it and all its descendants in 10 s."""
    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAP__", "PREFECT_API"))} | {
        "HAP_HOME": str(tmp_path / "data"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    proc = _hap_in_own_session("schedule", env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "serving daily-retrain" in line, line + (proc.stdout.read() if proc.poll() is not None else "")
        tree: list[psutil.Process] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(tree) < 2:  # the flows process and its temporary server
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            tree = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.5)
        time.sleep(3)  # serving
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "hap schedule runs the flows process as a child"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - started < 10
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"outlived hap schedule: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
