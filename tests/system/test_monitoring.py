"""Monitoring on small simulated data: alerts fire on drift and stay quiet otherwise.

Three 10-day scenarios share one tiny champion trained on the first days (those days are
identical in every scenario: the drift starts on day 6). The cascade is shrunk so that one
day is small, but the retrieval pool is kept well below the item count so that
``retrieval_degrades`` can really widen it (with the default tiny config the pool is already
capped at the item count and the scenario barely changes the candidates).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import warnings
from pathlib import Path

import pytest

from hap.core import layout
from hap.core.config import Config
from tests.conftest import tiny_config

START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(10)]
DRIFT_DAY = DAYS[5]  # day 6

SHAPE = {
    "simulate.requests_per_day": 480,  # the routed share of 160 requests moved by +-50% between stable days
    "simulate.days": 10,
    "simulate.drift_start": DRIFT_DAY.isoformat(),
    "simulate.drift_ramp_days": 1,
    "simulate.retrieval_pool": 500,
    "simulate.retrieval_size": 400,
    "contract.prerank_keep": 100,
    "contract.rank_keep": 50,
    "simulate.degrade_pool_factor": 5.0,  # a drift clearly past the tiny world's day-to-day noise
    "simulate.full_flow_requests": 40,
    "split.window_days": 3,
    "split.eval_max_requests": 40,
    "simulate.click_offset": -8.5,  # the shrunk cascade holds fewer on-interest items: CTR back to a few %
    "train.epochs": 1,
    "train.batch_requests": 64,
    "train.lr": 0.003,  # one epoch of a tiny window: the champion must still learn its scores
    "monitor.reference": "trailing",
    "monitor.trailing_days": 3,
}


def scenario_config(home: Path, scenario: str, **extra) -> Config:
    return tiny_config(
        home,
        **{k.replace(".", "__"): v for k, v in {**SHAPE, "simulate.scenario": scenario, **extra}.items()},
    )


def _simulate(cfg: Config, days: list[dt.date]) -> None:
    from hap.data.ingest import ingest_day
    from hap.sources.simulator import simulate_day

    for date in days:
        simulate_day(cfg, date, progress=False)
        ingest_day(cfg, date, require_validated=False)  # validated below where a test needs it


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory):
    """A tiny champion trained (1 epoch) on days 1-3 with the real validate/split/train steps."""
    from hap.data.split import build_training_set
    from hap.data.validate import validate_day
    from hap.model import train
    from hap.model.serving import load_bundle
    from monitoring.champion import from_bundle

    cfg = scenario_config(tmp_path_factory.mktemp("champion") / "data", "stable")
    end = DAYS[2]
    _simulate(cfg, DAYS[:4])
    for date in DAYS[:4]:
        validate_day(cfg, date)
    build_training_set(cfg.updated({"split.eval_day": "next"}), end)  # day 4 held out, days 1-3 all trained
    train.train_day(cfg, end)
    bundle = load_bundle(layout.model_dir(cfg, end))
    return from_bundle(bundle, "1", source=str(layout.model_dir(cfg, end)))


def _run_scenario(home: Path, scenario: str, champion) -> tuple[Config, list]:
    from monitoring.daily import monitor_day

    cfg = scenario_config(home, scenario)
    _simulate(cfg, DAYS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Evidently divides by zero on all-NaN stats
        reports = [monitor_day(cfg, date, champion=champion) for date in DAYS]
    return cfg, reports


@pytest.fixture(scope="module")
def degrading(tmp_path_factory, champion):
    return _run_scenario(tmp_path_factory.mktemp("degrade") / "data", "retrieval_degrades", champion)


@pytest.fixture(scope="module")
def stable(tmp_path_factory, champion):
    return _run_scenario(tmp_path_factory.mktemp("stable") / "data", "stable", champion)


@pytest.fixture(scope="module")
def shifting(tmp_path_factory):
    """content_shift without a champion: also covers the data-side-only path."""
    return _run_scenario(tmp_path_factory.mktemp("shift") / "data", "content_shift", None)


def _alert_days(reports) -> dict[dt.date, list[str]]:
    return {r.date: [a.rule for a in r.alerts] for r in reports if r.alerts}


# ---- acceptance ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_retrieval_degrades_alerts_on_day_6_or_7_and_not_before(degrading):
    _, reports = degrading
    fired = _alert_days(reports)
    summary = {str(r.date): r.figures for r in reports}
    assert not any(d < DRIFT_DAY for d in fired), f"false alarm before the drift: {fired}\n{summary}"
    assert DRIFT_DAY in fired or DAYS[6] in fired, f"no alert on day 6 or 7: {fired}\n{summary}"
    first = min(fired)
    by_date = {r.date: r for r in reports}
    assert by_date[first].retrain  # on_alert: retrain
    # the model-side routed share is what moves: the router sees many more "hard" candidates
    assert {"routed_share_abs_change", "routed_share_rel_change"} & set(fired[first])
    assert by_date[first].table["routed"] > 1.3 * by_date[DAYS[4]].table["routed"]
    print("degrading routed share by day:", {str(r.date): r.table["routed"] for r in reports})


@pytest.mark.slow
def test_stable_never_alerts(stable):
    cfg, reports = stable
    assert _alert_days(reports) == {}, {str(r.date): r.figures for r in reports}
    # the routing threshold is calibrated on the router's own population (full-flow candidates),
    # so on an undrifted day the routed share is what serving routes: rho
    routed = {str(r.date): r.table["routed"] for r in reports}
    print("stable routed share by day:", routed)
    assert all(abs(share - cfg.routing.rho) <= 0.02 for share in routed.values()), routed
    assert all(r.champion_version == "1" for r in reports)
    assert reports[-1].drift_share is not None and reports[-1].prediction_drift is not None


@pytest.mark.slow
def test_content_shift_shows_in_per_content_type_series(shifting):
    from monitoring.dashboards import mean_series, open_project

    cfg, reports = shifting
    assert all(r.champion_version is None and r.table["routed"] is None for r in reports)
    assert any("data-side metrics only" in n for n in reports[0].notes)
    before = [r.table["exposed_ct0"] for r in reports[:5]]
    after = [r.table["exposed_ct0"] for r in reports[5:]]
    assert min(after) > max(before) + 0.2, (before, after)  # content type 0 takes over the exposures
    # the same series is in the workspace, one snapshot per day, as the dashboard plots it
    ws, project = open_project(cfg)
    assert len(ws.list_runs(project.id)) == len(DAYS)
    series = mean_series(cfg, "exposed_ct0")
    assert list(series) == [d.isoformat() for d in DAYS]
    assert min(list(series.values())[5:]) > max(list(series.values())[:5]) + 0.2, series
    html = reports[-1].html_report
    assert html.exists() and html.stat().st_size > 10_000


@pytest.mark.slow
def test_rerun_replaces_the_days_snapshot(shifting):
    from monitoring.daily import monitor_day, read_monitor
    from monitoring.dashboards import open_project

    cfg, reports = shifting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = monitor_day(cfg, DAYS[-1], champion=None)
    ws, project = open_project(cfg)
    assert len(ws.list_runs(project.id)) == len(DAYS)
    assert again.table == reports[-1].table
    assert read_monitor(cfg, DAYS[-1])["snapshot_id"] == again.snapshot_id
    assert json.loads(again.table_path.read_text())["exposed_ct0"] == again.table["exposed_ct0"]


# ---- alert rules (no data needed) -----------------------------------------------------------------
def test_alert_rules_follow_params(make_cfg):
    from monitoring.daily import evaluate_alerts

    cfg = make_cfg()
    today = {"routed": 0.18, "near_margin": 0.10, "hard_neg": 0.56}
    ref = {"routed": 0.12, "near_margin": 0.09, "hard_neg": 0.57}
    rules = [a.rule for a in evaluate_alerts(cfg, today, ref, drift_share=0.1, prediction_drift=None)]
    assert rules == ["routed_share_abs_change", "routed_share_rel_change"]
    assert evaluate_alerts(cfg, today, None, None, None) == []  # no reference yet: no change alert
    off = cfg.updated(
        {"monitor.alerts.routed_share_abs_change": None, "monitor.alerts.routed_share_rel_change": None}
    )
    assert evaluate_alerts(off, today, ref, 0.1, None) == []  # a null rule is off
    ceiling = [a.rule for a in evaluate_alerts(cfg, today, today, drift_share=0.6, prediction_drift=None)]
    assert ceiling == ["drift_share_max"]
    missing = {"routed": None, "near_margin": None, "hard_neg": 0.56}
    assert evaluate_alerts(cfg, missing, ref, 0.1, None) == []  # no champion: model rules skipped


# ---- the dashboard, rendered -----------------------------------------------------------------------
@pytest.mark.slow
def test_dashboard_screenshot_has_one_point_per_day(shifting, tmp_path):
    from monitoring.screenshot import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cfg, _ = shifting
    out = screenshot(cfg, tmp_path / "dashboard.png", height=1500)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (1400, 1500), (width, height)
    # a rendered dashboard compresses far worse than a blank page of the same size
    assert len(png) > 20_000
