"""Locks of the flows: one run per day it touches, one DVC operation per repository.

Both are file locks under the data root (``hap.core.locks``): the kernel frees them the moment
their holder dies, so a ``kill -9`` never leaves a date locked. A run for D locks every day it
reads or writes (its window ``[D-w+1, D]`` and the eval day ``D+1``), in date order, so a run
that validates a day and another that splits a window containing it are serialized and never
deadlock. With a Prefect server (``PREFECT_API_URL``), runs on other machines share the data root
through a Prefect global concurrency limit too; its lease (``orchestration.lock_lease_seconds``)
expires when the holder stops renewing it, so a dead holder's slot frees itself on the server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hap.core import layout
from hap.core.config import Config
from hap.core.locks import LockRefused, file_lock, file_locks, holder, is_held

RunRefused = LockRefused  # the name the flows and their tests use


def date_limit_name(date: dt.date) -> str:
    return f"hap-date-{date.isoformat()}"


def dvc_limit_name(repo: Path) -> str:
    repo = Path(repo).resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", repo.name.lower()).strip("-") or "repo"
    return f"dvc-{slug}-{hashlib.sha1(str(repo).encode()).hexdigest()[:8]}"


def run_days(cfg: Config, date: dt.date) -> list[dt.date]:
    """Every day a run for ``date`` reads or writes: the window and the eval day after it."""
    return [*layout.window(date, cfg.split.window_days), date + dt.timedelta(days=1)]


def _server_mode() -> bool:
    return bool(os.environ.get("PREFECT_API_URL"))


@contextlib.contextmanager
def _server_limits(names: list[str], timeout_seconds: float | None, lease_seconds: float) -> Iterator[None]:
    """Prefect global concurrency limits with a lease, only against a real Prefect server: the
    temporary server keeps leases in its memory and dies with its process."""
    if not _server_mode():
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)
    try:
        ctx = concurrency(
            sorted(names),
            occupy=1,
            timeout_seconds=timeout_seconds,
            lease_duration=lease_seconds,
            strict=True,
        )
        ctx.__enter__()
    except TimeoutError:
        raise RunRefused(
            f"Prefect limits {', '.join(sorted(names))} stay taken for more than {timeout_seconds}s; "
            "refusing rather than interleaving"
        ) from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


@contextlib.contextmanager
def date_lock(cfg: Config, date: dt.date, timeout_seconds: float | None) -> Iterator[None]:
    """At most one run at a time over any day that the run for ``date`` touches."""
    days = run_days(cfg, date)
    names = [date_limit_name(d) for d in days]
    what = f"run for {date.isoformat()}"
    with file_locks([layout.lock_file(cfg, n) for n in names], timeout_seconds, what):
        with _server_limits(names, timeout_seconds, cfg.orchestration.lock_lease_seconds):
            yield


def dvc_lock(
    cfg: Config, repo: Path, timeout_seconds: float | None = None
) -> contextlib.AbstractContextManager:
    """At most one DVC operation per repository (parallel ones fail on DVC's repo lock)."""
    path = Path(repo) / ".dvc" / "tmp" / f"{dvc_limit_name(repo)}.lock"
    return file_lock(path, timeout_seconds, f"DVC in {repo}")


def unlock(cfg: Config, date: dt.date) -> str:
    """What ``hap unlock --date D`` does: report the holder, clear a leaked server slot.

    A file lock cannot leak (it dies with its holder); a live holder is named, not broken: stop
    it (``kill PID``: it stops within 10 s and releases its locks)."""
    path = layout.lock_file(cfg, date_limit_name(date))
    info = holder(path)
    if is_held(path):
        raise RunRefused(
            f"{date.isoformat()} is locked by a live run: pid {info and info.get('pid')} on "
            f"{info and info.get('host')} ({info and info.get('what')}); stop it with `kill PID` "
            "(it exits within 10 s and frees the lock), then re-run the day"
        )
    lines = [
        f"{date.isoformat()}: no live run holds it" + (f" (last holder: pid {info['pid']})" if info else "")
    ]
    if _server_mode():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        with get_client(sync_client=True) as client, contextlib.suppress(Exception):
            client.update_global_concurrency_limit(
                date_limit_name(date), GlobalConcurrencyLimitUpdate(active_slots=0)
            )
            lines.append(f"reset Prefect limit {date_limit_name(date)} to 0 active slots")
    return "; ".join(lines)
