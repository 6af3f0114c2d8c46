"""Expectations as Great Expectations 1.x suite JSON, one builder per kind of expectation.

``hap.data.suites`` writes the reviewed suites with these, and tests write their toy suites with
them, so every expectation has the same shape: ``kwargs`` as GX reads them, ``meta.batch`` (the
frame it runs on, ``hap.data.frames``), ``meta.why`` (what its finding says) and a severity.
"""

from __future__ import annotations

from typing import Any

BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
NOT_NULL = "expect_column_values_to_not_be_null"
UNIQUE_TOGETHER = "expect_compound_columns_to_be_unique"


def P(name: str) -> dict[str, str]:
    """A suite parameter reference, resolved at run time."""
    return {"$PARAMETER": name}


def expectation(kind: str, batch: str, why: str, severity: str = "critical", **kwargs: Any) -> dict[str, Any]:
    """One expectation as suite JSON; ``batch`` names the frame it runs on, ``why`` is what a
    finding says when it fails."""
    return {"type": kind, "kwargs": kwargs, "meta": {"batch": batch, "why": why}, "severity": severity}


def between(
    batch: str, column: str, why: str, min_value: Any = None, max_value: Any = None, **more: Any
) -> dict[str, Any]:
    """``column`` lies in [min_value, max_value]; a bound left out is not checked."""
    bounds = {"min_value": min_value, "max_value": max_value}
    bounds = {key: value for key, value in bounds.items() if value is not None}
    return expectation(BETWEEN, batch, why, column=column, **bounds, **more)


def in_set(batch: str, column: str, why: str, value_set: list[Any], **more: Any) -> dict[str, Any]:
    return expectation(IN_SET, batch, why, column=column, value_set=value_set, **more)


def not_null(batch: str, column: str, why: str) -> dict[str, Any]:
    return expectation(NOT_NULL, batch, why, column=column)


def unique_together(batch: str, columns: list[str], why: str) -> dict[str, Any]:
    return expectation(UNIQUE_TOGETHER, batch, why, column_list=columns)


def where(condition: str) -> dict[str, str]:
    """A pandas row condition: the expectation checks only the rows where it holds."""
    return {"row_condition": condition, "condition_parser": "pandas"}
