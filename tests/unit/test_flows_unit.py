"""Orchestration pieces that need no Prefect server: deployments, retry rule, skip rule, report."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from hap.core import layout
from hap.core.config import REPO_ROOT, load_config
from hap.core.errors import NotValidated, ValidationFailed

D = dt.date(2026, 11, 5)


# ---- prefect.yaml ------------------------------------------------------------------------------
def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_prefect_yaml_entrypoints_resolve_to_real_flows():
    import inspect

    from prefect.flows import Flow, load_flow_from_entrypoint

    deployments = _deployments()
    assert set(deployments) == {"daily-retrain", "train-ghcl", "backfill"}
    expected_pool = {"daily-retrain": "cpu-pool", "train-ghcl": "gpu-pool", "backfill": "cpu-pool"}
    for name, dep in deployments.items():
        flow = load_flow_from_entrypoint(dep["entrypoint"], use_placeholder_flow=False)
        assert isinstance(flow, Flow)
        assert dep["work_pool"]["name"] == expected_pool[name]
        params = inspect.signature(flow.fn).parameters
        assert set(dep.get("parameters") or {}) <= set(params)
    cfg = load_config()
    assert deployments["train-ghcl"]["name"] == cfg.orchestration.train_deployment.split("/")[1]
    flow = load_flow_from_entrypoint(deployments["train-ghcl"]["entrypoint"], use_placeholder_flow=False)
    assert flow.name == cfg.orchestration.train_deployment.split("/")[0]


def test_prefect_yaml_schedules_parse_and_match_params():
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    cfg = load_config()
    deployments = _deployments()
    (daily,) = deployments["daily-retrain"]["schedules"]
    schedule = _schedule_config_to_deployment_schedule(daily)["schedule"]
    assert schedule.cron == cfg.orchestration.cron and schedule.timezone == cfg.orchestration.timezone
    assert not deployments["backfill"]["schedules"] and not deployments["train-ghcl"]["schedules"]
    # the server's scheduler computes the runs: daily at 04:00 Paris time, across the DST change
    import asyncio
    from zoneinfo import ZoneInfo

    from prefect.server.schemas.schedules import CronSchedule

    server_side = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    runs = asyncio.run(
        server_side.get_dates(n=3, start=dt.datetime(2026, 10, 24, 12, tzinfo=ZoneInfo("UTC")))
    )
    local = [r.astimezone(ZoneInfo(cfg.orchestration.timezone)) for r in runs]
    assert [r.hour for r in local] == [4, 4, 4]
    assert [r.date() for r in local] == [dt.date(2026, 10, 25), dt.date(2026, 10, 26), dt.date(2026, 10, 27)]


# ---- the wait for the train-ghcl run ----------------------------------------------------------
def test_the_wait_for_remote_training_is_bounded():
    """``flows.tasks.wait_verdict``: a silent running run is Crashed, a run no worker takes is
    Cancelled, an overlong one Cancelling (a live worker stops it); a null bound turns silence off.
    The real thing, a worker killed mid-training: tests/system/test_training_pool.py."""
    from flows.tasks import wait_verdict

    cfg = load_config(
        overrides={
            "orchestration.train_timeout_seconds": 3600,
            "orchestration.train_heartbeat_timeout_seconds": 600,
        }
    )
    assert wait_verdict(cfg, running=True, elapsed=3000, silent=599) is None
    reason, state = wait_verdict(cfg, running=True, elapsed=700, silent=601)
    assert (
        state == "Crashed"
        and "no heartbeat for 601 s" in reason
        and "train_heartbeat_timeout_seconds" in reason
    )
    reason, state = wait_verdict(cfg, running=False, elapsed=700, silent=601)
    assert state == "Cancelled" and "never started" in reason
    assert wait_verdict(cfg, running=True, elapsed=3601, silent=0)[1] == "Cancelling"
    assert wait_verdict(cfg, running=False, elapsed=3601, silent=0)[1] == "Cancelled"
    off = load_config(overrides={"orchestration.train_heartbeat_timeout_seconds": None})
    assert wait_verdict(off, running=True, elapsed=60, silent=10**6) is None
    assert (
        load_config().orchestration.train_timeout_seconds
        > load_config().orchestration.train_heartbeat_timeout_seconds
    )


# ---- retry rule --------------------------------------------------------------------------------
def test_only_transient_failures_are_retried():
    from flows.retry import backoff, is_transient

    assert is_transient(OSError("disk hiccup"))
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())
    assert not is_transient(ValidationFailed("bad day"))
    assert not is_transient(NotValidated("not validated"))
    assert not is_transient(ValueError("a bug"))
    from hap.registry.tracking import TrackingUnavailable

    assert is_transient(TrackingUnavailable("server http://h:5000 is unreachable"))  # a restart may end
    assert backoff(2.0, 3) == [2.0, 4.0, 8.0]


def test_injected_fault_fires_for_its_budget_only(make_cfg, monkeypatch):
    from flows.faults import maybe_inject

    cfg = make_cfg()
    monkeypatch.setenv("HAP_INJECT_FAULTS", "ingest:2")
    for _ in range(2):
        with pytest.raises(OSError):
            maybe_inject(cfg, "ingest")
    maybe_inject(cfg, "ingest")
    maybe_inject(cfg, "train")


# ---- skip rule ---------------------------------------------------------------------------------
def _land(cfg, *days: dt.date) -> None:
    for d in days:
        layout.landing_day(cfg, d).mkdir(parents=True, exist_ok=True)


def _trained(cfg, d: dt.date) -> None:
    folder = layout.model_dir(cfg, d)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.BUNDLE_META_FILE).write_text("{}")


def test_skip_rule(make_cfg):
    from flows import policy

    cfg = make_cfg(split__window_days=2, orchestration__retrain_every_days=3)
    _land(cfg, D)
    assert not policy.decide(cfg, D).retrain  # window incomplete
    _land(cfg, D - dt.timedelta(days=1))
    assert policy.decide(cfg, D).reason == "no earlier model"
    _trained(cfg, D - dt.timedelta(days=1))
    skip = policy.decide(cfg, D)
    assert not skip.retrain and "1 day(s) old" in skip.reason
    assert policy.decide(cfg, D, force=True).retrain
    _trained(cfg, D - dt.timedelta(days=3))
    # an alert of an earlier day makes this run retrain, and a retrain answers it
    policy.request_retrain(cfg, D - dt.timedelta(days=1), ["hard fraction moved"])
    assert policy.decide(cfg, D).retrain and "alert" in policy.decide(cfg, D).reason
    assert policy.pending_request(cfg, D - dt.timedelta(days=1)) is None  # not before it was made
    policy.consume_request(cfg, D)
    assert not policy.decide(cfg, D).retrain
    cfg_old = make_cfg(split__window_days=2, orchestration__retrain_every_days=1)
    assert policy.decide(cfg_old, D).retrain  # default: every day


def test_report_renders_counts_metrics_verdict_and_links():
    from flows.report import render_day

    text = render_day(
        {
            "date": "2026-11-05",
            "status": "completed",
            "retrain": True,
            "retrain_reason": "no earlier model",
            "ingest": {"requests": 240, "samples": 9000, "by_source": {"expose_pos": 40}},
            "split": {"rows": 8000, "by_difficulty": {"easy": 3000, "hard": 5000}},
            "evaluate": {"recall@50": 0.41, "gauc": 0.66},
            "model_version": "3",
            "tracking_uri": "sqlite:///x/mlflow.db",
            "gate": {"verdict": "pass", "promoted": True, "reasons": ["first model"]},
            "champion": {"version": "3"},
            "monitor": {
                "figures": {"hard_fraction_model": 0.31},
                "alerts": ["routed share moved"],
                "html_report": "/x/report.html",
            },
        }
    )
    for needle in (
        "240",
        "recall@50",
        "0.41",
        "version 3",
        "pass",
        "hard_fraction_model",
        "routed share moved",
        "/x/report.html",
        "sqlite:///x/mlflow.db",
    ):
        assert needle in text, needle


def test_the_gate_line_says_undecided_and_the_policy_outcome_never_fail() -> None:
    from flows.report import gate_verdict

    undecided = {
        "verdict": "undecided",
        "promoted": False,
        "reasons": [],
        "undecided": "undecided: recall@50 interval ±0.0182 is wider than ±0.0050; policy alert: kept",
    }
    line = gate_verdict(undecided)
    assert line.startswith("undecided, not promoted (undecided: recall@50") and "policy alert" in line
    assert "fail" not in line
    failed = {"verdict": "fail", "promoted": False, "reasons": ["gauc=0.4 is below its floor 0.5"]}
    assert gate_verdict(failed) == "fail, not promoted (gauc=0.4 is below its floor 0.5)"


def test_every_alert_is_named_on_the_step_line_and_in_the_alert_artifact() -> None:
    from flows.progress import describe
    from flows.report import render_alert

    alert = {
        "rule": "routed_share_rel_change",
        "metric": "routed",
        "message": "routed share 0.007 vs reference 0.004 (+65%, limit 40%)",
    }
    line = describe("monitor", {"alerts": [alert], "figures": {"routed": 0.007}})
    assert line.startswith("1 alerts (routed_share_rel_change: routed share 0.007 vs reference 0.004")
    assert "- routed_share_rel_change: routed share 0.007" in render_alert("2026-11-06", [alert], None)


def test_a_failed_look_up_is_told_under_the_step_it_serves(caplog) -> None:
    """The look-ups before training and monitoring print no line when they succeed; when one fails
    (the store lost as its outputs are published), the day's line and paragraph name the step a
    user knows, not the look-up."""
    import logging

    from flows import progress
    from hap.core.storage import StorageError

    day = dt.date(2026, 11, 6)
    with caplog.at_level(logging.INFO, logger="flows.progress"):
        with progress.reported("unchanged", day):
            pass
        assert caplog.records == []  # a look-up that succeeds has no line
        with pytest.raises(StorageError) as err, progress.reported("unchanged", day):
            raise StorageError("object storage s3://hap-root/prod: unreachable (connection refused)")
    assert err.value.failed_step == "train"
    assert [r.getMessage().split()[1:3] for r in caplog.records] == [["train", "FAILED"]]


def test_a_failure_after_a_promoting_gate_does_not_claim_the_champion_stayed() -> None:
    """Monitoring or version-data fail after the gate promoted: the paragraph says the promotion
    stands, not that the champion did not move."""
    from flows.progress import failure_paragraph

    failed = {
        "date": "2026-11-06",
        "failed_step": "version-data",
        "error_type": "StorageError",
        "error": "object storage s3://hap-dvc/store: unreachable (connection refused)",
        "model_version": "7",
    }
    promoted = failure_paragraph({**failed, "gate": {"verdict": "pass", "promoted": True}})
    assert "promoted v7 to champion before this step" in promoted and "did not move" not in promoted
    kept = failure_paragraph({**failed, "gate": {"verdict": "fail", "promoted": False}})
    assert "The champion did not move." in kept
    assert "The champion did not move." in failure_paragraph({**failed, "failed_step": "train"})
