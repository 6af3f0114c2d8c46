"""Atomic writes: readers see the old output or the new one, never half of either.

A write that fails for lack of space (or a read-only disk) removes its temporary output and
raises ``WriteFailed`` naming the path it was writing. A write killed outright leaves a
``.tmp-<name>-*`` sibling; the next write of the same target removes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hap.core.errors import WriteFailed

# errors that mean "the disk cannot take this write", as opposed to a bad input
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def is_disk_error(err: BaseException) -> bool:
    """True for an out-of-space / read-only error, also when a library (pyarrow) drops the errno."""
    if not isinstance(err, OSError):
        return False
    return err.errno in _DISK_ERRNOS or "No space left on device" in str(err) or "Disk quota" in str(err)


# A temporary sibling untouched this long belongs to a write that was killed, not to a live one.
STALE_SECONDS = 3600.0


def clean_stale(target: Path, older_than: float = STALE_SECONDS) -> None:
    """Remove temporary siblings of ``target`` that a killed write left behind."""
    now = time.time()
    for prefix in (".tmp-", ".old-"):
        for stale in target.parent.glob(f"{prefix}{target.name}-*"):
            if len(stale.name) != len(f"{prefix}{target.name}-") + 8:  # our own uuid suffix only
                continue
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime < older_than:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success it replaces ``target`` by rename.

    On error the temporary folder is removed and ``target`` is untouched. Re-running a day
    therefore replaces its partition and never duplicates it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(err):
            raise WriteFailed(target, err) from None
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_disk_error(err):
            raise WriteFailed(path, err) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
