"""The production configuration, on loopback: PostgreSQL, an MLflow server and a Prefect server.

The design promises that the same code runs against real servers with configuration only. This
test starts Debian's PostgreSQL 15 (``initdb``/``pg_ctl`` binaries, as a non-root user),
``mlflow server`` on a Postgres backend with served artifacts, and ``prefect server start`` on a
Postgres database, all bound to 127.0.0.1, then runs the daily flow for two simulated days with
nothing but ``PREFECT_API_URL``/``MLFLOW_TRACKING_URI``/``HAP_HOME`` set, and checks the results
through the servers' own APIs. Every server is stopped by the PID the fixture started.
"""

from __future__ import annotations

import datetime as dt
import json
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

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
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


def _free_port() -> int:
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


def _http_ok(url: str) -> bool:
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


@dataclass
class Servers:
    root: Path
    pg_port: int
    mlflow_url: str
    prefect_api_url: str
    env: dict[str, str] = field(default_factory=dict)

    def pg_url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}@127.0.0.1:{self.pg_port}/{db}"


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


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """PostgreSQL + MLflow server + Prefect server on 127.0.0.1, stopped by PID afterwards."""
    reason = _postgres_missing()
    if reason:  # a real component that cannot start fails the test; CI installs it (.ci/run)
        pytest.fail(reason)
    root = Path(tempfile.mkdtemp(prefix="hap-servers-"))
    pg_root = Path(tempfile.mkdtemp(prefix="hap-pg-"))  # its own top-level dir: chowned to the pg user
    pg = _Postgres(pg_root, _free_port())
    procs: list[tuple[str, subprocess.Popen]] = []
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HAP_", "HAP__"))
    }
    base_env.update(QUIET_ENV)
    try:
        pg.start()
        s = Servers(root=root, pg_port=pg.port, mlflow_url="", prefect_api_url="")

        mlflow_port = _free_port()
        artifacts = root / "mlflow-artifacts"
        mlflow_cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            s.pg_url("mlflow"),
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ]
        mlflow = _spawn(mlflow_cmd, base_env, root / "mlflow.log")
        procs.append(("mlflow", mlflow))

        prefect_port = _free_port()
        prefect_env = {
            **base_env,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": s.pg_url("prefect", "postgresql+asyncpg"),
            "PREFECT_UI_ENABLED": "false",
        }
        prefect = _spawn(
            [
                str(VENV_BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
                "--no-ui",
            ],
            prefect_env,
            root / "prefect.log",
        )
        procs.append(("prefect", prefect))

        s.mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        s.prefect_api_url = f"http://127.0.0.1:{prefect_port}/api"
        _wait(lambda: _http_ok(f"{s.mlflow_url}/health"), "mlflow server", mlflow, root / "mlflow.log")
        _wait(
            lambda: _http_ok(f"{s.prefect_api_url}/health"), "prefect server", prefect, root / "prefect.log"
        )
        s.env = {
            **base_env,
            "MLFLOW_TRACKING_URI": s.mlflow_url,
            "PREFECT_API_URL": s.prefect_api_url,
            "PREFECT_HOME": str(root / "prefect-client-home"),
        }
        yield s
    finally:
        for name, proc in reversed(procs):
            _stop(proc, name)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)


def test_servers_are_up_and_backed_by_postgres(servers: Servers) -> None:
    """Both servers answer, and their tables live in our PostgreSQL, not a stray SQLite file."""
    import psycopg2

    assert _http_ok(f"{servers.mlflow_url}/health")
    assert _http_ok(f"{servers.prefect_api_url}/health")
    tables = {}
    for db in ("mlflow", "prefect"):
        conn = psycopg2.connect(host="127.0.0.1", port=servers.pg_port, user=PG_USER, dbname=db)
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema='public'")
            tables[db] = {row[0] for row in cur.fetchall()}
        conn.close()
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables["mlflow"]
    assert {"flow", "flow_run", "task_run", "deployment"} <= tables["prefect"]


# ---- the daily flow against the servers -------------------------------------------------------
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)

# both days train (a one-day window), so the registry holds two versions
ONE_DAY_WINDOW = {"split.window_days": 1}

# Runs in a fresh interpreter, configured by environment only (PREFECT_API_URL,
# MLFLOW_TRACKING_URI, HAP_HOME), exactly as a worker container would be.
RUN_DAYS = """
import json, sys
from flows.daily import daily_retrain
overrides = json.loads(sys.argv[1])
for date in sys.argv[2:]:
    state = daily_retrain(date=date, overrides=overrides, return_state=True)
    print("HAP-RUN", date, state.type.value, state.message or "", flush=True)
"""


def _api(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def two_days(servers: Servers) -> dict[str, object]:
    """Two simulated days, then the daily flow for each, in a subprocess pointed at the servers."""
    from hap.sources.simulator import simulate_days
    from tests.conftest import TINY_FLOW_RUN, TINY_OVERRIDES, tiny_config

    overrides = {**TINY_OVERRIDES, "simulate.days": 2, **TINY_FLOW_RUN, **ONE_DAY_WINDOW}
    home = servers.root / "hap-data"
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in overrides.items()})
    list(simulate_days(cfg, D1, 2, progress=False))
    env = {**servers.env, "HAP_HOME": str(home), "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_DAYS, json.dumps(overrides), D1.isoformat(), D2.isoformat()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    (Path(os.environ.get("HAP_INTEGRATION_LOG", servers.root / "flow.log"))).write_text(out)
    assert proc.returncode == 0, out[-4000:]
    runs = [line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("HAP-RUN")]
    assert runs == [[D1.isoformat(), "COMPLETED"], [D2.isoformat(), "COMPLETED"]], out[-4000:]
    return {"cfg": cfg, "home": home, "seconds": time.monotonic() - started}


def test_daily_flow_runs_are_completed_in_the_prefect_server(servers: Servers, two_days: dict) -> None:
    runs = _api(
        f"{servers.prefect_api_url}/flow_runs/filter",
        {"flows": {"name": {"any_": ["daily-retrain"]}}, "sort": "START_TIME_ASC"},
    )
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert sorted(r["parameters"]["date"] for r in runs) == [D1.isoformat(), D2.isoformat()]
    for run in runs:  # every task of the run reached the server, and none failed
        tasks = _api(
            f"{servers.prefect_api_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
        )
        names = {t["name"].rsplit("-", 1)[0] for t in tasks}
        assert {"ingest", "validate"} <= names, names
        assert all(t["state_type"] == "COMPLETED" for t in tasks), [
            (t["name"], t["state_type"]) for t in tasks
        ]
    artifacts = _api(
        f"{servers.prefect_api_url}/artifacts/filter", {"artifacts": {"key": {"like_": "daily-retrain-"}}}
    )
    assert {a["key"] for a in artifacts} >= {
        f"daily-retrain-{D1.isoformat()}",
        f"daily-retrain-{D2.isoformat()}",
    }


def test_models_versions_and_champion_are_in_the_mlflow_server(servers: Servers, two_days: dict) -> None:
    from mlflow import MlflowClient

    cfg = two_days["cfg"]
    client = MlflowClient(tracking_uri=servers.mlflow_url, registry_uri=servers.mlflow_url)
    name = cfg.gate.model_name
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= 2, [v.version for v in versions]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version in {v.version for v in versions}
    run = client.get_run(champion.run_id)
    assert run.data.tags.get("data_version") and run.data.tags.get("git_commit")
    assert any(k.startswith("eval/recall_at_") for k in run.data.metrics), sorted(run.data.metrics)
    # nothing fell back to the embedded SQLite store under the data root
    assert not cfg.path("mlflow_db").exists()


def test_registered_artifacts_are_served_back(
    servers: Servers, two_days: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion's model files download through the server, and live in its artifact store."""
    import mlflow.artifacts

    cfg = two_days["cfg"]
    dest = servers.root / "downloaded"
    # a client configured the way a user configures one: the tracking URI in the environment
    # (``models:/`` URIs resolve through the registry, which defaults to the tracking server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow_url)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{cfg.gate.model_name}@champion", dst_path=str(dest)
        )
    )
    assert (local / "MLmodel").is_file()
    assert any(p.stat().st_size > 0 for p in local.rglob("*") if p.is_file() and p.name != "MLmodel")
    stored = list((servers.root / "mlflow-artifacts").rglob("MLmodel"))
    assert stored, "artifacts must be uploaded to the server's --artifacts-destination"
    assert not cfg.path("mlflow_artifacts").exists()
