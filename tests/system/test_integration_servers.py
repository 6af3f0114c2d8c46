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
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PG_USER, REPO, Servers, http_ok, real_servers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with real_servers() as s:
        yield s


def test_servers_are_up_and_backed_by_postgres(servers: Servers) -> None:
    """Both servers answer, and their tables live in our PostgreSQL, not a stray SQLite file."""
    import psycopg2

    assert http_ok(f"{servers.mlflow_url}/health")
    assert http_ok(f"{servers.prefect_api_url}/health")
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
