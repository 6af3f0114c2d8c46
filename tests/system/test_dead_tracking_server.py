"""A tracking server that is not there: every registry command fails in bounded time, in one line.

Real processes: the ``hap`` CLI against a port where nothing listens, with the default bounds of
``params.yaml`` (MLflow's own default of 7 retries took about 4 minutes per call).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["models"], ["rollback"]])
def test_registry_commands_fail_fast_in_one_line_naming_the_server(tmp_path, command):
    uri = f"http://127.0.0.1:{_dead_port()}"
    env = {**os.environ, "HAP_HOME": str(tmp_path / "data"), "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_REGISTRY_URI", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "from hap.cli import main; main()", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert proc.returncode == 6, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0], proc.stderr[-2000:]
    assert took < 60, f"took {took:.1f}s"
