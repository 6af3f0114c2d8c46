"""Separate processes on 127.0.0.1 standing in for other hosts: a Dask cluster, and any command in
a mount namespace of its own (as root: ``unshare --mount``) with an empty tmpfs over the folders
another host would not have, so that it shares nothing with the test but the network."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

DASK = Path(sys.executable).with_name("dask")
BOOT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_another_host(command: Sequence[str], private: Sequence[Path]) -> list[str]:
    """``command`` in a mount namespace of its own, an empty tmpfs over each of ``private``: the
    code and the virtualenv are there, as in an image, but none of the test's files."""
    mounts = " && ".join(
        f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in private
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mounts} && exec "$@"',
        "sh",
        *command,
    ]


@contextlib.contextmanager
def dask_cluster(
    worker: Callable[[list[str]], list[str]],
    workers: int,
    logs: Path,
    env: dict[str, str],
    separate: bool = False,
    scheduler: Callable[[list[str]], list[str]] = list,
) -> Iterator[str]:
    """``dask scheduler`` on a free 127.0.0.1 port and the command ``worker(dask worker's
    arguments)``: one command running ``workers`` worker processes, or, with ``separate``, one
    command per worker (each may be a host of its own); ``scheduler`` wraps the scheduler's command
    the same way. Yields the address once every worker joined (the test fails, never skips, when
    they do not within 90 s), then stops them all."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    per_command = 1 if separate else workers
    options = ["--nworkers", str(per_command), "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"]
    commands = {
        "scheduler": scheduler(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        )
    }
    for i in range(workers // per_command):
        commands[f"worker-{i}" if separate else "worker"] = worker([address, *options])
    procs = [
        subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
        for name, cmd in commands.items()
    ]
    try:
        from distributed import Client

        deadline = time.monotonic() + BOOT_S
        while True:
            try:
                with Client(address, timeout=10) as client:
                    client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError) as err:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    log = "\n".join(f.read_text()[-1500:] for f in sorted(logs.glob("worker*.log")))
                    pytest.fail(f"the Dask cluster did not start on 127.0.0.1: {err}; {log}")
                time.sleep(1)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a role started with ``start_new_session``: SIGTERM to its process group, then SIGKILL;
    and any descendant it left (a pool worker's flow-run processes run in sessions of their own)."""
    import psutil

    try:
        left = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        left = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == pid
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def pool_worker(
    pool: str,
    name: str,
    env: dict[str, str],
    log: Path,
    cwd: Path,
    host: Callable[[list[str]], list[str]] = list,
) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool POOL --type process --name NAME`` (``host`` wraps the command:
    another host's namespace), in a session of its own; yields once the server has a heartbeat of
    it newer than its start. Never skips: a worker that cannot start fails the test with its log."""
    import datetime as dt

    from prefect.client.orchestration import get_client

    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    started = dt.datetime.now(dt.UTC)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            host(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + BOOT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"worker {name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with get_client(sync_client=True) as client:
                workers = client.read_workers_for_work_pool(pool)
            if any(
                w.name == name and w.last_heartbeat_time and w.last_heartbeat_time >= started for w in workers
            ):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"worker {name} not up after {BOOT_S:.0f}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        stop_process_group(proc)
