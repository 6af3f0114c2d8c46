"""params.yaml loads into typed config; env vars and CLI flags override it; every command has --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from hap.core.config import load_config


def test_overrides_env_then_flags(tmp_path):
    env = {
        "HAP_HOME": str(tmp_path),
        "HAP__TRAIN__EPOCHS": "3",
        "HAP__SPLIT__SAMPLE_RATIO__GLOBAL_NEG": "0.5",
    }
    cfg = load_config(environ=env)
    assert cfg.home == tmp_path.resolve()
    assert cfg.train.epochs == 3 and cfg.split.sample_ratio["global_neg"] == 0.5
    assert load_config(environ=env, overrides=["train.epochs=5"]).train.epochs == 5
    assert cfg.path("lake") == tmp_path.resolve() / "lake"


def test_deployment_env_names_set_the_lake_and_the_dvc_remote(tmp_path):
    env = {
        "HAP_HOME": str(tmp_path),
        "HAP_DVC_REMOTE": "s3://bucket/store",
        "HAP_LAKE_URL": f"file://{tmp_path}/shared/lake",
    }
    cfg = load_config(environ=env)
    assert cfg.dvc_remote_url() == "s3://bucket/store"
    assert cfg.path("lake") == tmp_path / "shared" / "lake"
    assert load_config(environ={"HAP_HOME": str(tmp_path)}).dvc_remote_url() == str(
        tmp_path.resolve() / "dvc-remote"
    )
    assert load_config(environ={**env, "HAP__PATHS__DVC_REMOTE": "/mnt/dvc"}).dvc_remote_url() == "/mnt/dvc"
    assert load_config(environ={**env, "HAP_LAKE_URL": "s3://bucket/lake"}).paths.lake == "s3://bucket/lake"
    with pytest.raises(ValidationError, match="s3:// URL"):
        load_config(environ={**env, "HAP_LAKE_URL": "hdfs://nn/lake"})


def test_deployment_env_name_selects_the_dask_cluster(tmp_path):
    env = {"HAP_HOME": str(tmp_path)}
    assert load_config(environ=env).engine.address is None  # params.yaml: local
    cfg = load_config(environ={**env, "HAP_DASK_ADDRESS": "tcp://x:8786"})
    assert cfg.engine.address == "tcp://x:8786"
    # an empty value is no address (infra/k8s/dask-cluster.yaml blanks it on the Dask workers)
    assert load_config(environ={**env, "HAP_DASK_ADDRESS": ""}).engine.address is None
    both = {**env, "HAP__ENGINE__ADDRESS": "tcp://y:8786", "HAP_DASK_ADDRESS": "tcp://x:8786"}
    assert load_config(environ=both).engine.address == "tcp://y:8786"  # HAP__... still wins


def test_bad_values_and_unknown_keys_are_refused(tmp_path):
    env = {"HAP_HOME": str(tmp_path)}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(environ=env, overrides=["train.epoch=3"])
    with pytest.raises(ValidationError):
        load_config(environ=env, overrides=["simulate.scenario=sideways"])
    with pytest.raises(ValidationError, match="N > M"):
        load_config(environ=env, overrides=["model.expressive.mlp_dims=[8]"])


def test_every_command_has_help():
    import typer.main

    from hap.cli import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert {"simulate", "ingest", "import-recflow"} <= set(names)
    for name in names:
        out = subprocess.run(
            [sys.executable, "-m", "hap.cli", name, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0, (name, out.stderr)
        assert "Usage" in out.stdout


def test_cli_simulate_then_ingest(tmp_path):
    env_home = tmp_path / "data"
    cmd = [sys.executable, "-m", "hap.cli", "--set", "simulate.n_items=4000", "--set", "simulate.n_users=200"]
    cmd += ["--set", "validation.fullflow_min_requests=1", "--set", "validation.data_docs=false"]
    env = {"HAP_HOME": str(env_home), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [*cmd, "simulate", "--start", "2026-11-01", "--days", "1", "--requests", "50"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "simulated 2026-11-01: 50 requests" in out.stdout
    out = subprocess.run([*cmd, "validate", "--date", "2026-11-01"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*cmd, "ingest", "--date", "2026-11-01"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "ingested 2026-11-01: 50 requests" in out.stdout
    bad = subprocess.run([*cmd, "ingest", "--date", "2026-11-09"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert "has not passed validation" in bad.stderr and "Traceback" not in bad.stderr
