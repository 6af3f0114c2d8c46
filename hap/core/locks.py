"""Locks that free themselves when their holder dies: ``fcntl.flock`` on a file under the data root.

The kernel drops an flock the moment the process holding it exits, however it exits (``kill -9``
included), so a dead run never leaves a date locked: its lease ends with the process. The file
records its holder (pid, host, since, what) for the refusal message and for ``hap unlock``.
A Prefect global concurrency limit does not do this in the embedded mode: its lease lives in the
memory of the dead process's temporary server and the slot stays taken in the database.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hap.core.errors import HapError

POLL_SECONDS = 0.2


class LockRefused(HapError):
    """Another live run has held the lock for longer than this run is willing to wait."""


def holder(path: Path) -> dict[str, Any] | None:
    """The last holder recorded in the lock file (it may be gone: see ``is_held``)."""
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def is_held(path: Path) -> bool:
    """True while a live process holds the lock (probed without waiting)."""
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('what')})"


@contextlib.contextmanager
def file_lock(path: Path, timeout_seconds: float | None, what: str) -> Iterator[None]:
    """Hold the lock at ``path``; wait up to ``timeout_seconds`` (None: forever), then refuse."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise LockRefused(
                    f"{what}: {path.name} is held by {_describe(holder(path))} for more than "
                    f"{timeout_seconds:g}s; refusing rather than interleaving "
                    "(`hap unlock --date D` shows the holder)"
                )
            time.sleep(POLL_SECONDS)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T%z")}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({**info, "what": what}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


@contextlib.contextmanager
def file_locks(paths: list[Path], timeout_seconds: float | None, what: str) -> Iterator[None]:
    """Hold several locks, taken in sorted order so that two runs can never deadlock."""
    with contextlib.ExitStack() as stack:
        for path in sorted(set(map(Path, paths))):
            stack.enter_context(file_lock(path, timeout_seconds, what))
        yield
