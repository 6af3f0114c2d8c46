"""Prefect global concurrency limits: one run per date, one DVC operation per repository.

A limit that does not exist makes ``concurrency()`` a silent no-op, so each lock first upserts
its limit (capacity 1) and then acquires it with ``strict=True``. The limits live on the Prefect
server, so they hold across processes and machines that share it, not only across threads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from hap.core.errors import HapError


class RunRefused(HapError):
    """Another run holds the lock for too long: this run refuses instead of interleaving."""


def date_limit_name(date: dt.date) -> str:
    return f"hap-date-{date.isoformat()}"


def dvc_limit_name(repo: Path) -> str:
    repo = Path(repo).resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", repo.name.lower()).strip("-") or "repo"
    return f"dvc-{slug}-{hashlib.sha1(str(repo).encode()).hexdigest()[:8]}"


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit ``name`` if it is missing (idempotent)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


@contextlib.contextmanager
def exclusive(name: str, timeout_seconds: float | None, what: str) -> Iterator[None]:
    """Hold the one slot of ``name``; wait up to ``timeout_seconds``, then refuse."""
    ensure_limit(name)
    with contextlib.ExitStack() as stack:
        try:  # only a timeout while *acquiring* is a refusal; the body's errors pass through
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True))
        except TimeoutError:
            raise RunRefused(
                f"{what}: another run has held '{name}' for more than {timeout_seconds}s; "
                "refusing rather than interleaving"
            ) from None
        yield


def date_lock(date: dt.date, timeout_seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """At most one pipeline run per date."""
    return exclusive(date_limit_name(date), timeout_seconds, f"run for {date.isoformat()}")


def dvc_lock(repo: Path, timeout_seconds: float | None = None) -> contextlib.AbstractContextManager[None]:
    """At most one DVC operation per repository (parallel ones fail on DVC's repo lock)."""
    return exclusive(dvc_limit_name(repo), timeout_seconds, f"DVC in {repo}")
