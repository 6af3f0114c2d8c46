"""PostgreSQL, an MLflow server and a Prefect server on 127.0.0.1, for the tests of the production
configuration (``tests/system/test_topology.py``).

Debian's PostgreSQL 15 (``initdb``/``pg_ctl`` binaries, as a non-root user), ``mlflow server`` on a
Postgres backend with served artifacts (a folder or a bucket), ``prefect server start`` on a Postgres
database; every server is stopped by the PID it was started with. A server that cannot start fails
the test with its log: ``.ci/run`` installs PostgreSQL, so nothing here ever skips.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("HAP_PG_BIN", "/usr/lib/postgresql/15/bin"))
VENV_BIN = Path(sys.executable).parent
PG_USER = "hap"
BOOT_TIMEOUT_S = 90.0

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def _postgres_missing() -> str | None:
    """Why the test cannot run here, or None."""
    for tool in ("initdb", "postgres", "pg_ctl"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL server binaries not installed ({PG_BIN / tool} missing; set HAP_PG_BIN)"
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        return "running as root and no setpriv to drop to a non-root user for PostgreSQL"
    for module in ("psycopg2", "asyncpg"):
        try:
            __import__(module)
        except ImportError:
            return f"Python driver {module} not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = BOOT_TIMEOUT_S) -> None:
    """Poll until ``predicate()`` is true; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def _stop(proc: subprocess.Popen, name: str, grace: float = 15.0) -> None:
    """Stop one server we started, by its PID (and its own process group, for worker children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == pid
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# The production setting of the Prefect server (infra/): concurrency leases kept on its disk, so a
# restarted server still knows who holds a slot (in memory, Prefect's default, a restart strands them)
PREFECT_SERVER_ENV = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"
}


@dataclass
class Servers:
    root: Path
    pg_port: int
    mlflow_url: str
    prefect_api_url: str
    env: dict[str, str] = field(default_factory=dict)
    prefect: subprocess.Popen | None = None
    prefect_command: list[str] = field(default_factory=list)
    prefect_env: dict[str, str] = field(default_factory=dict)

    def pg_url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}@127.0.0.1:{self.pg_port}/{db}"

    def start_prefect(self) -> None:
        """Start the Prefect server (again: same port, database and home) and wait for it."""
        log = self.root / "prefect.log"
        self.prefect = _spawn(self.prefect_command, self.prefect_env, log)
        _wait(lambda: http_ok(f"{self.prefect_api_url}/health"), "prefect server", self.prefect, log)

    def stop_prefect(self) -> None:
        if self.prefect is not None:
            _stop(self.prefect, "prefect")


class _Postgres:
    """A throwaway cluster owned by a non-root user when we are root (Postgres refuses root)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data = root / "pgdata"
        self.log = root / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _has_user("postgres") else "nobody"
            self.prefix = [
                "setpriv",
                f"--reuid={user}",
                f"--regid={pwd.getpwnam(user).pw_gid}",
                "--init-groups",
                "--",
            ]
            shutil.chown(root, user=user)
            root.chmod(0o700)

    def start(self) -> None:
        init = subprocess.run(
            self.prefix
            + [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        logf = open(self.log, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            self.prefix
            + [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import psycopg2

        def ready() -> bool:
            psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres").close()
            return True

        _wait(ready, "postgres", self.proc, self.log, timeout=30)
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "prefect"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM to the postmaster is PostgreSQL's "smart" shutdown; SIGINT is "fast".
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGQUIT)
                    self.proc.wait(timeout=5)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    logf = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True
    )


@contextlib.contextmanager
def real_servers(artifacts_destination: str | None = None) -> Iterator[Servers]:
    """PostgreSQL + MLflow server + Prefect server on 127.0.0.1, stopped by PID afterwards.
    ``artifacts_destination``: where the MLflow server keeps artifacts (default: a folder of its
    root; an ``s3://`` URL puts them in a bucket, reached with the ``AWS_*`` variables)."""
    reason = _postgres_missing()
    if reason:  # a real component that cannot start fails the test; CI installs it (.ci/run)
        pytest.fail(reason)
    root = Path(tempfile.mkdtemp(prefix="hap-servers-"))
    pg_root = Path(tempfile.mkdtemp(prefix="hap-pg-"))  # its own top-level dir: chowned to the pg user
    pg = _Postgres(pg_root, free_port())
    procs: list[tuple[str, subprocess.Popen]] = []
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HAP_", "HAP__"))
    }
    base_env.update(QUIET_ENV)
    s: Servers | None = None
    try:
        pg.start()
        s = Servers(root=root, pg_port=pg.port, mlflow_url="", prefect_api_url="")

        mlflow_port = free_port()
        artifacts = artifacts_destination or str(root / "mlflow-artifacts")
        mlflow_cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            s.pg_url("mlflow"),
            "--artifacts-destination",
            artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ]
        mlflow = _spawn(mlflow_cmd, base_env, root / "mlflow.log")
        procs.append(("mlflow", mlflow))

        prefect_port = free_port()
        s.prefect_api_url = f"http://127.0.0.1:{prefect_port}/api"
        s.prefect_env = {
            **base_env,
            **PREFECT_SERVER_ENV,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": s.pg_url("prefect", "postgresql+asyncpg"),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        }
        s.prefect_command = [
            *[str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1"],
            *["--port", str(prefect_port), "--no-ui"],
        ]
        s.start_prefect()
        s.mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        _wait(lambda: http_ok(f"{s.mlflow_url}/health"), "mlflow server", mlflow, root / "mlflow.log")
        s.env = {
            **base_env,
            "MLFLOW_TRACKING_URI": s.mlflow_url,
            "PREFECT_API_URL": s.prefect_api_url,
            "PREFECT_HOME": str(root / "prefect-client-home"),
        }
        yield s
    finally:
        if s is not None:
            s.stop_prefect()
        for name, proc in reversed(procs):
            _stop(proc, name)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
