"""Validation: a valid day passes; a corpus of corrupted days each fails clearly and is quarantined.

One valid simulated window is built once per module (two validated days of volume history, then
the day under test, ingested); each corruption works on a copy of it. The CLI is run in-process
through ``hap.cli.main``, the same code path as the ``hap`` console script. "Champion untouched"
is checked against a real MLflow registry whose ``champion`` alias is set up once by the fixture.
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
from hap.data import markers

DAY = dt.date(2026, 11, 3)
HISTORY = [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
OVERRIDES = {"simulate.requests_per_day": 150, "validation.data_docs": False}


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
    """A data root with two validated days and ``DAY`` simulated and ingested, not yet validated."""
    from hap.data.ingest import ingest_day
    from hap.data.validate import validate_day
    from hap.sources.simulator import simulate_day

    home = tmp_path_factory.mktemp("pristine") / "data"
    cfg = _cfg(home)
    for date in [*HISTORY, DAY]:
        simulate_day(cfg, date, progress=False)
        ingest_day(cfg, date)
    for date in HISTORY:
        validate_day(cfg, date)
    return home


@pytest.fixture
def day_copy(pristine: Path, tmp_path: Path) -> Path:
    home = tmp_path / "data"
    shutil.copytree(pristine, home)
    return home


def run_cli(
    home: Path,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    registry: str | None = None,
    **overrides,
) -> tuple[int, str]:
    """Run ``hap`` in-process; returns (exit code, stdout + stderr)."""
    from hap import cli

    monkeypatch.setenv("HAP_HOME", str(home))
    if registry:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    sets = {**OVERRIDES, **overrides}
    argv = ["hap", *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")], *args]
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


# (corruption, file it names, expectation it names, bad-row count or None)
CORPUS = [
    (
        missing_column,
        "exposure.parquet",
        "expect_column_values_to_be_in_set(column=in_file",
        "'column': 'click'",
    ),
    (wrong_dtype, "exposure.parquet", "expect_column_pair_values_to_be_equal", "'arrow_type': 'string'"),
    (null_keys, "ranking.parquet", "expect_column_values_to_not_be_null(column=item_id)", "3 bad row(s)"),
    (duplicate_keys, "ranking.parquet", "expect_compound_columns_to_be_unique", "8 bad row(s)"),
    (
        label_out_of_range,
        "exposure.parquet",
        "expect_column_values_to_be_in_set(column=click",
        "5 bad row(s)",
    ),
    (
        negative_position,
        "exposure.parquet",
        "expect_column_values_to_be_between(column=position",
        "4 bad row(s)",
    ),
    (rank_neg_above_cut, "ranking.parquet", 'row_condition=source=="rank_neg"', "6 bad row(s)"),
    (prerank_neg_above_cut, "ranking.parquet", 'row_condition=source=="prerank_neg"', "6 bad row(s)"),
    (
        timestamps_other_day,
        "exposure.parquet",
        "expect_column_values_to_be_between(column=timestamp",
        "7 bad row(s)",
    ),
    (empty_day, "exposure.parquet", "expect_table_row_count_to_be_between", "observed 0"),
    (truncated_file, "ranking.parquet", "parquet_readable", "truncated or corrupt"),
    (zero_byte_file, "exposure.parquet", "file_not_empty", "zero-byte"),
    (missing_file, "fullflow.parquet", "file_exists", "never landed"),
    (missing_day, "landing/dt=2026-11-03", "day_exists", "missing day"),
    (ctr_zero, "exposure.parquet", "expect_column_mean_to_be_between(column=click", "observed 0"),
    (volume_drop, "exposure.parquet", "expect_table_row_count_to_be_between", "observed 750"),
    (
        exposure_without_ranking_row,
        "exposure.parquet",
        "expect_column_values_to_be_in_set(column=has_ranking_row",
        "3 bad row(s)",
    ),
    (unknown_source, "ranking.parquet", "expect_column_values_to_be_in_set(column=source", "3 bad row(s)"),
    (
        sampling_count,
        "ranking.parquet",
        "expect_column_values_to_be_between(column=n_rank_neg",
        "1 bad row(s)",
    ),
]


@pytest.mark.parametrize("corrupt,file,expectation,detail", CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_corruption_is_caught_and_quarantined(
    corrupt, file, expectation, detail, day_copy, registry_uri, monkeypatch, capsys
):
    cfg = _cfg(day_copy)
    landing = layout.landing_day(cfg, DAY)
    corrupt(landing)

    code, out = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys, registry_uri)

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
    result = json.loads((qdir / "result.json").read_text())
    assert result["reason"]["status"] == "failed" and result["reason"]["failed"]
    assert not landing.exists()
    if corrupt is not missing_day:
        assert (qdir / "landing").is_dir()
    for table in layout.LAKE_TABLES:
        assert not layout.lake_partition(cfg, table, DAY).exists()
        assert (qdir / "lake" / table).is_dir()
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
    code, out = run_cli(
        day_copy,
        ["validate", "--date", DAY.isoformat()],
        monkeypatch,
        capsys,
        **{"validation.data_docs": True},
    )
    assert code == 0, out
    assert f"validated {DAY}" in out
    cfg = _cfg(day_copy)
    assert markers.is_validated(cfg, DAY)
    markers.require_validated(cfg, [*HISTORY, DAY], "split")
    summary = json.loads((layout.validation_day(cfg, DAY) / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["failed"] == [] and summary["passed"] >= 40
    assert (
        summary["params"]["exposure_history_days"] == "2" or summary["params"]["exposure_history_days"] == 2
    )
    docs = layout.validation_day(cfg, DAY) / "docs"
    assert (docs / "index.html").exists()
    assert list((docs / "validations").rglob("*.html")), "no validation result page in the Data Docs"


def test_extra_column_warns_by_default_and_fails_when_configured(day_copy, monkeypatch, capsys):
    cfg = _cfg(day_copy)
    _rw(
        layout.landing_day(cfg, DAY),
        "exposure",
        lambda t: t.append_column("debug_flag", pa.array(np.zeros(t.num_rows, np.int8))),
    )
    code, out = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code == 0, out
    assert "WARN" in out and "'column': 'debug_flag'" in out
    assert markers.is_validated(cfg, DAY)

    code, out = run_cli(
        day_copy,
        ["validate", "--date", DAY.isoformat()],
        monkeypatch,
        capsys,
        **{"validation.extra_columns": "fail"},
    )
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
    code, _ = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code == ValidationFailed.exit_code
    # a quarantined day is refused until released
    code, out = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code == ValidationFailed.exit_code and "in quarantine" in out
    # the operator fixes the files in place, in the quarantine folder, then releases the day
    qlanding = layout.quarantine_day(cfg, DAY) / "landing"
    shutil.rmtree(qlanding)
    shutil.copytree(good, qlanding)
    code, out = run_cli(day_copy, ["release-quarantine", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code == 0, out
    assert "released" in out and not markers.is_quarantined(cfg, DAY) and landing.is_dir()
    assert list((cfg.path("quarantine") / ".released").iterdir()), "the quarantine record is archived"
    # validation refuses a raw-valid day whose lake partition is missing: ingest comes first
    code, out = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code != 0 and "hap ingest" in out and not markers.is_quarantined(cfg, DAY)
    ingest_day(cfg, DAY)
    code, out = run_cli(day_copy, ["validate", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code == 0, out
    assert markers.is_validated(cfg, DAY)
    code, out = run_cli(day_copy, ["release-quarantine", "--date", DAY.isoformat()], monkeypatch, capsys)
    assert code != 0 and "not in quarantine" in out


def test_ingest_contract_error_can_quarantine_the_day(day_copy):
    """Ingest (or a flow) calls ``quarantine_day`` when a raw log breaks its contract."""
    from hap.data.ingest import ingest_day
    from hap.data.validate import quarantine_day

    cfg = _cfg(day_copy)
    truncated_file(layout.landing_day(cfg, DAY))
    with pytest.raises(DataContractError) as err:
        ingest_day(cfg, DAY)
    qdir = quarantine_day(cfg, DAY, {"step": "ingest", "error": str(err.value)})
    result = json.loads((qdir / "result.json").read_text())
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
    split = pytest.importorskip("hap.data.split")
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


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["stable", "retrieval_degrades", "content_shift"])
def test_no_false_alarm_over_ten_days(scenario, tmp_path):
    from hap.data.ingest import ingest_day
    from hap.data.validate import validate_day
    from hap.sources.simulator import simulate_day

    start = dt.date(2026, 11, 1)
    cfg = _cfg(
        tmp_path / "data",
        **{
            "simulate.scenario": scenario,
            "simulate.drift_start": "2026-11-04",
            "simulate.drift_ramp_days": 3,
        },
    )
    for offset in range(10):
        date = start + dt.timedelta(days=offset)
        simulate_day(cfg, date, progress=False)
        ingest_day(cfg, date)
        report = validate_day(cfg, date)
        assert report.success and not report.warnings, report.render()
