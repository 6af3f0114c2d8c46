"""Locks that die with their holder: one run per day of data, one DVC operation per repository.

- Every run locks each day of its training window (``[D - w + 1, D]``, oldest first, so two runs
  never wait on each other in a cycle): validating day D and splitting a window that contains D
  are serialized, and two runs of one date never interleave.
- The locks are ``flock`` locks on files under ``<data root>/.locks``: the kernel releases them the
  moment their process dies, ``kill -9`` included, so no lock outlives a dead run. (Prefect's
  global concurrency limits keep their leases in the memory of the server that granted them; a
  run's temporary server dies with the run and the slot stayed taken forever.)
- With a shared Prefect server (``PREFECT_API_URL`` set, runs on several machines) the run also
  holds the server's limit ``hap-date-<D>`` under a lease (``orchestration.lock_lease_seconds``)
  that its holder renews; a dead holder's slot frees itself when the lease runs out.
- ``hap unlock --date D`` frees the server's limit of a date at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from hap.core import layout
from hap.core.config import Config
from hap.core.errors import HapError

DEFAULT_LEASE_SECONDS = 120.0
LOCK_DIR = ".locks"


class RunRefused(HapError):
    """Another run holds the lock for too long: this run refuses instead of interleaving."""


def date_limit_name(date: dt.date) -> str:
    return f"hap-date-{date.isoformat()}"


def dvc_limit_name(repo: Path) -> str:
    repo = Path(repo).resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", repo.name.lower()).strip("-") or "repo"
    return f"dvc-{slug}-{hashlib.sha1(str(repo).encode()).hexdigest()[:8]}"


def _refused(what: str, name: str, timeout: float | None) -> RunRefused:
    return RunRefused(
        f"{what}: another run has held '{name}' for more than {timeout}s; refusing rather than "
        "interleaving (a dead run's lock frees itself; see `hap unlock` for a shared Prefect server)"
    )


@contextlib.contextmanager
def file_lock(path: Path, timeout_seconds: float | None, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; wait up to ``timeout_seconds``, then refuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise _refused(what, path.name, timeout_seconds) from None
                time.sleep(0.2)
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} since {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def day_lock_path(cfg: Config, day: dt.date) -> Path:
    return cfg.home / LOCK_DIR / f"{date_limit_name(day)}.lock"


@contextlib.contextmanager
def run_lock(cfg: Config, day: dt.date, timeout_seconds: float | None) -> Iterator[None]:
    """The locks of a run for ``day``: every day of its window, oldest first (plus the shared
    server's leased limit of ``day`` when there is one)."""
    days = layout.window(day, cfg.split.window_days)
    with contextlib.ExitStack() as stack:
        for d in sorted(set(days) | {day}):
            stack.enter_context(file_lock(day_lock_path(cfg, d), timeout_seconds, f"run for {day}"))
        if os.environ.get("PREFECT_API_URL"):
            stack.enter_context(
                server_lock(
                    date_limit_name(day),
                    timeout_seconds,
                    f"run for {day}",
                    cfg.orchestration.lock_lease_seconds,
                )
            )
        yield


@contextlib.contextmanager
def server_lock(name: str, timeout_seconds: float | None, what: str, lease_seconds: float) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` under a renewed lease."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:  # a missing limit makes concurrency() a no-op
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with contextlib.ExitStack() as stack:
        try:  # only a timeout while *acquiring* is a refusal; the body's errors pass through
            stack.enter_context(
                concurrency(
                    name, occupy=1, timeout_seconds=timeout_seconds, strict=True, lease_duration=lease_seconds
                )
            )
        except TimeoutError:
            raise _refused(what, name, timeout_seconds) from None
        yield


def unlock(name: str) -> bool:
    """Free the server limit ``name`` now, whoever holds it; False when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def dvc_lock(repo: Path, timeout_seconds: float | None = None) -> contextlib.AbstractContextManager[None]:
    """At most one DVC operation per repository (parallel ones fail on DVC's repo lock)."""
    path = Path(repo) / ".dvc" / "tmp" / f"{dvc_limit_name(repo)}.lock"
    return file_lock(path, timeout_seconds, f"DVC in {repo}")
