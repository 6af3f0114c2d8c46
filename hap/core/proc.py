"""Child processes that never outlive the command that started them.

``hap run`` starts the flow in its own process group. SIGTERM or Ctrl-C to ``hap`` is forwarded to
the flow (Prefect marks the run crashed and releases its lock); whatever of the group is still
alive after a grace period (a temporary Prefect server, a flow stuck in a cleanup) is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from types import FrameType


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pgid: int, deadline: float) -> None:
    """Wait for the group to exit until ``deadline``, then SIGTERM it, then SIGKILL it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(pgid):
            return
        _kill_group(pgid, sig)
        deadline = time.monotonic() + 2.0


def run_group(cmd: list[str], grace_seconds: float) -> int:
    """Run ``cmd`` in a new process group; its exit code (128 + signal when stopped by one).

    SIGTERM/SIGINT received here go to the child; ``grace_seconds`` later the child's group is
    killed, so no flow or server process outlives this one."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() > received[0][1] + grace_seconds:
                    _kill_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        # the flow has exited: its temporary server (same group) must not outlive it
        _reap(proc.pid, time.monotonic() + (0.5 if received else 2.0))
    return 128 + received[0][0] if received else code
