"""MLflow registry and promotion gate against a real SQLite registry in a temp dir.

One scenario, run once per module (training and MLflow start-up are the expensive parts), with
real models trained on the tiny simulated window:

  v1  a barely trained model (a handful of steps at a tiny learning rate): the first model,
      promoted because it clears the (test-lowered) floors;
  v2  a properly trained model: beats v1 on the same eval set, promoted; v1 becomes ``previous``;
  v3  barely trained again (another seed): rejected against v2, reason in the blessing,
      ``champion`` unchanged, ``challenger`` set;
  then the same day with a NaN metric is rejected; ``hap rollback`` restores v1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from hap.core import layout
from hap.data import markers

DAY = dt.date(2026, 11, 3)  # window 11-02..11-03, evaluated on 11-03's held-out requests
FLOORS = {"recall@50": 0.0, "gauc": 0.3}  # low: the barely trained first model must clear them
WEAK = {"train.epochs": 1, "train.lr": 1e-6}
GOOD = {"train.epochs": 2, "train.diagnostics_every": 1}
SAME_QUALITY_MARGIN = 0.05  # the tiny eval day has 24 requests: same-quality models differ by ~0.01


def _train_eval(cfg, overrides):
    from hap.model.evaluate import evaluate_day
    from hap.model.train import train_day

    run_cfg = cfg.updated(overrides)
    train_day(run_cfg, DAY)
    return evaluate_day(run_cfg, DAY)


@pytest.fixture(scope="module")
def scenario(tiny_lake, tmp_path_factory):
    from hap.data.split import build_training_set
    from hap.registry import gate
    from hap.registry import registration as registry

    home = tmp_path_factory.mktemp("registry") / "data"
    # slices of the tiny eval day hold a dozen clicked requests: their paired interval spans ~0.35
    # between any two models, so the slice rule gets a tolerance that only a collapse exceeds
    cfg = tiny_config(
        home,
        paths__lake=str(tiny_lake.path("lake")),
        gate__floors=FLOORS,
        gate__max_slice_regression=0.35,
        gate__margin=0.0,
        model__hash_buckets=4096,
        evaluate__latency_repeats=1,
        routing__serve="hap",  # the registered pyfunc must carry the router, not only the light model
        # the gate's mechanics are under test here, on today's towers: two tiny epochs with the cross
        # features and the stage loss trade the 13-request expose_neg slice (-0.13) for the others
        # (on the default world every slice improves: bench/results/model_quality.md)
        train__stage_weight=0.0,
        model__cross_features=[],
    )
    for day in layout.window(DAY + dt.timedelta(days=1), 3):
        markers.mark_validated(cfg, day, {"note": "validated in tiny_lake"})
    build_training_set(cfg, DAY)

    out: dict = {"cfg": cfg, "seconds": {}}

    def step(key, fn, *args):
        start = time.perf_counter()
        out[key] = fn(*args)
        out["seconds"][key] = round(time.perf_counter() - start, 1)

    step("eval1", _train_eval, cfg, WEAK)
    step("v1", registry.register_day, cfg, DAY)
    step("v1_again", registry.register_day, cfg, DAY)
    step("b1", gate.gate_day, cfg, DAY)

    step("eval2", _train_eval, cfg, GOOD)
    step("v2", registry.register_day, cfg, DAY)
    step("b2", gate.gate_day, cfg, DAY)
    out["example"] = registry.input_example(cfg, DAY)
    step("v2_scores", lambda: registry.load_champion(cfg).predict(out["example"]))

    step("eval3", _train_eval, cfg, {**WEAK, "train.seed": 8})
    step("v3", registry.register_day, cfg, DAY)
    step("b3", gate.gate_day, cfg, DAY)
    out["b3_file"] = json.loads(gate.blessing_path(cfg, DAY).read_text())

    print("registry scenario seconds:", out["seconds"], file=sys.stderr)
    return out


def test_first_model_is_promoted(scenario):

    b1 = scenario["b1"]
    assert b1.verdict == "pass" and b1.promoted and b1.champion_version is None
    assert b1.challenger_version == scenario["v1"]
    assert b1.smoke_test["passed"] and b1.smoke_test["rows"] > 0
    assert scenario["v1_again"] == scenario["v1"], "re-registering the same bundle must not add a version"


def test_the_smoke_test_fails_on_an_artifact_that_does_not_load_or_scores_otherwise(scenario):
    """The fresh-interpreter check the gate starts beside the champion's re-evaluation: a version
    that cannot be loaded, and scores that differ from the bundle's, each fail it with a reason."""
    from hap.registry import gate

    cfg = scenario["cfg"]
    missing = gate.PendingSmokeTest(cfg, "999").result()
    assert not missing.passed and "failed to load/predict" in missing.reason
    good = gate.PendingSmokeTest(cfg, scenario["v1"])
    rows = good.result().rows
    assert rows > 0
    shifted = gate.PendingSmokeTest(cfg, scenario["v1"]).result([1.0] * rows)
    assert not shifted.passed and "differ from the bundle" in shifted.reason
    stopped = gate.PendingSmokeTest(cfg, scenario["v1"])
    stopped.stop()
    assert stopped.proc.poll() is not None


def test_a_registered_bundle_loads_from_its_day_folder_only_when_it_is_the_artifact(scenario, monkeypatch):
    """``load_bundle_of`` skips MLflow's download when the day's folder hashes to the version's
    ``hap.bundle_hash``; a folder that holds another bundle (the scenario retrains one day's
    folder, so only the last version registered matches it) is never used."""
    import numpy as np

    from hap.core import layout
    from hap.registry import registration as registry
    from hap.registry.pyfunc import score_frame

    cfg, example = scenario["cfg"], scenario["example"]
    folder_hash = registry.bundle_hash(layout.model_dir(cfg, DAY))
    versions = {v.version: v.tags[registry.TAG_BUNDLE_HASH] for v in registry.versions(cfg)}
    matching = [v for v, digest in versions.items() if digest == folder_hash]
    other = next(v for v, digest in versions.items() if digest != folder_hash)
    assert len(matching) == 1
    downloads: list[str] = []
    real = registry.load_model
    monkeypatch.setattr(registry, "load_model", lambda c, v: downloads.append(v) or real(c, v))
    local = registry.load_bundle_of(cfg, matching[0])
    assert downloads == [] and local.exported is not None
    remote = real(cfg, matching[0]).unwrap_python_model()._bundle
    got, want = score_frame(local, example)["score"], score_frame(remote, example)["score"]
    assert np.allclose(got, want, atol=1e-6)
    registry.load_bundle_of(cfg, other)
    assert downloads == [other]


def test_better_model_promoted_old_becomes_previous(scenario):

    cfg, b2 = scenario["cfg"], scenario["b2"]
    assert b2.verdict == "pass", b2.reasons
    assert b2.champion_version == scenario["v1"]
    # the champion was re-evaluated on the same eval set: its metrics equal v1's own evaluation
    primary = cfg.evaluate.primary_metric
    assert b2.champion_metrics[primary] == pytest.approx(scenario["eval1"][primary], abs=1e-9)
    assert b2.challenger_metrics[primary] > b2.champion_metrics[primary]
    gain = next(c for c in b2.checks if c["name"] == f"gain:{primary}")
    assert gain["passed"] and gain["delta"] > 0
    # non-inferiority: the interval over the eval requests, its margin and size are recorded
    assert gain["lower"] > -cfg.gate.margin and gain["n"] == int(b2.challenger_metrics["n_requests"])
    assert b2.thresholds["margin"] == cfg.gate.margin and "interval [" in b2.render()
    assert any(c["name"] == "health:nonfinite" and c["passed"] for c in b2.checks)


def test_monitoring_scores_a_day_with_the_model_that_served_it(scenario):
    """A champion promoted by a day's own run trained on that day: monitoring takes the model it
    replaced (``previous``), unless that one trained on the day too. (Runs before the rollback
    test, which moves the aliases.)"""
    from hap.registry import registration as registry
    from hap.registry import tracking
    from monitoring.champion import from_registry

    cfg = scenario["cfg"]
    champion = registry.alias_version(cfg, registry.CHAMPION)
    previous = registry.alias_version(cfg, registry.PREVIOUS)
    # every version here trained on the window ending DAY: none served DAY out of sample
    got, note = from_registry(cfg, DAY)
    assert got.version == str(champion.version) and note == ""
    client, name = tracking.client(cfg), cfg.gate.model_name
    window = previous.tags[registry.TAG_WINDOW]
    earlier = ",".join(str(DAY - dt.timedelta(days=k)) for k in (3, 2))
    client.set_model_version_tag(name, previous.version, registry.TAG_WINDOW, earlier)
    try:
        got, note = from_registry(cfg, DAY)
        assert got.version == str(previous.version) and f"monitored with v{previous.version}" in note
        later, _ = from_registry(cfg, DAY + dt.timedelta(days=1))  # a day the champion never saw
        assert later.version == str(champion.version)
    finally:
        client.set_model_version_tag(name, previous.version, registry.TAG_WINDOW, window)


def test_degraded_challenger_rejected_champion_unchanged(scenario):
    from hap.registry import gate
    from hap.registry import registration as registry

    cfg, b3 = scenario["cfg"], scenario["b3"]
    assert b3.verdict == "fail" and not b3.promoted
    assert any("not above -margin" in r for r in b3.reasons), b3.reasons
    assert scenario["b3_file"]["verdict"] == "fail" and scenario["b3_file"]["reasons"] == b3.reasons
    assert {"challenger_metrics", "champion_metrics", "thresholds", "checks"} <= set(scenario["b3_file"])
    assert registry.alias_version(cfg, registry.CHAMPION).version == scenario["v2"]
    assert registry.alias_version(cfg, registry.CHALLENGER).version == scenario["v3"]
    tags = registry.version_for_day(cfg, DAY).tags
    assert tags[registry.TAG_VERDICT] == "fail" and "champion" in tags[registry.TAG_REASON]
    assert tags[gate.TAG_MARGIN] == "0" and tags[gate.TAG_INTERVAL].startswith(cfg.evaluate.primary_metric)
    assert tags[gate.TAG_REQUESTS] == str(int(b3.challenger_metrics["n_requests"]))
    # the blessing is also an artifact of the version's run
    from hap.registry import tracking

    run_id = registry.version_for_day(cfg, DAY).run_id
    paths = [a.path for a in tracking.client(cfg).list_artifacts(run_id, "gate")]
    assert "gate/blessing.json" in paths


def test_same_quality_model_is_inside_the_margin(scenario, tmp_path):
    """A fresher model trained like the champion (another seed) passes non-inferiority on the
    same eval requests; the weak v3 does not, at the same margin."""
    from hap.model.evaluate import evaluate_bundle, primary_metric
    from hap.model.metrics import paired_interval
    from hap.model.serving import load_bundle
    from hap.model.train import train_day
    from hap.registry import registration as registry
    from hap.registry.blessing import Interval, non_inferior

    cfg = scenario["cfg"]
    fresh = cfg.updated({**GOOD, "train.seed": 9, "paths.models": str(tmp_path / "models")})
    train_day(fresh, DAY)
    eval_set = layout.eval_set(cfg, DAY)
    primary = primary_metric(cfg, scenario["eval2"])
    e = cfg.evaluate

    def interval(challenger, champion):
        pair = (challenger.vectors[f"model/{primary}"], champion.vectors[f"model/{primary}"])
        return Interval(*paired_interval(*pair, e.confidence, e.bootstrap_resamples, e.seed))

    champion = evaluate_bundle(cfg, registry.load_bundle_of(cfg, scenario["v2"]), eval_set)
    same = interval(evaluate_bundle(cfg, load_bundle(layout.model_dir(fresh, DAY)), eval_set), champion)
    weak = interval(evaluate_bundle(cfg, registry.load_bundle_of(cfg, scenario["v3"]), eval_set), champion)
    print(f"{primary}: same-quality {same}, weak {weak}", file=sys.stderr)
    assert non_inferior("gain", primary, same, SAME_QUALITY_MARGIN, (1, 1)).passed
    assert not non_inferior("gain", primary, weak, SAME_QUALITY_MARGIN, (1, 1)).passed
    assert same.n == weak.n == int(champion.metrics["n_requests"])  # every eval request has a truth


def test_run_records_params_history_diagnostics_and_tags(scenario):
    from hap.registry import registration as registry
    from hap.registry import tracking

    cfg = scenario["cfg"]
    client = tracking.client(cfg)
    v2 = client.get_model_version(cfg.gate.model_name, scenario["v2"])
    run = client.get_run(v2.run_id)
    assert run.data.params["train.epochs"] == "2"
    assert any(k.startswith("train/") for k in run.data.metrics)
    assert any(k.startswith("diag/") for k in run.data.metrics)
    assert run.data.metrics["eval/recall_at_50"] == pytest.approx(scenario["eval2"]["recall@50"])
    for tag in (registry.TAG_GIT, registry.TAG_DATA_VERSION, registry.TAG_WINDOW, registry.TAG_DVC_MD5):
        assert v2.tags[tag] and run.data.tags[tag] == v2.tags[tag]
    assert v2.tags[registry.TAG_WINDOW] == "2026-11-02,2026-11-03"


def test_nan_metric_never_promoted(scenario):
    from hap.registry import gate
    from hap.registry import registration as registry

    cfg = scenario["cfg"]
    eval_json = layout.metrics_dir(cfg, DAY) / layout.EVAL_FILE
    saved = eval_json.read_text()
    try:  # the day's metrics, better than the champion's on the primary metric, but gauc is NaN
        metrics = {**scenario["eval2"], "recall@50": 1.0, "gauc": float("nan")}
        eval_json.write_text(json.dumps(metrics))
        b = gate.gate_day(cfg, DAY)
    finally:
        eval_json.write_text(saved)
    assert b.verdict == "fail" and any("gauc" in r and "NaN" in r for r in b.reasons), b.reasons
    assert registry.alias_version(cfg, registry.CHAMPION).version == scenario["v2"]


def test_champion_loads_by_alias_in_fresh_process(scenario):
    from hap.registry import registration as registry
    from hap.registry import tracking

    cfg, example = scenario["cfg"], scenario["example"]
    # the payload is decoded the way `mlflow models serve` decodes a dataframe_split request
    script = (
        "import sys, json, mlflow.pyfunc\n"
        "from mlflow.utils.proto_json_utils import dataframe_from_raw_json\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "df = dataframe_from_raw_json(sys.argv[2], schema=m.metadata.get_input_schema())\n"
        "print('OUT ' + json.dumps([float(x) for x in m.predict(df)['score']]))\n"
    )
    payload = example.to_json(orient="split")
    proc = subprocess.run(
        [sys.executable, "-c", script, registry.model_uri(cfg, "champion"), payload],
        capture_output=True,
        text=True,
        env=tracking.subprocess_env(cfg),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("OUT "))[4:])
    in_process = scenario["v2_scores"]["score"].to_numpy()
    assert len(fresh) == len(example) and np.allclose(fresh, in_process, atol=1e-5)
    assert np.isfinite(in_process).all() and in_process.std() > 0
    routed = scenario["v2_scores"]["routed"].to_numpy()
    assert 0 < routed.sum() < len(routed)


def test_champion_served_over_http_scores_like_in_process(scenario, tmp_path):
    """The endpoint of ``hap serve`` (MLflow's scoring server, started by ``hap.registry.endpoint``)
    answers the example request as the pyfunc does in process: the same ranks and routed set,
    scores within 1e-5; rows of two requests mixed in one payload are ranked per request. Once
    stopped, no process of it is left. (Runs before the rollback test, which moves the champion.)"""
    import pandas as pd

    from hap.registry import endpoint
    from hap.registry import registration as registry
    from hap.registry.pyfunc import OUTPUT_COLUMNS

    cfg, example, expected = scenario["cfg"], scenario["example"], scenario["v2_scores"]
    assert registry.alias_version(cfg, registry.CHAMPION).version == scenario["v2"]
    # a second request: the same candidates in reverse order, interleaved with the first one's rows
    other = example.iloc[::-1].assign(request_id=example["request_id"] + 1)
    mixed = pd.concat([example, other]).sort_index(kind="stable").reset_index(drop=True)
    server = endpoint.start(cfg, tmp_path / "serve.log", port=endpoint.free_port())  # fails if it cannot
    try:
        assert server.target.version == scenario["v2"]
        got = endpoint.score(server.url, example)
        got_mixed = endpoint.score(server.url, mixed)
    finally:
        server.stop()
    assert server.proc.poll() is not None and not server.alive(), "the scoring server outlived stop()"
    assert not endpoint.ping(server.url)

    assert list(got.columns) == list(OUTPUT_COLUMNS) and len(got) == len(expected)
    for column in ("request_id", "item_id", "rank", "routed"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    assert set(got.item_id[got.routed]) == set(expected.item_id[expected.routed])
    for column in ("score", "prob", "light_score"):
        assert np.allclose(got[column], expected[column], atol=1e-5), column
    assert np.allclose(got.expressive_score, expected.expressive_score, atol=1e-5, equal_nan=True)

    # the mixed payload: rows in input order, each request ranked on its own candidates
    assert (got_mixed.item_id.to_numpy() == mixed.item_id.to_numpy()).all()
    by_item = expected.set_index("item_id")
    for _, rows in got_mixed.groupby("request_id"):
        rows = rows.set_index("item_id")
        np.testing.assert_array_equal(rows["rank"], by_item.loc[rows.index, "rank"])
        assert set(rows.index[rows.routed]) == set(expected.item_id[expected.routed])


def test_hap_serve_refuses_a_missing_alias_and_a_taken_port(scenario):
    """``hap serve`` fails in one line, before starting anything: an alias that points nowhere, a
    port something already listens on."""
    import socket

    from typer.testing import CliRunner

    from hap.cli import app
    from hap.core.errors import HapError

    cfg = scenario["cfg"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HAP__")}, "HAP_HOME": str(cfg.home)}
    args = ["--set", f"paths.lake={cfg.path('lake')}"]
    missing = CliRunner().invoke(app, [*args, "serve", "--alias", "nobody"], env=env)
    assert isinstance(missing.exception, HapError) and "no version with alias 'nobody'" in str(
        missing.exception
    )

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "hap.cli", *args, "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: cannot serve on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving " not in proc.stdout


def test_rollback_and_models_cli(scenario, monkeypatch):
    from typer.testing import CliRunner

    from hap.cli import app
    from hap.registry import registration as registry

    cfg = scenario["cfg"]
    env = {"HAP_HOME": str(cfg.home)}
    args = ["--set", f"paths.lake={cfg.path('lake')}"]
    runner = CliRunner()
    listing = runner.invoke(app, [*args, "models"], env=env)
    assert listing.exit_code == 0, listing.output
    row = next(ln for ln in listing.output.splitlines() if ln.startswith(f"v{scenario['v2']} "))
    assert "champion" in row and "pass" in row
    assert "challenger" in next(
        ln for ln in listing.output.splitlines() if ln.startswith(f"v{scenario['v3']} ")
    )

    result = runner.invoke(app, [*args, "rollback"], env=env)
    assert result.exit_code == 0, result.output
    assert registry.alias_version(cfg, registry.CHAMPION).version == scenario["v1"]
    assert registry.alias_version(cfg, registry.PREVIOUS) is None
    again = runner.invoke(app, [*args, "rollback"], env=env)  # nothing before v1
    assert again.exit_code != 0


def test_training_set_fetched_back_with_dvc_from_tags(scenario, tmp_path):
    from hap.data.dvc_repo import fetch_training_set
    from hap.data.versioning import content_hash
    from hap.registry import registration as registry

    cfg = scenario["cfg"]
    tags = registry.version_for_day(cfg, DAY).tags  # the version's own record of its data
    # what the daily flow does after training: the split output is DVC-tracked and pushed
    producer = cfg.home
    out = tags[registry.TAG_DVC_OUT]
    remote = str(cfg.path("dvc_remote"))
    for cmd in (
        ["init", "--no-scm", "-q"],
        ["remote", "add", "-d", "origin", remote],
        ["add", "-q", out],
        ["push", "-q", f"{out}.dvc"],
    ):
        subprocess.run([sys.executable, "-m", "dvc", *cmd], cwd=producer, check=True, capture_output=True)
    dvc_file = (producer / f"{out}.dvc").read_text()
    assert tags[registry.TAG_DVC_MD5] in dvc_file, "our DVC hash must equal the one `dvc add` records"

    fetched = fetch_training_set(tags[registry.TAG_DVC_MD5], remote, tmp_path / "fetch" / "train-set")
    train_rel = Path(tags[registry.TAG_TRAIN_PATH]).relative_to(out)
    version, _ = content_hash(fetched / train_rel)
    assert version == tags[registry.TAG_DATA_VERSION]


def test_an_underpowered_comparison_is_undecided_and_the_policy_decides(scenario, tmp_path):
    """Two models trained alike, compared with a margin of 0 on the tiny eval day: the interval
    straddles -margin and cannot be narrow enough to decide, so the verdict is undecided, never
    fail; ``alert`` keeps the champion and says so, ``promote_if_better`` follows the point estimate."""
    from hap.registry import gate
    from hap.registry import registration as registry

    cfg = scenario["cfg"].updated(
        {
            "gate.model_name": "hap-undecided",  # its own registered model: the scenario's aliases stay
            "gate.margin": 0.0,
            "gate.on_undecided": "alert",
            "paths.models": str(tmp_path / "models"),
            "paths.metrics": str(tmp_path / "metrics"),
        }
    )
    _train_eval(cfg, GOOD)
    first = registry.register_day(cfg, DAY)
    assert gate.gate_day(cfg, DAY).promoted
    _train_eval(cfg, {**GOOD, "train.seed": 9})
    second = registry.register_day(cfg, DAY)
    b = gate.gate_day(cfg, DAY)
    gain = next(c for c in b.checks if c["name"].startswith("gain:"))
    assert b.verdict == "undecided" and not b.promoted and b.alert and b.reasons == [], b.render()
    assert gain["verdict"] == "not_decisive" and gain["lower"] <= 0.0 < gain["upper"]
    assert "undecided: " in b.undecided and "policy alert: champion kept, alert raised" in b.undecided
    head = b.render().splitlines()[0]
    assert "UNDECIDED" in head and "FAIL" not in head and b.undecided in b.render()
    assert registry.alias_version(cfg, registry.CHAMPION).version == first
    assert registry.alias_version(cfg, registry.CHALLENGER).version == second
    tags = registry.version_for_day(cfg, DAY).tags
    assert tags[registry.TAG_VERDICT] == "undecided" and tags[registry.TAG_REASON].startswith("undecided: ")

    keen = cfg.updated({"gate.on_undecided": "promote_if_better"})
    b = gate.gate_day(keen, DAY)
    better = gain["delta"] >= 0.0
    assert b.verdict == "undecided" and b.promoted == better and not b.alert
    assert registry.alias_version(cfg, registry.CHAMPION).version == (second if better else first)
