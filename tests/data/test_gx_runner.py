"""The per-bucket GX runner: verdicts first, details only for a failing batch, and findings that
merge across buckets the same way whichever pass produced them."""

from __future__ import annotations

import pandas as pd
import pytest

from hap.data.gx_runner import GxRunner, merge_findings, warm_up
from hap.data.suite_json import P, between, not_null, unique_together, where

SUITE = {
    "name": "toy_log",
    "meta": {},
    "expectations": [
        not_null("rows", "request_id", "ids are present"),
        between("rows", "position", "positions are 1-based", min_value=1, max_value=P("max_position")),
        between("rows", "dwell", "clicked rows dwell", min_value=1, **where("click==1")),
        unique_together("rows", ["request_id", "item"], "one row per item"),
    ],
}
PARAMS = {"max_position": 10}


def _frame(bad_position: bool = False, bad_dwell: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "request_id": [1, 1, 2, 2, 3, 3],
            "item": [10, 11, 10, 12, 13, 14],
            "position": [1, 2, 1, 2, 1, 2],
            "click": [1, 0, 0, 1, 0, 0],
            "dwell": [5.0, 0.0, 0.0, 3.0, 0.0, 0.0],
        }
    )
    if bad_position:
        frame.loc[[2, 4], "position"] = 99
    if bad_dwell:
        frame.loc[3, "dwell"] = 0.0
    return frame


@pytest.fixture(scope="module")
def runners() -> tuple[GxRunner, GxRunner]:
    quick = GxRunner(None, examples=3, reuse=True, quick=True)
    detailed = GxRunner(None, examples=3, reuse=True)
    return quick, detailed


def _dicts(findings):
    return [f.to_dict() for f in findings]


def test_a_failing_batch_gets_the_same_findings_as_a_detailed_run(runners):
    quick, detailed = runners
    frame = _frame(bad_position=True, bad_dwell=True)
    got = quick.run(SUITE, "rows", frame, PARAMS, "toy.parquet")
    want = detailed.run(SUITE, "rows", frame, PARAMS, "toy.parquet")
    assert _dicts(got) == _dicts(want)
    position = next(f for f in got if f.args.get("column") == "position")
    assert (position.success, position.bad_rows, position.rows) == (False, 2, 6)
    assert [e["request_id"] for e in position.examples] == [2, 3]


def test_a_passing_batch_has_the_detailed_verdicts_and_row_counts(runners):
    quick, detailed = runners
    got = quick.run(SUITE, "rows", _frame(), PARAMS, "toy.parquet")
    want = detailed.run(SUITE, "rows", _frame(), PARAMS, "toy.parquet")
    assert [(f.expectation, f.args, f.success) for f in got] == [
        (f.expectation, f.args, f.success) for f in want
    ]
    assert all(f.success for f in got)
    for f, w in zip(got, want):
        # every unfiltered check saw the whole frame; a row-conditioned one's count is not known
        assert f.rows == (None if "row_condition" in f.args else w.rows)
        assert "row_condition" in f.args or w.rows == len(_frame())
        assert not f.examples


def test_bucket_findings_merge_to_the_file_whatever_pass_made_them(runners):
    quick, detailed = runners
    buckets = [_frame(), _frame(bad_position=True, bad_dwell=True), _frame()]
    merged = merge_findings([quick.run(SUITE, "rows", b, PARAMS, "toy.parquet") for b in buckets], 3)
    reference = merge_findings([detailed.run(SUITE, "rows", b, PARAMS, "toy.parquet") for b in buckets], 3)
    by_column = {f.args.get("column"): f for f in merged}
    ref = {f.args.get("column"): f for f in reference}
    assert [f.success for f in merged] == [f.success for f in reference]
    assert (
        (by_column["position"].bad_rows, by_column["position"].rows)
        == (2, 18)
        == (
            ref["position"].bad_rows,
            ref["position"].rows,
        )
    )
    # the row-conditioned check's file-wide count is unknown: no "of N" that counts one bucket only
    assert by_column["dwell"].bad_rows == ref["dwell"].bad_rows == 1
    assert by_column["dwell"].rows is None
    assert "1 bad row(s);" in by_column["dwell"].render()


def test_gx_is_imported_once_in_the_background_and_awaited_by_a_runner():
    thread = warm_up()
    assert warm_up() is thread, "one import per process"
    GxRunner(None)
    assert not thread.is_alive()
