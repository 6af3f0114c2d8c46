"""The verdict pass's folded rules (``hap.data.gx_rules``): a batch passes them exactly when it
passes the suite's own expectations, and a batch that fails either gets the suite's findings."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest

from hap.data import gx_rules
from hap.data.gx_runner import GxRunner
from hap.data.suite_json import BETWEEN, P, between, in_set, not_null, unique_together, where
from hap.data.suites import load_suite_json

SUITE = {
    "name": "toy_rules",
    "meta": {},
    "expectations": [
        not_null("rows", "request_id", "ids are present"),
        not_null("rows", "score", "scores are numbers"),
        # GX orders results by column, first seen first; this one's group has no column
        unique_together("rows", ["request_id", "position"], "one row per item"),
        not_null("rows", "label", "labels are present"),
        between("rows", "request_id", "ids are non-negative", min_value=0),
        between("rows", "position", "positions are 1-based", min_value=1, max_value=P("max_pos")),
        between("rows", "score", "scores lie in the contract range", P("lo"), P("hi")),
        between("rows", "count", "nullable counts are small", max_value=3),
        between("rows", "ts", "timestamps lie in the day", P("day_start"), P("day_end"), strict_max=True),
        between("rows", "dwell", "clicked rows dwell", min_value=1, **where("click==1")),
        in_set("rows", "click", "clicks are binary", [0, 1]),
        in_set("rows", "label", "labels are known", ["a", "b"]),
        in_set("rows", "logged", "no orphan row", [True]),
    ],
}
PARAMS = {
    "max_pos": 4,
    "lo": 0.0,
    "hi": 1.0,
    "day_start": "2026-11-01T00:00:00+00:00",
    "day_end": "2026-11-02T00:00:00+00:00",
}


def _frame() -> pd.DataFrame:
    n = 8
    return pd.DataFrame(
        {
            "request_id": np.repeat(np.arange(2, dtype=np.int64), 4),
            "position": np.tile(np.arange(1, 5, dtype=np.int64), 2),
            "score": np.linspace(0.0, 1.0, n),
            "count": np.array([0, 1, np.nan, 3, 2, np.nan, 0, 1]),  # nullable: nulls pass a range
            "ts": pd.date_range("2026-11-01T01:00", periods=n, freq="h", tz="UTC"),
            "dwell": np.array([5.0, 0, 0, 2.0, 0, 0, 0, 0]),
            "click": np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=np.int64),
            "label": pd.Categorical(["a", "b"] * 4),
            "logged": np.ones(n, dtype=bool),
        }
    )


def _set(column: str, row: int, value) -> callable:
    def corrupt(frame: pd.DataFrame) -> pd.DataFrame:
        values = frame[column].astype(object) if value is None or isinstance(value, str) else frame[column]
        values = values.copy()
        values.iloc[row] = value
        frame[column] = values
        return frame

    return corrupt


def _retype(column: str, dtype) -> callable:
    def corrupt(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(dtype)
        return frame

    return corrupt


def _drop(column: str) -> callable:
    return lambda frame: frame.drop(columns=[column])


FAULTS = {
    "id below its range": _set("request_id", 3, -1),
    "position above its parameter": _set("position", 0, 5),
    "float32 score above its range": lambda frame: _set("score", 7, 1.5)(_retype("score", np.float32)(frame)),
    "score NaN": _set("score", 2, np.nan),
    "score +inf": _set("score", 2, np.inf),
    "score -inf": _set("score", 5, -np.inf),
    "score above its range": _set("score", 7, 1.0000001),
    "score null (object)": _set("score", 1, None),
    "score as text": _set("score", 1, "0.5"),
    "count above its bound": _set("count", 0, 4.0),
    "position as int32 (GX checks it value by value)": _retype("position", np.int32),
    "score as float32": _retype("score", np.float32),
    "click outside its set": _set("click", 2, 2),
    "label outside its set": _set("label", 0, "c"),
    "label null": _set("label", 3, None),
    "orphan row": _set("logged", 4, False),
    "request id null": _set("request_id", 0, None),
    "score column missing": _drop("score"),
    "position column missing": _drop("position"),
    "timestamp outside the day": _set("ts", 0, pd.Timestamp("2026-11-03", tz="UTC")),
    "unclicked dwell ignored": _set("dwell", 1, -5.0),
    "clicked dwell too short": _set("dwell", 0, 0.0),
}


def _dicts(findings) -> list[str]:
    return [repr(f.to_dict()) for f in findings]  # repr: a NaN example equals itself


@pytest.fixture(scope="module")
def runners() -> tuple[GxRunner, GxRunner]:
    return GxRunner(None, examples=3, reuse=True, quick=True), GxRunner(None, examples=3, reuse=True)


def test_fold_replaces_each_kind_of_plain_rule_by_one_multicolumn_expectation():
    folded, rules = gx_rules.fold(SUITE["expectations"])
    kinds = [e["type"] for e in folded]
    assert kinds.count("expect_multicolumn_values_to_be_between") == 1
    assert kinds.count("expect_multicolumn_values_to_be_in_set") == 1
    assert kinds.count("expect_multicolumn_values_to_not_be_null") == 1
    kept = [e["kwargs"].get("column") for e in folded if e["type"] == BETWEEN]
    assert kept == ["ts", "dwell"], "a strict bound and a row condition keep their own expectation"
    assert rules["hap_between_rules"] == [
        ["request_id", 0, None],
        ["position", 1, {"$PARAMETER": "max_pos"}],
        ["score", {"$PARAMETER": "lo"}, {"$PARAMETER": "hi"}],
        ["count", None, 3],
    ]
    filled = gx_rules.rule_parameters(rules, PARAMS)
    assert filled["hap_between_rules"][2] == ["score", 0.0, 1.0]
    assert filled["hap_in_set_rules"][1] == ["label", ["a", "b"]]


def test_a_lone_rule_of_its_kind_is_not_folded():
    one = [not_null("rows", "a", "x"), between("rows", "a", "y", min_value=0)]
    assert gx_rules.fold(one) == (one, {})


@pytest.mark.parametrize("log", ["exposure", "ranking", "fullflow"])
def test_the_raw_logs_row_batches_fold_to_a_few_expectations(log):
    """The point of the fold: GX's cost is per expectation."""
    expectations = [e for e in load_suite_json(log)["expectations"] if e["meta"]["batch"] == "rows"]
    folded, _ = gx_rules.fold(expectations)
    assert len(expectations) >= 30
    assert len(folded) <= 7, [e["type"] for e in folded]


def test_a_clean_batch_gets_the_findings_of_the_suites_own_expectations(runners):
    quick, detailed = runners
    got = quick.run(SUITE, "rows", _frame(), PARAMS, "toy.parquet")
    want = detailed.run(SUITE, "rows", _frame(), PARAMS, "toy.parquet")
    assert all(f.success for f in want)
    assert [(f.expectation, f.args, f.severity, f.why, f.success) for f in got] == [
        (f.expectation, f.args, f.severity, f.why, f.success) for f in want
    ]
    assert [f.rows for f in got] == [None if "row_condition" in f.args else len(_frame()) for f in want]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_fails_the_verdict_pass_exactly_when_it_fails_the_suite(runners, fault):
    quick, detailed = runners
    frame = FAULTS[fault](_frame())
    got = quick.run(SUITE, "rows", frame.copy(), PARAMS, "toy.parquet")
    want = detailed.run(SUITE, "rows", frame.copy(), PARAMS, "toy.parquet")
    if all(f.success for f in want):
        assert all(f.success for f in got)
    else:  # the batch ran again with the suite's expectations: the same findings, counts, examples
        assert _dicts(got) == _dicts(want)


def test_a_missing_parameter_is_refused_as_gx_refuses_it(runners):
    from great_expectations.exceptions import SuiteParameterError

    params = {k: v for k, v in PARAMS.items() if k != "hi"}
    for runner in runners:
        with pytest.raises(SuiteParameterError, match="hi"):
            runner.run(SUITE, "rows", _frame(), params, "toy.parquet")


def test_gx_still_reads_the_fingerprint_threshold_the_runner_turns_off(runners):
    from great_expectations.execution_engine import pandas_execution_engine

    assert pandas_execution_engine.HASH_THRESHOLD == 0
    source = inspect.getsource(pandas_execution_engine.PandasExecutionEngine.get_batch_data_and_markers)
    assert "HASH_THRESHOLD" in source, "GX no longer fingerprints by HASH_THRESHOLD: revisit GxRunner"
