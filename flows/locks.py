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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.config import Config
from hap.core.errors import HapError

DEFAULT_LEASE_SECONDS = 120.0
FORGOTTEN = (404, 410)  # the server's answers about a lease it does not know (Gone, for a renewal)
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


class LockLost(HapError):
    """The run no longer holds its date's slot on the shared server: it stops at its next step."""


class ServerLease:
    """One held slot of a server limit, renewed by a thread of this process.

    Prefect's own renewal gives up after three quick attempts and then cancels the run, so a server
    restart of more than a few seconds killed every running daily flow. This renewal keeps trying
    through an outage for as long as the lease itself is valid (``lease_seconds`` from the last
    renewal); the lease lives on the server's disk (``infra/``: its filesystem lease storage), so
    the restarted server still knows it. A server restarted with in-memory leases (Prefect's
    default) forgets the lease but still counts its slot, which nothing would ever free: the slot
    is given back and taken again at once (``_take_again``). The lease is lost only when it ran out
    before the server answered, or when another run took the slot in between; then ``lost`` says
    why and ``require_held`` stops the run before its next step, whose outputs a re-run of the day
    rebuilds (every step is idempotent)."""

    RETRY_SECONDS = 2.0

    def __init__(self, name: str, lease_id: object, lease_seconds: float) -> None:
        self.name, self.lease_id, self.lease_seconds = name, lease_id, lease_seconds
        self.lost: str | None = None
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{name}", daemon=True)

    def __enter__(self) -> ServerLease:
        _HELD.append(self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        _HELD.remove(self)
        if not self.lost:
            self._give_back()

    def _give_back(self) -> None:
        """Release the slot. The server answers a release of a lease it forgot with success and
        frees nothing, so the lease is renewed first: a lease the server forgot (restarted with
        in-memory leases) gives its counted slot back directly. Through an outage, try again while
        the lease lasts (after it, a server that kept the lease frees the slot itself)."""
        deadline = time.monotonic() + self.lease_seconds
        while True:
            try:
                _client_call(lambda c: c.renew_concurrency_lease(self.lease_id, self.lease_seconds))
                _client_call(lambda c: c.release_concurrency_slots_with_lease(self.lease_id))
                return
            except Exception as err:  # noqa: BLE001 - an outage, or a lease the server forgot
                if _status(err) in FORGOTTEN:
                    with contextlib.suppress(Exception):
                        self._decrement()
                    return
                if time.monotonic() + self.RETRY_SECONDS >= deadline:
                    return
                time.sleep(self.RETRY_SECONDS)

    def _renew(self) -> None:
        expires = time.monotonic() + self.lease_seconds
        wait = self.lease_seconds / 4
        while not self._stop.wait(wait):
            try:
                _client_call(lambda c: c.renew_concurrency_lease(self.lease_id, self.lease_seconds))
            except Exception as err:  # noqa: BLE001 - an outage, or a lease the server forgot
                if _status(err) in FORGOTTEN:  # a server restarted with in-memory leases
                    if not self._take_again():
                        self.lost = (
                            f"the Prefect server forgot the lease of '{self.name}'; another run took it"
                        )
                        return
                elif time.monotonic() + self.RETRY_SECONDS < expires:
                    wait = self.RETRY_SECONDS  # the server is down: try again while the lease lasts
                    continue
                else:
                    self.lost = f"the Prefect server did not answer for {self.lease_seconds:.0f}s ({err})"
                    return
            expires, wait = time.monotonic() + self.lease_seconds, self.lease_seconds / 4

    def _decrement(self) -> None:
        """Give the counted slot back without a lease (the server's occupancy must be positive)."""
        held = max(1.0, time.monotonic() - self.since)
        _client_call(lambda c: c.release_concurrency_slots([self.name], 1, held))

    def _take_again(self) -> bool:
        """The server forgot the lease (restarted with in-memory leases) but still counts its slot,
        which no lease would ever free: give that slot back and take it again under a new lease,
        at once or not at all."""
        from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

        try:
            self._decrement()
            held = acquire_concurrency_slots_with_lease(
                [self.name], 1, timeout_seconds=1, strict=True, lease_duration=self.lease_seconds
            )
        except Exception:  # noqa: BLE001 - taken by another run meanwhile, or the server is gone
            return False
        self.lease_id = held.lease_id
        return True


_HELD: list[ServerLease] = []


def require_held() -> None:
    """Raise ``LockLost`` when a server lease of this process ran out: a run that may no longer be
    alone on its date stops before its next step instead of interleaving with another."""
    for lease in _HELD:
        if lease.lost:
            raise LockLost(
                f"lost the date lock '{lease.name}': {lease.lost}; the run stops here, and a re-run of "
                "the day completes it"
            )


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _client_call(call: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return call(client)


@contextlib.contextmanager
def server_lock(name: str, timeout_seconds: float | None, what: str, lease_seconds: float) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` under a lease renewed
    through server outages (``ServerLease``)."""
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    _client_call(lambda c: c.upsert_global_concurrency_limit_by_name(name, 1))
    try:  # only a timeout while *acquiring* is a refusal; the body's errors pass through
        held = acquire_concurrency_slots_with_lease(
            [name], 1, timeout_seconds=timeout_seconds, strict=True, lease_duration=lease_seconds
        )
    except TimeoutError:
        raise _refused(what, name, timeout_seconds) from None
    with ServerLease(name, held.lease_id, lease_seconds):
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
