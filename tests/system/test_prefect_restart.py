"""The Prefect server restarted while runs hold their date's lock: nothing stuck, nothing doubled.

On a shared server a daily run holds its date's slot of a global concurrency limit
(``flows.locks.server_lock``) under a lease it renews every quarter of ``orchestration.lock_lease_seconds``
(``flows.locks.ServerLease``).
The server runs as production runs it (``tests.servers.PREFECT_SERVER_ENV``, ``infra/``): leases on
its disk, so a restarted server still knows them. The cases, against a real PostgreSQL-backed
server that the test stops and starts again on the same port:

- the holder lives through the restart: its next renewal reaches the restarted server, it keeps
  the slot to its end, and a second run of the same date waits for it, never holds it alongside;
- the holder dies while the server is down: nobody renews its lease, the server's repossessor frees
  the slot when the lease runs out, and the next run gets it with no ``hap unlock`` by hand;
- the server comes back with in-memory leases (Prefect's default): it forgot the holder's lease but
  still counts its slot; the holder gives the slot back and takes it again under a new lease, keeps
  it to its end, and the slot is free after it, not stranded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.servers import PREFECT_SERVER_ENV, REPO, Servers, real_servers

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEASE = 60.0  # the server's shortest lease

HOLDER = """
import sys, time
from flows.locks import require_held, server_lock
name, hold, lease, wait = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
asked = time.time()
with server_lock(name, wait, "a run", lease):
    print("HELD", time.time(), time.time() - asked, flush=True)
    time.sleep(hold)
    require_held()
    print("RELEASING", time.time(), flush=True)
print("RELEASED", flush=True)
"""


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with real_servers() as s:
        yield s


def _holder(servers: Servers, name: str, hold: float, lease: float, wait: float = 120) -> subprocess.Popen:
    env = servers.env | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", HOLDER, name, str(hold), str(lease), str(wait)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _until_held(proc: subprocess.Popen, timeout: float = 60) -> list[str]:
    """The holder's ``HELD`` line, once it holds the slot."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.startswith("HELD"):
            return line.split()
        seen.append(line)
        if not line and proc.poll() is not None:
            break
    pytest.fail("the holder never held the slot:\n" + "".join(seen)[-3000:])


def test_through_a_restart_a_live_holder_keeps_its_slot_and_a_lost_one_frees_its_own(servers: Servers):
    """One restart, two dates: the live holder's renewals reach the restarted server and a second
    run of its date waits for it; the slot of a holder killed during the outage frees itself when
    its lease runs out."""
    kept, lost = "hap-date-2026-11-01", "hap-date-2026-11-02"
    # held past the restart and a renewal after it (every quarter of the lease)
    holder = _holder(servers, kept, hold=LEASE / 2 + 5, lease=LEASE)
    doomed = _holder(servers, lost, hold=600, lease=LEASE)
    _until_held(holder)
    _until_held(doomed)
    servers.stop_prefect()
    os.kill(doomed.pid, signal.SIGKILL)  # that run's machine is lost during the outage
    doomed.wait(timeout=10)
    servers.start_prefect()
    contender = _holder(servers, kept, hold=0, lease=LEASE)
    successor = _holder(servers, lost, hold=0, lease=LEASE, wait=LEASE + 60)

    out, _ = holder.communicate(timeout=120)
    assert holder.returncode == 0 and "RELEASED" in out, out[:6000]  # renewed, not cancelled
    released = float(next(line for line in out.splitlines() if line.startswith("RELEASING")).split()[1])
    assert float(_until_held(contender)[1]) >= released, "both runs held the date's slot at once"
    waited = float(_until_held(successor, timeout=LEASE + 60)[2])
    assert waited < LEASE + 30, f"the dead run's slot took {waited:.0f}s to free"
    print(f"a lost holder's slot freed itself after {waited:.1f}s (lease {LEASE:.0f}s)")
    for proc in (contender, successor):
        proc.communicate(timeout=60)
        assert proc.returncode == 0


def test_a_server_that_forgot_the_lease_strands_no_slot(servers: Servers):
    name = "hap-date-2026-11-03"
    holder = _holder(servers, name, hold=LEASE * 0.5, lease=LEASE)
    _until_held(holder)
    durable = servers.prefect_env
    servers.stop_prefect()
    servers.prefect_env = {k: v for k, v in durable.items() if k not in PREFECT_SERVER_ENV}
    try:
        servers.start_prefect()
        out, _ = holder.communicate(timeout=120)
        assert holder.returncode == 0 and "RELEASED" in out, out[:6000]
        contender = _holder(servers, name, hold=0, lease=LEASE, wait=10)
        waited = float(_until_held(contender, timeout=30)[2])
        contender.communicate(timeout=60)
        assert contender.returncode == 0 and waited < 5, waited  # free at once, not stranded
    finally:
        servers.stop_prefect()
        servers.prefect_env = durable
        servers.start_prefect()
