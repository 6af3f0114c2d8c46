"""Validation: a valid day passes; a corpus of corrupted days each fails clearly and is quarantined.

One valid simulated window is built once per module (two validated and ingested days of history,
then the day under test, landed and not yet validated); each corruption works on a copy of it.
``hap validate`` runs in-process through ``hap.cli.main``, the same code path as the console
script; ``hap run`` runs as the console script against one Prefect server for the module.
"Champion untouched" is checked against a real MLflow registry whose ``champion`` alias is set up
once by the fixture.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from hap.core import layout, schema
from hap.core.errors import DataContractError, NotValidated, ValidationFailed
from hap.data import lake, markers
from hap.data.suite_json import BETWEEN, IN_SET, NOT_NULL, UNIQUE_TOGETHER

DAY = dt.date(2026, 11, 3)
HISTORY = [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
OVERRIDES = {
    "simulate.requests_per_day": 150,
    "validation.data_docs": False,
    "validation.fullflow_min_requests": 10,  # a tiny day logs ~15 full-flow requests
}


def _cfg(home: Path, **kw):
    return tiny_config(home, **{k.replace(".", "__"): v for k, v in {**OVERRIDES, **kw}.items()})


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow registry holding one model version under the ``champion`` alias."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = _cfg(tmp_path_factory.mktemp("x")).gate.model_name
    client.create_registered_model(name)
    mv = client.create_model_version(name, source="file:///champion-model", run_id=None)
    client.set_registered_model_alias(name, "champion", mv.version)
    del mlflow
    return uri


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with two validated, ingested days and ``DAY`` landed, not yet validated."""
    from hap.data.ingest import ingest_day
    from hap.data.validate import validate_day
    from hap.sources.simulator import simulate_day

    home = tmp_path_factory.mktemp("pristine") / "data"
    cfg = _cfg(home)
    for date in [*HISTORY, DAY]:
        simulate_day(cfg, date, progress=False)
    for date in HISTORY:
        validate_day(cfg, date)
        ingest_day(cfg, date)
    return home


@pytest.fixture
def day_copy(pristine: Path, tmp_path: Path) -> Path:
    home = tmp_path / "data"
    shutil.copytree(pristine, home)
    return home


def run_cli(
    home: Path,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    registry: str | None = None,
    **overrides,
) -> tuple[int, str]:
    """Run ``hap COMMAND --date DAY`` in-process; returns (exit code, stdout + stderr)."""
    from hap import cli

    monkeypatch.setenv("HAP_HOME", str(home))
    if registry:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    sets = {**OVERRIDES, **overrides}
    argv = ["hap", *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")], command]
    argv += ["--date", DAY.isoformat()]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- corruptions: each takes the landing folder of DAY and breaks it ---------------------------------
# what a FAIL line names: the file, and the expectation (its kind and, up to its bounds, its column)
EXPOSURE, RANKING, FULLFLOW = "exposure.parquet", "ranking.parquet", "fullflow.parquet"
TYPE_CHECK = "expect_column_pair_values_to_be_equal"  # each column has its contract Arrow type


def _rw(folder: Path, name: str, fn: Callable[[pa.Table], pa.Table]) -> None:
    path = folder / f"{name}.parquet"
    pq.write_table(fn(pq.read_table(path)), path)


def _set(table: pa.Table, column: str, mask: np.ndarray, value) -> pa.Table:
    col = table[column].combine_chunks()
    values = col.to_numpy(zero_copy_only=False).copy()
    values[mask] = value
    arr = pa.array(values, type=col.type, mask=col.is_null().to_numpy(zero_copy_only=False) & ~mask)
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), arr)


def _first(table: pa.Table, n: int, where: np.ndarray | None = None) -> np.ndarray:
    mask = np.zeros(table.num_rows, bool)
    idx = np.flatnonzero(where) if where is not None else np.arange(table.num_rows)
    mask[idx[:n]] = True
    return mask


def _source_is(table: pa.Table, source: str) -> np.ndarray:
    return pc.equal(table["source"], source).to_numpy(zero_copy_only=False)


def missing_column(d: Path) -> None:
    _rw(d, "exposure", lambda t: t.drop_columns(["click"]))


def wrong_dtype(d: Path) -> None:
    _rw(
        d,
        "exposure",
        lambda t: t.set_column(
            t.schema.get_field_index("position"), "position", pc.cast(t["position"], pa.string())
        ),
    )


def null_keys(d: Path) -> None:
    def fn(t):
        col = t["item_id"].combine_chunks()
        mask = _first(t, 3)
        return t.set_column(
            t.schema.get_field_index("item_id"),
            pa.field("item_id", pa.int64()),
            pa.array(col.to_numpy(), pa.int64(), mask=mask),
        )

    _rw(d, "ranking", fn)


def duplicate_keys(d: Path) -> None:
    _rw(d, "ranking", lambda t: pa.concat_tables([t, t.slice(0, 4)]))


def label_out_of_range(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "click", _first(t, 5), 2))


def negative_position(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "position", _first(t, 4), -1))


def rank_neg_above_cut(d: Path) -> None:
    _rw(d, "ranking", lambda t: _set(t, "rank_pos", _first(t, 6, _source_is(t, "rank_neg")), 7))


def prerank_neg_above_cut(d: Path) -> None:
    _rw(d, "ranking", lambda t: _set(t, "prerank_pos", _first(t, 6, _source_is(t, "prerank_neg")), 150))


def timestamps_other_day(d: Path) -> None:
    def fn(t):
        ts = t["timestamp"].combine_chunks().cast(pa.int64()).to_numpy().copy()
        ts[:7] += 86_400_000
        return t.set_column(
            t.schema.get_field_index("timestamp"),
            t.schema.field("timestamp"),
            pa.array(ts).cast(schema.TIMESTAMP),
        )

    _rw(d, "exposure", fn)


def empty_day(d: Path) -> None:
    for name in schema.RAW_LOGS:
        _rw(d, name, lambda t: t.slice(0, 0))


def truncated_file(d: Path) -> None:
    path = d / "ranking.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_byte_file(d: Path) -> None:
    (d / "exposure.parquet").write_bytes(b"")


def missing_file(d: Path) -> None:
    (d / "fullflow.parquet").unlink()


def missing_day(d: Path) -> None:
    shutil.rmtree(d)


def ctr_zero(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "click", np.ones(t.num_rows, bool), 0))


def volume_drop(d: Path) -> None:
    exposure = pq.read_table(d / "exposure.parquet")
    ids = np.unique(exposure["request_id"].to_numpy())
    keep = pa.array(ids[: len(ids) // 2])
    for name in schema.RAW_LOGS:
        _rw(d, name, lambda t: t.filter(pc.is_in(t["request_id"], keep)))


def exposure_without_ranking_row(d: Path) -> None:
    def fn(t):
        exposed = np.flatnonzero(_source_is(t, "exposed"))
        drop = np.zeros(t.num_rows, bool)
        drop[exposed[[0, 15, 30]]] = True
        return t.filter(pa.array(~drop))

    _rw(d, "ranking", fn)


def unknown_source(d: Path) -> None:
    def fn(t):
        src = t["source"].to_numpy(zero_copy_only=False).astype(object)
        src[np.flatnonzero(src == "global_neg")[:3]] = "bogus_neg"
        return t.set_column(
            t.schema.get_field_index("source"), t.schema.field("source"), pa.array(src, pa.string())
        )

    _rw(d, "ranking", fn)


def sampling_count(d: Path) -> None:
    def fn(t):
        rank_neg = np.flatnonzero(_source_is(t, "rank_neg"))
        keep = np.ones(t.num_rows, bool)
        keep[rank_neg[:3]] = False  # the first request loses 3 of its rank_neg
        return t.filter(pa.array(keep))

    _rw(d, "ranking", fn)


# (corruption, file it names, expectation it names, a detail on the same line)
CORPUS = [
    (missing_column, EXPOSURE, f"{IN_SET}(column=in_file", "'column': 'click'"),
    (wrong_dtype, EXPOSURE, TYPE_CHECK, "'arrow_type': 'string'"),
    (null_keys, RANKING, f"{NOT_NULL}(column=item_id)", "3 bad row(s)"),
    (duplicate_keys, RANKING, UNIQUE_TOGETHER, "8 bad row(s)"),
    (label_out_of_range, EXPOSURE, f"{IN_SET}(column=click", "5 bad row(s)"),
    (negative_position, EXPOSURE, f"{BETWEEN}(column=position", "4 bad row(s)"),
    (rank_neg_above_cut, RANKING, "ranking_log.rank_neg_positions", "6 bad row(s)"),
    (prerank_neg_above_cut, RANKING, "ranking_log.prerank_neg_positions", "6 bad row(s)"),
    (timestamps_other_day, EXPOSURE, f"{BETWEEN}(column=timestamp", "7 bad row(s)"),
    (empty_day, EXPOSURE, f"{BETWEEN}(column=rows", "observed 0"),
    (truncated_file, RANKING, "parquet_readable", "truncated or corrupt"),
    (zero_byte_file, EXPOSURE, "file_not_empty", "zero-byte"),
    (missing_file, FULLFLOW, "file_exists", "never landed"),
    (missing_day, "landing/dt=2026-11-03", "day_exists", "missing day"),
    (ctr_zero, EXPOSURE, f"{BETWEEN}(column=ctr", "observed 0"),
    (volume_drop, EXPOSURE, f"{BETWEEN}(column=rows", "observed 750"),
    (exposure_without_ranking_row, EXPOSURE, f"{IN_SET}(column=has_ranking_row", "3 bad row(s)"),
    (unknown_source, RANKING, f"{IN_SET}(column=source", "3 bad row(s)"),
    (sampling_count, RANKING, f"{BETWEEN}(column=n_rank_neg", "1 bad row(s)"),
]


@pytest.mark.parametrize("corrupt,file,expectation,detail", CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_corruption_is_caught_and_quarantined(
    corrupt, file, expectation, detail, day_copy, registry_uri, monkeypatch, capsys
):
    cfg = _cfg(day_copy)
    landing = layout.landing_day(cfg, DAY)
    corrupt(landing)

    code, out = run_cli(day_copy, "validate", monkeypatch, capsys, registry_uri)

    # a clear message, no traceback, a non-zero exit
    assert code == ValidationFailed.exit_code, out
    assert "Traceback" not in out
    assert f"validation of {DAY} failed" in out
    fail_lines = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    hit = [line for line in fail_lines if file in line and expectation in line and "[suite " in line]
    assert hit, f"no FAIL line names {file} / {expectation}:\n{out}"
    assert any(detail in line for line in hit), f"{detail!r} missing from:\n{out}"
    assert "release-quarantine" in out
    # quarantine: the day's data moved out of the pipeline, with its validation result
    qdir = layout.quarantine_day(cfg, DAY)
    result = json.loads((qdir / layout.QUARANTINE_RESULT_FILE).read_text())
    assert result["reason"]["status"] == "failed" and result["reason"]["failed"]
    assert not landing.exists()
    if corrupt is not missing_day:
        assert (qdir / "landing").is_dir()
    for table in layout.LAKE_TABLES:  # validation runs before ingest: nothing was published
        assert not lake.has_day(cfg, table, DAY)
        assert not (qdir / "lake").exists()
    # no downstream output; downstream steps refuse the day
    assert not markers.marker_path(cfg, DAY).exists()
    with pytest.raises(NotValidated, match="quarantined"):
        markers.require_validated(cfg, [DAY], "split")
    assert not layout.training_set(cfg, DAY).exists()
    assert not layout.model_dir(cfg, DAY).exists() and not cfg.path("models").exists()
    assert not layout.metrics_dir(cfg, DAY).exists()
    # the champion is untouched
    from hap.registry import registration as registry

    champion = registry.alias_version(cfg, "champion")
    assert champion is not None and str(champion.version) == "1"
    assert [str(v.version) for v in registry.versions(cfg)] == ["1"]


def test_corpus_is_large_enough():
    assert len({c[0].__name__ for c in CORPUS}) >= 15


def test_valid_day_passes_with_marker_summary_and_docs(day_copy, monkeypatch, capsys):
    code, out = run_cli(day_copy, "validate", monkeypatch, capsys, **{"validation.data_docs": True})
    assert code == 0, out
    assert f"validated {DAY}" in out
    cfg = _cfg(day_copy)
    assert markers.is_validated(cfg, DAY)
    markers.require_validated(cfg, [*HISTORY, DAY], "split")
    summary = json.loads((layout.validation_day(cfg, DAY) / layout.VALIDATION_SUMMARY_FILE).read_text())
    assert summary["status"] == "passed" and summary["failed"] == [] and summary["passed"] >= 40
    assert (
        summary["params"]["exposure_history_days"] == "2" or summary["params"]["exposure_history_days"] == 2
    )
    docs = layout.validation_day(cfg, DAY) / "docs"
    assert (docs / "index.html").exists()
    assert list((docs / "validations").rglob("*.html")), "no validation result page in the Data Docs"


def test_every_expectation_of_the_suites_runs_on_a_valid_day(day_copy):
    """Each expectation's ``meta.batch`` names a frame validation builds: one that names no frame
    would never run, and its check would silently pass."""
    from collections import Counter

    from hap.data.suites import SUITE_FILES, load_suite_json
    from hap.data.validate import check_day

    report = check_day(_cfg(day_copy), DAY)
    ran = Counter(f.suite for f in report.findings)
    for table in ("landing", *schema.RAW_LOGS):
        suite = load_suite_json(table)
        expected = Counter(f"{suite['name']}.{e['meta']['batch']}" for e in suite["expectations"])
        for batch, n in expected.items():
            if batch.endswith(".drift") and not report.profile:
                continue
            assert ran[batch] == n, f"{SUITE_FILES[table]}: {n} expectation(s) of {batch}, {ran[batch]} ran"


def test_extra_column_warns_by_default_and_fails_when_configured(day_copy, monkeypatch, capsys):
    cfg = _cfg(day_copy)
    _rw(
        layout.landing_day(cfg, DAY),
        "exposure",
        lambda t: t.append_column("debug_flag", pa.array(np.zeros(t.num_rows, np.int8))),
    )
    code, out = run_cli(day_copy, "validate", monkeypatch, capsys)
    assert code == 0, out
    assert "WARN" in out and "'column': 'debug_flag'" in out
    assert markers.is_validated(cfg, DAY)

    code, out = run_cli(day_copy, "validate", monkeypatch, capsys, **{"validation.extra_columns": "fail"})
    assert code == ValidationFailed.exit_code
    assert "FAIL" in out and "debug_flag" in out
    assert markers.is_quarantined(cfg, DAY) and not markers.marker_path(cfg, DAY).exists()


def test_release_quarantine_after_a_fix(day_copy, monkeypatch, capsys):
    from hap.data.ingest import ingest_day

    cfg = _cfg(day_copy)
    landing = layout.landing_day(cfg, DAY)
    good = day_copy.parent / "good"
    shutil.copytree(landing, good)
    label_out_of_range(landing)
    code, _ = run_cli(day_copy, "validate", monkeypatch, capsys)
    assert code == ValidationFailed.exit_code
    # a quarantined day is refused until released
    code, out = run_cli(day_copy, "validate", monkeypatch, capsys)
    assert code == ValidationFailed.exit_code and "in quarantine" in out
    # the operator fixes the files in place, in the quarantine folder, then releases the day
    qlanding = layout.quarantine_day(cfg, DAY) / "landing"
    shutil.rmtree(qlanding)
    shutil.copytree(good, qlanding)
    code, out = run_cli(day_copy, "release-quarantine", monkeypatch, capsys)
    assert code == 0, out
    assert "released" in out and not markers.is_quarantined(cfg, DAY) and landing.is_dir()
    assert list((cfg.path("quarantine") / ".released").iterdir()), "the quarantine record is archived"
    # ingest refuses a released day until it passes validation again
    code, out = run_cli(day_copy, "ingest", monkeypatch, capsys)
    assert code == NotValidated.exit_code and "hap validate" in out
    assert not lake.has_day(cfg, "samples", DAY)
    code, out = run_cli(day_copy, "validate", monkeypatch, capsys)
    assert code == 0, out
    assert markers.is_validated(cfg, DAY)
    ingest_day(cfg, DAY)
    assert lake.has_day(cfg, "samples", DAY)
    code, out = run_cli(day_copy, "release-quarantine", monkeypatch, capsys)
    assert code != 0 and "not in quarantine" in out


def test_ingest_contract_error_quarantines_the_day(day_copy):
    """Ingest quarantines a day whose raw log breaks its contract (here one it was told to trust)."""
    from hap.data.ingest import ingest_day

    cfg = _cfg(day_copy)
    truncated_file(layout.landing_day(cfg, DAY))
    with pytest.raises(DataContractError, match="release-quarantine"):
        ingest_day(cfg, DAY, require_validated=False)
    qdir = layout.quarantine_day(cfg, DAY)
    result = json.loads((qdir / layout.QUARANTINE_RESULT_FILE).read_text())
    assert result["reason"]["step"] == "ingest" and "ranking.parquet" in result["reason"]["error"]
    assert (qdir / "landing" / "ranking.parquet").exists()
    assert not layout.landing_day(cfg, DAY).exists()
    with pytest.raises(NotValidated):
        markers.require_validated(cfg, [DAY], "train")


def test_suites_in_sync_with_schema():
    """``expectations/*.json`` are what ``hap.suites`` generates from ``hap.schema``."""
    from hap.data import suites

    for table in suites.SUITE_FILES:
        assert suites.load_suite_json(table) == json.loads(suites.render(table)), (
            f"run `python -m hap.data.suites`: {suites.SUITE_FILES[table]} is stale"
        )


def test_training_set_suite(pristine, tmp_path):
    """The training-set suite passes on a real split and catches a mislabelled sample."""
    from hap.data import split
    from hap.data.validate import validate_training_set

    home = tmp_path / "data"
    shutil.copytree(pristine, home)
    cfg = _cfg(home)
    end = HISTORY[-1]
    split.build_training_set(cfg, end)
    report = validate_training_set(cfg, end)
    assert report.success and report.rows
    part = next(layout.training_set(cfg, end).glob("difficulty=hard/*.parquet"))
    table = pq.read_table(part)
    pq.write_table(_set(table, "label", _first(table, 2), 1), part)
    with pytest.raises(ValidationFailed, match="negatives are labelled 0"):
        validate_training_set(cfg, end)


DRIFT_START = dt.date(2026, 11, 4)
TEN_DAYS = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(10)]


def _drift_cfg(home: Path, scenario: str):
    return _cfg(
        home,
        **{
            "simulate.scenario": scenario,
            "simulate.drift_start": DRIFT_START.isoformat(),
            "simulate.drift_ramp_days": 3,
        },
    )


def _simulate_validate_ingest(cfg, date: dt.date) -> None:
    from hap.data.ingest import ingest_day
    from hap.data.validate import validate_day
    from hap.sources.simulator import simulate_day

    simulate_day(cfg, date, progress=False)
    report = validate_day(cfg, date)
    assert report.success and not report.warnings, report.render()
    ingest_day(cfg, date)


@pytest.fixture(scope="module")
def before_drift(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The days before the drift starts, validated once: every scenario's drift strength is 0
    before ``drift_start``, so these days are the same bytes in all three scenarios."""
    root = tmp_path_factory.mktemp("before_drift") / "data"
    cfg = _drift_cfg(root, "stable")
    for date in [d for d in TEN_DAYS if d < DRIFT_START]:
        _simulate_validate_ingest(cfg, date)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["stable", "retrieval_degrades", "content_shift"])
def test_no_false_alarm_over_ten_days(scenario, before_drift, tmp_path):
    home = tmp_path / "data"
    shutil.copytree(before_drift, home)
    cfg = _drift_cfg(home, scenario)
    for date in [d for d in TEN_DAYS if d >= DRIFT_START]:
        _simulate_validate_ingest(cfg, date)


def test_days_before_the_drift_are_the_same_in_every_scenario(tmp_path):
    """What lets the no-false-alarm tests share their first days."""
    from hap.sources.simulator import simulate_day

    day = DRIFT_START - dt.timedelta(days=1)
    digests = set()
    for scenario in ("stable", "retrieval_degrades", "content_shift"):
        cfg = _drift_cfg(tmp_path / scenario, scenario)
        simulate_day(cfg, day, progress=False)
        landing = layout.landing_day(cfg, day)
        digests.add(tuple(pq.read_table(f).to_pandas().to_json() for f in sorted(landing.glob("*.parquet"))))
    assert len(digests) == 1


# ---- upstream faults, one or more per class, through `hap validate` and `hap run` ---------------------
BUCKETS = 262_144  # contract.hash_buckets of params.yaml


def _requests(d: Path) -> np.ndarray:
    return np.unique(pq.read_table(d / "exposure.parquet")["request_id"].to_numpy())


def nan_dense_feature(d: Path) -> None:
    _rw(d, "ranking", lambda t: _set(t, "i_ctr", _first(t, 5), np.nan))


def inf_request_feature(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "u_activity", _first(t, 4), np.inf))


def absurd_magnitude_in_eval_log(d: Path) -> None:
    _rw(d, "fullflow", lambda t: _set(t, "i_followers", _first(t, 3), 3.0e12))


def id_outside_hash_space(d: Path) -> None:
    _rw(d, "ranking", lambda t: _set(t, "i_category", _first(t, 3), BUCKETS + 5))


def negative_user_id(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "user_id", _first(t, 2), -7))


def position_gap(d: Path) -> None:
    """The first request loses its display position 3 (both logs agree): positions 1,2,4..10."""
    exposure = pq.read_table(d / "exposure.parquet")
    first = exposure["request_id"][0].as_py()
    row = np.flatnonzero(
        (exposure["request_id"].to_numpy() == first) & (exposure["position"].to_numpy() == 3)
    )[0]
    item = exposure["item_id"][int(row)].as_py()
    keep = np.ones(exposure.num_rows, bool)
    keep[row] = False
    pq.write_table(exposure.filter(pa.array(keep)), d / "exposure.parquet")
    _rw(
        d,
        "ranking",
        lambda t: t.filter(
            pc.invert(pc.and_(pc.equal(t["request_id"], first), pc.equal(t["item_id"], item)))
        ),
    )


def _map_sequences(t: pa.Table, rows: int, fn) -> pa.Table:
    col = t[schema.USER_SEQUENCE].to_pylist()
    for i in range(rows):
        col[i] = fn(col[i])
    idx = t.schema.get_field_index(schema.USER_SEQUENCE)
    return t.set_column(idx, t.schema.field(idx), pa.array(col, t.schema.field(idx).type))


def click_sequence_too_short(d: Path) -> None:
    _rw(d, "exposure", lambda t: _map_sequences(t, 3, lambda s: s[:-1]))


def click_sequence_out_of_space(d: Path) -> None:
    _rw(d, "exposure", lambda t: _map_sequences(t, 2, lambda s: [BUCKETS + 1, *s[1:]]))


def like_without_click(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "like", _first(t, 4, t["click"].to_numpy() == 0), 1))


def absurd_dwell(d: Path) -> None:
    _rw(d, "exposure", lambda t: _set(t, "dwell", _first(t, 3), 1.0e6))


def collapsed_feature(d: Path) -> None:
    """A broken upstream hash: every request gets the same city."""
    _rw(d, "exposure", lambda t: _set(t, "u_city", np.ones(t.num_rows, bool), 4242))


def content_mix_jump(d: Path) -> None:
    for name in ("exposure", "ranking", "fullflow"):
        _rw(d, name, lambda t: _set(t, "content_type", np.ones(t.num_rows, bool), 0))


def clicks_move_to_last_positions(d: Path) -> None:
    """Each request keeps its click count, but its clicks sit on its last display positions."""

    def fn(t: pa.Table) -> pa.Table:
        frame = t.select(["request_id", "position", "click"]).to_pandas()
        clicks = frame.groupby("request_id")["click"].transform("sum")
        last = frame.groupby("request_id")["position"].transform("max")
        moved = (frame["position"] > last - clicks).astype(np.int8).to_numpy()
        idx = t.schema.get_field_index("click")
        return t.set_column(idx, t.schema.field(idx), pa.array(moved, pa.int8()))

    # like/comment/share follow their click: clear them so only the position pattern changes
    _rw(d, "exposure", fn)
    for col in ("like", "comment", "share"):
        _rw(d, "exposure", lambda t, c=col: _set(t, c, np.ones(t.num_rows, bool), 0))


def _with_new_request_ids(t: pa.Table, offset: int) -> pa.Table:
    idx = t.schema.get_field_index("request_id")
    return t.set_column(idx, t.schema.field(idx), pc.add(t["request_id"], pa.scalar(offset, pa.int64())))


def day_at_twice_the_volume(d: Path) -> None:
    """The day's logs duplicated under new request ids: exactly 2x the trailing volume."""
    for name in schema.RAW_LOGS:
        _rw(d, name, lambda t: pa.concat_tables([t, _with_new_request_ids(t, 5_000_000)]))


def requests_duplicated_under_new_ids(d: Path) -> None:
    keep = pa.array(_requests(d)[:5])
    for name in schema.RAW_LOGS:
        _rw(
            d,
            name,
            lambda t: pa.concat_tables(
                [t, _with_new_request_ids(t.filter(pc.is_in(t["request_id"], keep)), 5_000_000)]
            ),
        )


def late_file_in_the_day(d: Path) -> None:
    shutil.copy(d / "exposure.parquet", d / "exposure-late-0001.parquet")


def eval_log_without_clicks(d: Path) -> None:
    _rw(d, "fullflow", lambda t: _set(t, "click", np.ones(t.num_rows, bool), 0))


def eval_requests_missing_from_exposure_log(d: Path) -> None:
    def fn(t: pa.Table) -> pa.Table:
        ids = t["request_id"].to_numpy().copy()
        ids[ids == ids[0]] += 9_000_000  # one full-flow request under an id nobody exposed
        idx = t.schema.get_field_index("request_id")
        return t.set_column(idx, t.schema.field(idx), pa.array(ids, pa.int64()))

    _rw(d, "fullflow", fn)


def eval_sample_too_small(d: Path) -> None:
    def fn(t: pa.Table) -> pa.Table:
        keep = pa.array(np.unique(t["request_id"].to_numpy())[:3])
        return t.filter(pc.is_in(t["request_id"], keep))

    _rw(d, "fullflow", fn)


def not_parquet(d: Path) -> None:
    pq.read_table(d / "exposure.parquet").slice(0, 50).to_pandas().to_csv(d / "exposure.parquet")


def renamed_column(d: Path) -> None:
    _rw(
        d,
        "exposure",
        lambda t: t.rename_columns(["dwell_time" if c == "dwell" else c for c in t.column_names]),
    )


def timestamp_in_microseconds(d: Path) -> None:
    def fn(t: pa.Table) -> pa.Table:
        idx = t.schema.get_field_index("timestamp")
        return t.set_column(idx, "timestamp", t["timestamp"].cast(pa.timestamp("us", tz="UTC")))

    _rw(d, "exposure", fn)


def key_in_narrower_integer(d: Path) -> None:
    def fn(t: pa.Table) -> pa.Table:
        idx = t.schema.get_field_index("item_id")
        return t.set_column(idx, "item_id", t["item_id"].cast(pa.int32()))

    _rw(d, "ranking", fn)


# (fault class, corruption, file named, expectation named, detail on the same line)
FAULTS = [
    (1, nan_dense_feature, RANKING, f"{NOT_NULL}(column=i_ctr)", "5 bad row(s)"),
    (1, inf_request_feature, EXPOSURE, f"{BETWEEN}(column=u_activity", "4 bad row(s)"),
    (1, absurd_magnitude_in_eval_log, FULLFLOW, "(column=i_followers", "3 bad row(s)"),
    (2, id_outside_hash_space, RANKING, "(column=i_category", "3 bad row(s)"),
    (2, negative_user_id, EXPOSURE, "(column=user_id", "2 bad row(s)"),
    (3, position_gap, "(per request)", "(column=position_gap", "1 bad row(s)"),
    (3, click_sequence_too_short, EXPOSURE, "(column=u_click_seq_len", "3 bad row(s)"),
    (3, click_sequence_out_of_space, EXPOSURE, "(column=u_click_seq_max", "2 bad row(s)"),
    (4, like_without_click, EXPOSURE, "(column=engaged_without_click", "4 bad row(s)"),
    (4, absurd_dwell, EXPOSURE, f"{BETWEEN}(column=dwell", "3 bad row(s)"),
    (5, collapsed_feature, "trailing days", 'row_condition=check=="distinct_ratio"', "u_city"),
    (5, content_mix_jump, "trailing days", 'row_condition=check=="content_mix_tvd"', "content_mix"),
    (
        5,
        clicks_move_to_last_positions,
        "trailing days",
        'row_condition=check=="click_position_tvd"',
        "click_position",
    ),
    (6, day_at_twice_the_volume, EXPOSURE, "(column=rows", "observed 3000"),
    (6, requests_duplicated_under_new_ids, "(per request)", "(column=content_key", "10 bad row(s)"),
    (6, late_file_in_the_day, "landing/dt=2026-11-03", "(column=known", "exposure-late-0001.parquet"),
    (7, eval_log_without_clicks, FULLFLOW, f"{BETWEEN}(column=clicks", "observed 0"),
    (7, eval_requests_missing_from_exposure_log, FULLFLOW, "(column=in_exposure_log", "bad row(s)"),
    (7, eval_sample_too_small, FULLFLOW, f"{BETWEEN}(column=requests", "observed 3"),
    (8, not_parquet, EXPOSURE, "parquet_readable", "truncated or corrupt"),
    (8, renamed_column, EXPOSURE, f"{IN_SET}(column=in_file", "'column': 'dwell'"),
    (8, timestamp_in_microseconds, EXPOSURE, TYPE_CHECK, "timestamp[us"),
    (8, key_in_narrower_integer, RANKING, TYPE_CHECK, "'arrow_type': 'int32'"),
]


# The daily flow runs the same validation as `hap validate`: the first case of each fault class
# also goes through `hap run` (exit code, message, quarantine, nothing published), which proves the
# flow's wiring for that class; the other cases go through `hap validate` only.
THROUGH_RUN = {next(f[1].__name__ for f in FAULTS if f[0] == k) for k in sorted({f[0] for f in FAULTS})}


def run_flow(home: Path, date: dt.date, registry: str) -> tuple[int, str]:
    """``hap run --date D``: the console script in a subprocess, against the module's Prefect server."""
    import os
    import subprocess

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "HAP_HOME": str(home), "MLFLOW_TRACKING_URI": registry}
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    hap = Path(sys.executable).parent / "hap"
    proc = subprocess.run(
        [str(hap), *sets, "run", "--date", date.isoformat()], env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout + proc.stderr


def _assert_clean_rejection(out: str, code: int, file: str, expectation: str, detail: str) -> None:
    assert code == ValidationFailed.exit_code, out
    assert "Traceback" not in out, out
    hit = [line for line in out.splitlines() if "FAIL" in line and file in line and expectation in line]
    assert hit, f"no FAIL line names {file} / {expectation}:\n{out}"
    assert any(detail in line for line in hit), f"{detail!r} missing from:\n{out}"


def _assert_nothing_published(cfg, registry_uri: str) -> None:
    from hap.registry import registration as registry

    result = json.loads((layout.quarantine_day(cfg, DAY) / layout.QUARANTINE_RESULT_FILE).read_text())
    assert result["reason"]["step"] == "validate" and result["reason"]["failed"]
    assert not layout.landing_day(cfg, DAY).exists()
    for table in layout.LAKE_TABLES:
        assert not lake.has_day(cfg, table, DAY)
    assert not markers.is_validated(cfg, DAY)
    assert not layout.training_set(cfg, DAY).exists() and not layout.model_dir(cfg, DAY).exists()
    champion = registry.alias_version(cfg, "champion")
    assert champion is not None and str(champion.version) == "1"
    assert [str(v.version) for v in registry.versions(cfg)] == ["1"]


@pytest.mark.parametrize(
    "fault_class,corrupt,file,expectation,detail", FAULTS, ids=[f[1].__name__ for f in FAULTS]
)
def test_upstream_fault_is_rejected_by_validate_and_run(
    fault_class,
    corrupt,
    file,
    expectation,
    detail,
    day_copy,
    registry_uri,
    prefect_harness,
    monkeypatch,
    capsys,
):
    cfg = _cfg(day_copy)
    corrupt(layout.landing_day(cfg, DAY))
    through_run = corrupt.__name__ in THROUGH_RUN

    code, out = run_cli(day_copy, "validate", monkeypatch, capsys, registry_uri)
    _assert_clean_rejection(out, code, file, expectation, detail)
    _assert_nothing_published(cfg, registry_uri)

    # the same landed files through the daily flow: released, then rejected again the same way
    code, out = run_cli(day_copy, "release-quarantine", monkeypatch, capsys)
    assert code == 0 and layout.landing_day(cfg, DAY).is_dir(), out
    if not through_run:
        return
    code, out = run_flow(day_copy, DAY, registry_uri)
    _assert_clean_rejection(out, code, file, expectation, detail)
    _assert_nothing_published(cfg, registry_uri)
    run = json.loads((layout.metrics_dir(cfg, DAY) / layout.DAILY_RUN_FILE).read_text())
    assert run["status"] == "failed" and run["quarantine"] == str(layout.quarantine_day(cfg, DAY))


def test_every_fault_class_has_cases_through_validate_and_run():
    through_run = [f for f in FAULTS if f[1].__name__ in THROUGH_RUN]
    assert {f[0] for f in through_run} == set(range(1, 9))  # every class through the daily flow
    assert len(FAULTS) >= 16 and len({f[1].__name__ for f in FAULTS}) == len(FAULTS)


def test_training_refuses_non_finite_values_that_bypass_validation(
    day_copy, registry_uri, prefect_harness, monkeypatch
):
    """A validator that lets NaN through (monkeypatched): training stops with the feature and the
    day named, writes no bundle, the day is quarantined by the flow and the champion stays."""
    from flows.daily import daily_retrain
    from hap.core.errors import NonFiniteData
    from hap.data import validate as validate_mod
    from hap.registry import registration as registry
    from tests.conftest import TINY_FLOW_RUN

    cfg = _cfg(day_copy)
    nan_dense_feature(layout.landing_day(cfg, DAY))
    monkeypatch.setattr(
        validate_mod,
        "check_day",
        lambda cfg, date, docs_dir=None, mapper=None: validate_mod.ValidationReport(date=date),
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri)
    overrides = {**OVERRIDES, **TINY_FLOW_RUN, "split.window_days": 3}
    state = daily_retrain(date=DAY.isoformat(), overrides=overrides, home=str(day_copy), return_state=True)

    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, NonFiniteData), err
    assert "i_ctr" in str(err) and DAY.isoformat() in str(err) and "release-quarantine" in str(err)
    assert not layout.model_dir(cfg, DAY).exists()
    reason = json.loads((layout.quarantine_day(cfg, DAY) / layout.QUARANTINE_RESULT_FILE).read_text())[
        "reason"
    ]
    assert reason["step"] == "train" and reason["check"] == "finite:i_ctr" and reason["examples"]
    for table in layout.LAKE_TABLES:  # unpublished from the lake
        assert not lake.has_day(cfg, table, DAY)
    assert not markers.is_validated(cfg, DAY)
    assert str(registry.alias_version(cfg, "champion").version) == "1"
    assert [str(v.version) for v in registry.versions(cfg)] == ["1"]


def test_distribution_shift_policy_alert_trains_with_a_warning(day_copy, monkeypatch, capsys):
    """``validation.on_distribution_shift: alert``: a collapsed feature is reported, not quarantined."""
    cfg = _cfg(day_copy)
    collapsed_feature(layout.landing_day(cfg, DAY))
    code, out = run_cli(
        day_copy, "validate", monkeypatch, capsys, **{"validation.on_distribution_shift": "alert"}
    )
    assert code == 0, out
    assert any(line.strip().startswith("WARN") and "u_city" in line for line in out.splitlines()), out
    assert markers.is_validated(cfg, DAY) and not markers.is_quarantined(cfg, DAY)


def test_ingest_turns_nulls_in_a_required_column_into_a_quarantine(day_copy):
    """Ingest told to trust a day with nulls in a non-nullable column: one clean contract error
    naming the file, and the day quarantined, instead of a raw ValueError."""
    from hap.data.ingest import ingest_day

    cfg = _cfg(day_copy)
    null_keys(layout.landing_day(cfg, DAY))
    with pytest.raises(DataContractError, match="ranking.parquet"):
        ingest_day(cfg, DAY, require_validated=False)
    reason = json.loads((layout.quarantine_day(cfg, DAY) / layout.QUARANTINE_RESULT_FILE).read_text())[
        "reason"
    ]
    assert reason["step"] == "ingest" and "ranking.parquet" in reason["error"]
    assert not lake.has_day(cfg, "samples", DAY)
