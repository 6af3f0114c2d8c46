"""Child processes that stop when their parent is told to stop, and leave nothing behind.

``hap run`` and ``hap backfill`` start the Prefect flow in a child process (``hap/`` never
imports ``flows/``), and the flow starts its own temporary Prefect server. A plain
``subprocess.call`` orphans both on SIGTERM: the wrapper dies, the flow goes on and may promote.
``run_supervised`` starts the child in a process group of its own, forwards SIGTERM and SIGINT
to it, kills the whole group after a grace period, and on any exit kills what is left of
it (a temporary server the flow did not stop). The flow process turns SIGTERM into
``Interrupted`` (``install_interrupt``), so Prefect records the run as crashed and every lock is
released on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

# SIGTERM or Ctrl-C: the child gets this long to crash its flow run cleanly, then the whole group
# is killed, so the command is gone within 10 s of the signal.
GRACE_SECONDS = 7.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """SIGTERM in a flow process: a ``KeyboardInterrupt``, so Prefect marks the run crashed and
    never retries it, and ``with`` blocks (locks, atomic writes) unwind."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_critical_depth = 0
_pending: int | None = None


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _critical_depth:
        _pending = signum  # raised when the critical section ends
        return
    raise Interrupted(signum)


def _signal_of(exc: BaseException | None) -> int | None:
    """The signal a stop exception stands for: ours, Prefect's ``TerminationSignal``, Ctrl-C."""
    if exc is None:
        return None
    signum = getattr(exc, "signum", None) or getattr(exc, "signal", None)
    if isinstance(signum, int):
        return signum
    return signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None


def _redeliver_swallowed(unraisable: Any) -> None:
    """A signal handler that raises while a finalizer (``__del__``) runs has its exception printed
    and dropped, and the run goes on (seen about once in three SIGTERMs to a flow). Deliver the
    signal again, so the next bytecode in the main thread raises it where it counts."""
    signum = _signal_of(unraisable.exc_value)
    if signum is None:
        _default_unraisablehook(unraisable)
        return
    # from another thread a moment later: raised from inside this hook it would be dropped again
    import threading

    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()


_default_unraisablehook = sys.unraisablehook


def install_interrupt() -> None:
    """In a flow process: SIGTERM raises ``Interrupted`` (SIGINT already raises KeyboardInterrupt),
    and a stop exception swallowed by a finalizer is raised again instead of lost."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    sys.unraisablehook = _redeliver_swallowed


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer ``Interrupted`` until the block ends: a few registry calls that must all happen."""
    global _critical_depth, _pending
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if _critical_depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to every process of group ``pgid``; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def run_supervised(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    grace_seconds: float = GRACE_SECONDS,
    stdout: int | None = None,
) -> int:
    """Run ``cmd`` in its own process group and return its exit code (128 + signal when stopped).

    SIGTERM/SIGINT received here go to the child; after ``grace_seconds`` its whole group is
    killed. Whatever is left of the group when the child exits is killed too."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, stdout=stdout, stderr=stdout)
    received: list[tuple[int, float]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append((signum, time.monotonic()))
        # to the flow only: its temporary server must live on to record the run as crashed
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    old = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > grace_seconds:
                    signal_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal_group(proc.pid, signal.SIGKILL)  # a temporary server or worker left behind
    return 128 + received[0][0] if received else code


def main() -> None:
    """``python -m hap.core.procs CMD ARGS...``: run a command supervised (``make run`` uses it, so
    that SIGTERM to make, which make passes on, leaves no temporary Prefect server behind)."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m hap.core.procs CMD [ARGS...]")
    sys.exit(run_supervised(sys.argv[1:]))


if __name__ == "__main__":
    main()
