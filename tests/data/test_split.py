"""The difficulty split: content, determinism, sampling, eval-day choice, refusal, data version, CLI.

Runs on a copy of the session's tiny lake (4 days x 240 requests). Validation markers are written
directly with ``hap.markers`` (the contract split consumes); GX itself is tested by the
validation tests and end to end in ``test_dvc_pipeline.py``.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hap.core import layout, schema
from hap.core.config import Config
from hap.core.errors import HapError, NotValidated
from hap.data import lake, markers
from hap.data.split import build_training_set, open_training_set, read_report, request_grouping, unit_hash
from hap.data.versioning import VERSION_FILE, data_version

D1, D2, D3, D4 = (dt.date(2026, 11, d) for d in (1, 2, 3, 4))


@pytest.fixture
def lake_cfg(tiny_lake: Config, make_cfg, tmp_path: Path) -> Config:
    """A private copy of the tiny lake with days 1..3 validated (day 4 ingested, not validated)."""
    cfg = make_cfg()
    shutil.copytree(tiny_lake.path("lake"), cfg.path("lake"))
    for day in (D1, D2, D3):
        markers.mark_validated(cfg, day, {"source": "test"})
    return cfg


def _lake_counts(cfg: Config, days: list[dt.date]) -> dict[str, int]:
    out: dict[str, int] = {}
    for day in days:
        table = lake.read_day(cfg, "samples", day, ["source"])
        for row in pc.value_counts(table["source"]).to_pylist():
            out[row["values"]] = out.get(row["values"], 0) + row["counts"]
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_training_set_content_and_partitions(lake_cfg: Config) -> None:
    report = build_training_set(lake_cfg.updated({"split.eval_day": "next"}), D2)
    assert report.window == [D1, D2] and report.eval_day == D3 and report.eval_held_out_day
    train = open_training_set(report.train_path).to_table()
    # every lake row of the window is kept at ratio 1 (the eval day D+1 is outside the window)
    assert report.rows == train.num_rows == report.lake_rows == sum(_lake_counts(lake_cfg, [D1, D2]).values())
    assert report.by_source == _lake_counts(lake_cfg, [D1, D2])
    assert sorted(p.name for p in report.train_path.iterdir() if p.is_dir()) == [
        "difficulty=easy",
        "difficulty=hard",
        "difficulty=positive",
    ]
    for part in report.train_path.glob("difficulty=*/*.parquet"):
        file_schema = pq.read_schema(part)
        assert file_schema.equals(schema.TRAINING_SET, check_metadata=False)
        values = set(pq.read_table(part, columns=["difficulty"])["difficulty"].to_pylist())
        assert values == {part.parent.name.split("=")[1]}
    rows = train.select(["source", "group", "difficulty", "label", "dt"]).to_pylist()
    assert {r["dt"] for r in rows} == {D1.isoformat(), D2.isoformat()}
    for r in rows:
        assert r["group"] == schema.GROUP_OF_SOURCE[r["source"]]
        assert r["difficulty"] == schema.DIFFICULTY_OF_SOURCE[r["source"]]
        assert r["label"] == (1 if r["source"] == "expose_pos" else 0)
    # one row per (request, sample)
    keys = pc.binary_join_element_wise(
        pc.cast(train["request_id"], "string"),
        pc.cast(train["item_id"], "string"),
        pc.cast(train["source"], "string"),
        "/",
    )
    assert pc.count_distinct(keys).as_py() == train.num_rows
    # the eval set: full-flow rows of D+1 for at most eval_max_requests requests, contract schema
    ev = pq.read_table(report.eval_path)
    assert ev.schema.equals(schema.EVAL_SET, check_metadata=False)
    assert set(ev["dt"].to_pylist()) == {D3.isoformat()}
    assert report.eval_requests == len(set(ev["request_id"].to_pylist())) > 0
    assert report.eval_rows == ev.num_rows
    assert read_report(lake_cfg, D2)["data_version"] == report.data_version == data_version(lake_cfg, D2)


def test_rebuild_is_byte_identical(lake_cfg: Config, make_cfg, tmp_path: Path) -> None:
    first = build_training_set(lake_cfg, D2)
    before = _files(first.train_path.parent)
    again = build_training_set(lake_cfg, D2)
    assert again.data_version == first.data_version
    assert _files(again.train_path.parent) == before
    # small batches stream the same rows (more row groups, so other bytes, same content)
    cols = ["request_id", "item_id", "source", "difficulty"]
    order = [(c, "ascending") for c in cols]
    big_rows = open_training_set(first.train_path).to_table(columns=cols).sort_by(order)
    small = build_training_set(lake_cfg.updated({"split.batch_rows": 1024}), D2)
    groups = sum(pq.ParquetFile(p).num_row_groups for p in small.train_path.glob("difficulty=*/*.parquet"))
    assert groups > 3
    small_rows = open_training_set(small.train_path).to_table(columns=cols).sort_by(order)
    assert small_rows.equals(big_rows)


def test_sampling_ratio_is_stratified_and_nested(lake_cfg: Config) -> None:
    full = build_training_set(lake_cfg, D2)
    full_keys = set(
        zip(
            *open_training_set(full.train_path)
            .to_table(columns=["request_id", "item_id"])
            .to_pydict()
            .values()
        )
    )
    cfg = lake_cfg.updated({"split.sample_ratio.global_neg": 0.5, "split.sample_ratio.prerank_neg": 0.0})
    half = build_training_set(cfg, D2)
    assert half.by_source.get("prerank_neg", 0) == 0
    assert half.by_source["expose_pos"] == full.by_source["expose_pos"]
    assert half.by_source["rank_neg"] == full.by_source["rank_neg"]
    share = half.by_source["global_neg"] / full.by_source["global_neg"]
    assert 0.4 < share < 0.6, share
    half_keys = set(
        zip(
            *open_training_set(half.train_path)
            .to_table(columns=["request_id", "item_id"])
            .to_pydict()
            .values()
        )
    )
    assert half_keys < full_keys  # a subsample, decided per (request, item), not a reshuffle
    assert half.data_version != full.data_version
    # the hash is uniform enough for ratios to mean what they say
    u = unit_hash(np.arange(100_000), np.arange(100_000) * 7, 11)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_eval_on_the_last_window_day_holds_its_requests_out(lake_cfg: Config) -> None:
    cfg = lake_cfg.updated({"split.eval_max_requests": 5})
    report = build_training_set(cfg, D3)  # the default split.eval_day: last
    assert report.eval_day == D3 and not report.eval_held_out_day
    ev = pq.read_table(report.eval_path)
    eval_ids = set(ev["request_id"].to_pylist())
    assert len(eval_ids) == report.eval_requests == 5
    train = open_training_set(report.train_path).to_table(columns=["request_id", "dt"])
    assert not eval_ids & set(train["request_id"].to_pylist())
    assert report.rows < report.lake_rows
    # the choice is deterministic: the same requests on a rebuild
    assert set(pq.read_table(build_training_set(cfg, D3).eval_path)["request_id"].to_pylist()) == eval_ids


def test_the_training_set_does_not_depend_on_which_later_days_have_landed(lake_cfg: Config) -> None:
    """``dvc repro`` on a later day rebuilds the very set a model was trained on: D+1 passing
    validation changes neither the eval day nor a byte of the training set."""
    before = build_training_set(lake_cfg, D2)
    train_before = _files(before.train_path)
    eval_before = _files(before.eval_path)
    assert markers.is_validated(lake_cfg, D3)  # the day after the window has landed all along
    markers.mark_validated(lake_cfg, D4, {"source": "test"})  # and so has a later one now
    after = build_training_set(lake_cfg, D2)
    assert after.eval_day == before.eval_day == D2 and after.data_version == before.data_version
    assert _files(after.train_path) == train_before and _files(after.eval_path) == eval_before


def test_next_day_eval_needs_that_day_validated(lake_cfg: Config) -> None:
    nxt = lake_cfg.updated({"split.eval_day": "next"})
    report = build_training_set(nxt, D2)  # D3 validated: evaluated on the held-out day
    assert report.eval_day == D3 and report.eval_held_out_day
    assert report.rows == report.lake_rows  # nothing of the window is held out
    with pytest.raises(HapError, match=r"eval_day is 'next' but 2026-11-04 has not been validated"):
        build_training_set(nxt, D3)
    assert not layout.training_set(nxt, D3).exists()


def test_refuses_unvalidated_day_and_writes_nothing(lake_cfg: Config) -> None:
    with pytest.raises(NotValidated, match="2026-11-04"):
        build_training_set(lake_cfg, D4)
    assert not layout.training_set(lake_cfg, D4).exists()
    with pytest.raises(HapError, match="unknown source"):
        build_training_set(lake_cfg.updated({"split.sample_ratio": {"bogus": 1.0}}), D2)


def test_data_version_detects_modified_training_set(lake_cfg: Config) -> None:
    report = build_training_set(lake_cfg, D2)
    assert (report.train_path / VERSION_FILE).exists()
    part = next(report.train_path.glob("difficulty=easy/*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table.slice(1), part)
    with pytest.raises(HapError, match="changed after the split"):
        data_version(lake_cfg, D2)
    with pytest.raises(HapError, match="hap split --date 2026-11-01"):
        data_version(lake_cfg, D1)


def test_cli_split_and_data_version(lake_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from hap.cli import app

    monkeypatch.setenv("HAP_HOME", str(lake_cfg.home))
    runner = CliRunner()
    sets = ["--set", "split.window_days=2"]
    res = runner.invoke(app, [*sets, "split", "--date", "2026-11-02"])
    assert res.exit_code == 0, res.output
    assert "training rows" in res.output and "last window day, requests held out" in res.output
    res = runner.invoke(app, [*sets, "data-version", "--date", "2026-11-02"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == data_version(lake_cfg, D2)


def test_eval_set_carries_truth_and_the_eval_requests_samples(lake_cfg: Config) -> None:
    """Evaluation reads the training folder only: the eval set keeps ``true_affinity`` and the
    eval requests' samples (every negative source, for the slice AUCs) sit next to it."""
    date = dt.date(2026, 11, 2)
    build_training_set(lake_cfg, date)
    eval_set = pq.read_table(layout.eval_set(lake_cfg, date))
    assert eval_set.schema.equals(schema.EVAL_SET) and eval_set["true_affinity"].null_count == 0
    samples = pq.read_table(layout.eval_samples(lake_cfg, date))
    ids = set(eval_set["request_id"].to_pylist())
    assert samples.num_rows and set(samples["request_id"].to_pylist()) <= ids
    assert set(samples["source"].to_pylist()) == {s.value for s in schema.Source}


def _out_of_order_map(fn, items):
    """Runs the units last to first, as workers finishing in any order would; results in item order."""
    return [fn(item) for item in reversed(items)][::-1]


def test_units_give_the_same_bytes_in_any_worker_order(lake_cfg: Config) -> None:
    first = build_training_set(lake_cfg, D2)
    before = _files(first.train_path.parent)
    other = build_training_set(lake_cfg, D2, mapper=_out_of_order_map)
    assert other.data_version == first.data_version and _files(other.train_path.parent) == before


def test_request_grouping_keeps_first_seen_request_order_and_file_order() -> None:
    assert request_grouping(np.array([5, 5, 2, 9, 9])) is None
    ids = np.array([5, 2, 5, 9, 2, 5])
    order = request_grouping(ids)
    assert sorted(order.tolist()) == list(range(len(ids)))
    grouped = ids[order]
    assert request_grouping(grouped) is None  # contiguous now
    assert list(dict.fromkeys(grouped.tolist())) == list(dict.fromkeys(ids.tolist()))
    for rid in np.unique(ids):  # a request's rows keep their file order
        assert np.all(np.diff(order[grouped == rid]) > 0)


def test_one_file_per_unit_and_difficulty_holding_whole_contiguous_requests(lake_cfg: Config) -> None:
    """The layout the streaming trainer reads: a unit's files hold the lake file's requests, each
    request's rows contiguous in every file, even when the lake file interleaves requests."""
    lake_file = lake.day_parts(lake_cfg, "samples", D1)[0].uri
    rows = pq.read_table(lake_file)
    pq.write_table(rows.take(np.random.default_rng(0).permutation(rows.num_rows)), lake_file)
    report = build_training_set(lake_cfg.updated({"split.eval_day": "next"}), D2)
    assert report.rows == report.lake_rows  # nothing held out: the eval day is D3
    for day in report.window:
        for part in lake.day_parts(lake_cfg, "samples", day):
            lake_part = part.uri
            name = f"part-{day:%Y%m%d}-{part.bucket:05d}.parquet"
            files = sorted(report.train_path.glob(f"difficulty=*/{name}"))
            assert 1 <= len(files) <= len(schema.Difficulty)
            covered: set[int] = set()
            for f in files:
                ids = pq.read_table(f, columns=["request_id"])["request_id"].to_numpy()
                assert request_grouping(ids) is None
                covered |= set(ids.tolist())
            assert covered == set(pq.read_table(lake_part, columns=["request_id"])["request_id"].to_pylist())
    assert (
        request_grouping(pq.read_table(lake_file, columns=["request_id"])["request_id"].to_numpy())
        is not None
    )
