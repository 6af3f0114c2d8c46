"""The click sequence's per-row statistics that validation checks (length, id range, null ids),
against a plain-Python reading of the same lists, on the shapes a list column can take."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hap.data.frames import _sequence_stats


def _expected(rows: list) -> dict[str, list]:
    out: dict[str, list] = {"len": [], "min": [], "max": [], "nulls": []}
    for row in rows:
        ids = [i for i in row or [] if i is not None]
        out["len"].append(np.nan if row is None else len(row))
        out["min"].append(min(ids) if ids else 0)
        out["max"].append(max(ids) if ids else 0)
        out["nulls"].append(sum(i is None for i in row or []))
    return out


def _random_rows(rng: np.random.Generator, n: int) -> list:
    rows = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            rows.append(None)  # a null list
        elif kind < 0.1:
            rows.append([])
        elif kind < 0.15:
            rows.append([None] * int(rng.integers(1, 3)))  # only null ids
        else:
            length = int(rng.integers(1, 6))
            rows.append([None if rng.random() < 0.1 else int(rng.integers(-5, 10**6)) for _ in range(length)])
    return rows


def _shapes(rows: list) -> list[pa.Array | pa.ChunkedArray]:
    """The column as one array, as two chunks, and as a slice (a non-zero offset)."""
    array = pa.array(rows, pa.list_(pa.int32()))
    half = len(rows) // 2
    return [array, pa.chunked_array([array[:half], array[half:]], type=array.type)]


@pytest.mark.parametrize("seed", range(5))
def test_sequence_stats_match_a_plain_reading(seed):
    rng = np.random.default_rng(seed)
    rows = _random_rows(rng, 200)
    for column in _shapes(rows):
        got = _sequence_stats(column)
        want = _expected(rows)
        for stat in want:
            np.testing.assert_array_equal(got[stat], np.array(want[stat], dtype=float), err_msg=stat)
    offset = pa.array(rows, pa.list_(pa.int32()))[7:]
    got = _sequence_stats(offset)
    for stat, values in _expected(rows[7:]).items():
        np.testing.assert_array_equal(got[stat], np.array(values, dtype=float), err_msg=stat)


def test_lengths_stay_integers_without_null_lists():
    stats = _sequence_stats(pa.array([[1, 2], [], [None]], pa.list_(pa.int32())))
    assert stats["len"].dtype == np.int64
    assert stats["len"].tolist() == [2, 0, 1]
    assert stats["min"].tolist() == [1, 0, 0] and stats["nulls"].tolist() == [0, 0, 1]


def test_an_empty_column():
    stats = _sequence_stats(pa.array([], pa.list_(pa.int32())))
    assert all(len(v) == 0 for v in stats.values())
