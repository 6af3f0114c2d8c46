"""Great Expectations expectations that check one row rule on many columns at once, for the
per-bucket verdict pass (``GxRunner(quick=True)``).

A bucket's row batches carry ~130 single-column expectations (range, not-null, value set), and
GX's cost is mostly per expectation, not per row: building its metric graph, its configuration
and its result, in Python (measured on a bucket of a 100k-request day, 1.5M ranking rows:
~12 ms an expectation, 1.6 s a bucket; folded to ~25 expectations, 0.5 s). The verdict pass
folds a batch's single-column rules of one kind into one multi-column expectation (``fold``) and
runs those with GX; a batch that passes them passed every rule they fold, and a batch that fails
or errors is re-run with the suite's own expectations, so what a user reads (per-column
findings, counts, example rows) is always the reviewed suite's.

The fold is conservative: it takes only rules whose GX semantics it matches exactly, and its
checks *raise* on anything else (a column GX would not check vectorized, a bound that is not a
number), which sends the batch to the full run instead of passing it. GX registers these
classes when this module is imported (``GxRunner`` does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import MulticolumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import MulticolumnMapMetricProvider
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)

from hap.data.suite_json import BETWEEN, IN_SET, NOT_NULL

FOLDED = {  # single-column type -> (the multi-column type, the suite parameter of its rules)
    BETWEEN: ("expect_multicolumn_values_to_be_between", "hap_between_rules"),
    IN_SET: ("expect_multicolumn_values_to_be_in_set", "hap_in_set_rules"),
    NOT_NULL: ("expect_multicolumn_values_to_not_be_null", None),
}
_PLAIN_KWARGS = {  # the keywords a foldable rule may have; any other (mostly, strict_max,
    # row_condition, parse_strings_as_datetimes ...) keeps it a GX expectation of its own
    BETWEEN: {"column", "min_value", "max_value"},
    IN_SET: {"column", "value_set"},
    NOT_NULL: {"column"},
}
_VECTORIZED = (np.dtype("int64"), np.dtype("float64"))  # GX's pandas range check is vectorized only for these


class CannotFold(TypeError):
    """A rule the multi-column check does not decide: the batch runs its own expectations."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _inside(column: pd.Series, low: Any, high: Any) -> np.ndarray:
    """GX's vectorized ``column_values.between`` (``min <= x <= max``, either bound optional), with
    nulls counted as expected, as GX's map metrics leave them out."""
    if column.dtype not in _VECTORIZED:
        raise CannotFold(f"{column.name}: dtype {column.dtype} is not checked vectorized")
    bounds = [b for b in (low, high) if b is not None]
    if not bounds or not all(_number(b) for b in bounds) or (len(bounds) == 2 and low > high):
        raise CannotFold(f"{column.name}: bounds {low!r}, {high!r} are not a numeric range")
    values = column.to_numpy()
    ok = np.ones(len(values), dtype=bool)
    if low is not None:
        ok &= values >= low
    if high is not None:
        ok &= values <= high
    return ok | column.isna().to_numpy()


def _in_set(column: pd.Series, value_set: Any) -> np.ndarray:
    """GX's ``column_values.in_set`` on a non-datetime column, nulls counted as expected."""
    if not isinstance(value_set, list) or pd.api.types.is_datetime64_any_dtype(column.dtype):
        raise CannotFold(f"{column.name}: value set {value_set!r} on dtype {column.dtype}")
    return column.isin(value_set).to_numpy() | column.isna().to_numpy()


def _every_rule(frame: pd.DataFrame, rules: list, check: Any) -> pd.Series:
    """Row by row: does every rule's ``check(column, *arguments)`` hold?"""
    ok = np.ones(len(frame), dtype=bool)
    for column, *arguments in rules:
        ok &= check(frame[column], *arguments)
    return pd.Series(ok, index=frame.index)


class _RulesMetric(MulticolumnMapMetricProvider):
    """Row by row: does every rule hold, by the subclass's ``check``? (GX registers only the
    subclasses: this one has no metric name.)"""

    condition_value_keys = ("rules",)
    check: ClassVar[Callable[..., np.ndarray]]

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list: pd.DataFrame, rules: list, **kwargs: Any) -> pd.Series:
        return _every_rule(column_list, rules, cls.check)


class MulticolumnValuesBetween(_RulesMetric):
    condition_metric_name = "hap_multicolumn_values.between"
    check = staticmethod(_inside)


class MulticolumnValuesInSet(_RulesMetric):
    condition_metric_name = "hap_multicolumn_values.in_set"
    check = staticmethod(_in_set)


class MulticolumnValuesNonNull(MulticolumnMapMetricProvider):
    condition_metric_name = "hap_multicolumn_values.nonnull"

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list: pd.DataFrame, **kwargs: Any) -> pd.Series:
        return column_list.notna().all(axis=1)


class _FoldedRules(MulticolumnMapExpectation):
    """Every row keeps each rule of ``rules`` (abstract: GX registers its subclasses only). No row
    is skipped for missing values: each rule says what a null means, as its GX original does."""

    rules: Any
    ignore_row_if: str = "never"
    success_keys: ClassVar[tuple[str, ...]] = ("rules",)
    args_keys: ClassVar[tuple[str, ...]] = ("column_list", "rules")


class ExpectMulticolumnValuesToBeBetween(_FoldedRules):
    """Each ``[column, min, max]`` of ``rules`` holds on every non-null value of its column."""

    map_metric: ClassVar[str] = "hap_multicolumn_values.between"


class ExpectMulticolumnValuesToBeInSet(_FoldedRules):
    """Each ``[column, value_set]`` of ``rules`` holds on every non-null value of its column."""

    map_metric: ClassVar[str] = "hap_multicolumn_values.in_set"


class ExpectMulticolumnValuesToNotBeNull(MulticolumnMapExpectation):
    """No value of any column of ``column_list`` is null."""

    ignore_row_if: str = "never"
    map_metric: ClassVar[str] = "hap_multicolumn_values.nonnull"
    success_keys: ClassVar[tuple[str, ...]] = ()
    args_keys: ClassVar[tuple[str, ...]] = ("column_list",)


def _rule(exp: dict[str, Any]) -> list[Any]:
    kw = exp["kwargs"]
    if exp["type"] == BETWEEN:
        return [kw["column"], kw.get("min_value"), kw.get("max_value")]
    return [kw["column"], kw["value_set"]]


def fold(expectations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """A batch's expectations (suite JSON) with each kind of foldable single-column rule that
    occurs at least twice replaced by one multi-column expectation; and each folded kind's rules,
    their bounds still ``$PARAMETER`` references (``rule_parameters`` resolves them per run)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    kept = []
    for exp in expectations:
        kind = exp["type"]
        if kind in FOLDED and set(exp["kwargs"]) <= _PLAIN_KWARGS[kind]:
            groups.setdefault(kind, []).append(exp)
        else:
            kept.append(exp)
    rules: dict[str, list] = {}
    for kind, members in groups.items():
        columns = list(dict.fromkeys(e["kwargs"]["column"] for e in members))
        if len(columns) < 2:  # GX's multi-column expectations need two columns; nothing to gain
            kept += members
            continue
        folded_type, parameter = FOLDED[kind]
        kwargs: dict[str, Any] = {"column_list": columns}
        if parameter is not None:
            rules[parameter] = [_rule(e) for e in members]
            kwargs["rules"] = {"$PARAMETER": parameter}
        why = f"{len(members)} {kind} rules at once (the verdict pass)"
        kept.append({"type": folded_type, "kwargs": kwargs, "meta": {"why": why}, "severity": "critical"})
    return kept, rules


def rule_parameters(rules: dict[str, list], params: dict[str, Any]) -> dict[str, list]:
    """The folded rules with their ``$PARAMETER`` bounds filled from the run's parameters, as GX
    fills a single expectation's keyword arguments. A missing parameter stays a reference,
    which the check refuses (``CannotFold``): the full run then reports it as GX does."""

    def resolve(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"$PARAMETER"}:
            return params.get(value["$PARAMETER"], json.dumps(value))
        return value

    return {name: [[resolve(v) for v in rule] for rule in members] for name, members in rules.items()}
