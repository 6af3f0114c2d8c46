"""Shared fixtures: a tiny config under a temp data root, and a tiny simulated, ingested window.

Tests use tiny data but the real components. ``tiny_overrides`` is the one place that shrinks
the simulator; tests that need another shape pass their own overrides to ``make_cfg``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hap.core import environ
from hap.core.config import Config, load_config

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

TINY_START = dt.date(2026, 11, 1)
TINY_SPLIT_DATE = dt.date(2026, 11, 2)  # the window 11-01..02 of split_window

TINY_OVERRIDES: dict[str, Any] = {
    "simulate.start": TINY_START.isoformat(),
    "simulate.days": 4,
    "simulate.requests_per_day": 240,
    "simulate.n_users": 300,
    "simulate.n_items": 4000,
    "simulate.full_flow_requests": 24,
    "simulate.chunk_requests": 100,
    # a tiny day has few clicks at a real feed's CTR (~5%): tests need clicked eval requests in every slice
    "simulate.click_offset": -8.5,
    "split.window_days": 2,
    "pipeline.date": "2026-11-02",
    "pipeline.dates": ["2026-11-01", "2026-11-02", "2026-11-03"],
    "validation.fullflow_min_requests": 10,  # tiny days log ~24 full-flow requests
    # one thread: a model's bits depend on the thread count, which train.num_threads: auto picks by
    # the machine's load; tests that compare two trainings need the same count every time
    "train.num_threads": 1,
}


# The smallest towers the model tests train (8 wide, one attention head): they check training's
# mechanics (streaming, averaging, checkpoints), not what a model learns.
TINY_TOWERS: dict[str, Any] = {
    "model.embed_dim": 8,
    "model.light.tower_dims": [8],
    "model.light.mlp_dims": [8],
    "model.expressive.tower_dims": [8],
    "model.expressive.mlp_dims": [8, 8],
    "model.expressive.attention_heads": 1,
}


# A tiny model and fast retries for tests that run the whole daily flow: they check the wiring,
# not model quality.
TINY_FLOW_RUN: dict[str, Any] = {
    "model.embed_dim": 8,
    "model.hash_buckets": 4096,
    "model.light.tower_dims": [16],
    "model.light.mlp_dims": [16],
    "model.expressive.tower_dims": [16],
    "model.expressive.mlp_dims": [16, 16],
    "model.expressive.attention_heads": 1,
    "train.epochs": 1,
    "evaluate.latency_candidates": 200,
    "evaluate.latency_repeats": 1,
    "orchestration.retry_delay_seconds": 0.05,
    "validation.data_docs": False,
    # a one-epoch tiny model on 24 eval requests sits near chance: floors that only a broken model misses
    "gate.floors": {"recall@50": 0.0, "gauc": 0.3},
}


def write_tiny_params(repo: Path, **extra: Any) -> None:
    """A copy of the repository's ``params.yaml`` in ``repo``, shrunk by ``TINY_OVERRIDES`` plus
    ``extra`` (dotted keys), with the data root at ``repo/data``: what DVC and ``make run`` read there."""
    import yaml

    from hap.core.config import REPO_ROOT

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key, value in {**TINY_OVERRIDES, **extra}.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    raw["paths"]["home"] = "data"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def tiny_config(home: Path, **overrides: Any) -> Config:
    """A tiny config rooted at ``home``; keyword overrides use ``__`` for dots."""
    merged = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    env["HAP_HOME"] = str(home)
    return load_config(overrides=merged, environ=env)


def split_window(home: Path, overrides: dict[str, Any], by: str, date: dt.date = TINY_SPLIT_DATE) -> Config:
    """A tiny config at ``home`` (``TINY_OVERRIDES`` plus the dotted ``overrides``) whose first three
    simulated days are ingested, marked validated (``by``) and split over the window ending ``date``."""
    from hap.data import markers
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in overrides.items()})
    for day, _ in simulate_days(cfg, cfg.simulate.start, 3, progress=False):
        ingest_day(cfg, day, require_validated=False)  # trusted simulated logs, no GX cost
        markers.mark_validated(cfg, day, {"by": by})
    build_training_set(cfg, date)
    return cfg


def tiny_sets(overrides: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments that give a ``hap`` subprocess ``tiny_config``'s config."""
    merged = {**TINY_OVERRIDES, **overrides}
    return [arg for key, value in merged.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def tiny_env(home: Path) -> dict[str, str]:
    """The environment of a ``hap`` subprocess on the data root ``home``: this checkout first on the
    import path, none of the caller's ``HAP__`` overrides, one thread per process."""
    from hap.core.config import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    path = [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env.update(HAP_HOME=str(home), PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """``make_cfg(**overrides)``: a tiny config under this test's temp folder."""

    def _make(home: Path | None = None, **overrides: Any) -> Config:
        return tiny_config(home or tmp_path / "data", **overrides)

    return _make


# The longest modules, longest first. ``make test`` runs ``pytest -n 2 --dist loadfile``, which
# hands whole modules to its two workers in collection order: started first, these run side by side
# while the short modules fill in around them, instead of two of them ending the run on one worker.
LONGEST_FIRST = (
    "test_topology.py",
    "test_training_pool.py",
    "test_fresh_clone.py",
    "test_s3_data_root.py",
    "test_prefect_restart.py",
    "test_scale_out.py",
    "test_flows.py",
    "test_monitoring.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module stays in order


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every test that runs a flow (each start costs 10-30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server on 127.0.0.1 for the session, with ``AWS_*`` pointing at it.

    The variables are set for the whole test process (and its subprocesses), as a deployment
    would set them; each test creates its own buckets (``s3.create_bucket``)."""
    from tests.s3_server import s3_server

    with s3_server() as server, environ.restored(server.env):
        os.environ.update(server.env)
        yield server


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Four simulated days, ingested into the lake once per session. Treat it as read-only."""
    from hap.data.ingest import ingest_day
    from hap.sources.simulator import simulate_days

    cfg = tiny_config(tmp_path_factory.mktemp("tiny") / "data")
    for date, _ in simulate_days(cfg, cfg.simulate.start, cfg.simulate.days):
        ingest_day(cfg, date, require_validated=False)  # trusted simulated logs, no GX cost
    return cfg
