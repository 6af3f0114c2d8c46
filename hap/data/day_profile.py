"""A day's distribution profile, and its drift against the trailing validated days.

Each request-hash bucket profiles its share of the day (``profile_part``); validation merges the
parts in bucket order (``merge_profiles``), stores the day's profile with its validation summary,
and compares it with the trailing days' (``drift_frame``), the frame the suites' ``drift`` checks
run on (``hap.data.suites``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from datasketches import tdigest_double

from hap.core import schema

PROFILED = {
    "exposure": (*schema.USER_CATEGORICAL, *schema.CONTEXT_CATEGORICAL, *schema.USER_DENSE, "dwell"),
    "ranking": (*schema.ITEM_CATEGORICAL, *schema.ITEM_DENSE),
}
DENSE_PROFILED = ("dwell", *schema.DENSE_FEATURES)
QUANTILES = (0.01, 0.5, 0.99)
DIGEST_K = 200  # t-digest compression: ~0.1% rank error at p1/p99, a few kB per column and bucket


def _counts(values: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    return {str(c["values"]): int(c["counts"]) for c in pc.value_counts(values).to_pylist()}


def _digest(values: pa.ChunkedArray, sample_rows: int) -> dict[str, Any]:
    """A mergeable t-digest (Apache DataSketches) of a dense column, and its non-finite count.

    The digest takes every k-th finite value, at most about ``sample_rows`` of them: the t-digest's
    update is most of a bucket's profiling time (0.14 s per 1.5M values), and a systematic sample of
    100k values keeps p1/p99 within ~0.1% in rank, as the whole column does (tests/unit/
    test_day_profile_digest.py). Non-finite values are counted on the whole column, so one NaN anywhere
    still fails the shift check."""
    x = values.drop_null().to_numpy().astype(np.float64)
    finite = np.isfinite(x)
    x = x[finite]
    digest = tdigest_double(DIGEST_K)
    if len(x):
        digest.update(x[:: max(1, -(-len(x) // sample_rows))])
    return {"digest": digest.serialize(), "nonfinite": int((~finite).sum())}


def profile_part(exposure: pa.Table, ranking: pa.Table, sample_rows: int) -> dict[str, dict]:
    """One bucket's share of the day's profile: distinct values per feature, t-digests of the dense
    features (over at most ``sample_rows`` values each), and the counts behind the content mix and
    the click share per position."""
    tables = {"exposure": exposure, "ranking": ranking}
    distinct, digests = {}, {}
    for name, columns in PROFILED.items():
        for col in columns:
            distinct[col] = int(pc.count_distinct(tables[name][col]).as_py())
            if col in DENSE_PROFILED:
                digests[col] = _digest(tables[name][col], sample_rows)
    clicked = exposure.filter(pc.equal(exposure["click"], 1))
    return {
        "distinct": distinct,
        "digests": digests,
        "content_mix": _counts(exposure["content_type"]),
        "click_position": _counts(clicked["position"]),
    }


def _merged_quantiles(parts: list[dict[str, Any]]) -> list[float | None]:
    if any(p["nonfinite"] for p in parts):
        return [float("inf")] * len(QUANTILES)  # a NaN or inf upstream: the shift check fails it
    merged = tdigest_double(DIGEST_K)
    for part in parts:
        merged.merge(tdigest_double.deserialize(part["digest"]))
    if merged.is_empty():
        return [None] * len(QUANTILES)
    return [float(merged.get_quantile(q)) for q in QUANTILES]


def _shares_of(counts: list[dict[str, int]]) -> dict[str, float]:
    total: dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    n = sum(total.values())
    return {k: v / n for k, v in sorted(total.items())} if n else {}


def merge_profiles(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """The day's distribution summary from its buckets' parts (in bucket order, so the same at every
    scale), stored with its validation summary so later days can compare.

    - ``distinct``: the median over buckets of the distinct values per bucket: buckets hold about
      ``engine.bucket_requests`` requests on every day, so the figure does not move with volume,
      and a collapsed feature (one value) reads ~0 of the trailing days' figure;
    - ``quantiles``: p1, p50, p99 of the merged t-digests;
    - ``content_mix`` and ``click_position``: shares of the summed counts.
    """
    columns = parts[0]["distinct"] if parts else {}
    return {
        "distinct": {c: int(np.median([p["distinct"][c] for p in parts])) for c in columns},
        "quantiles": {c: _merged_quantiles([p["digests"][c] for p in parts]) for c in parts[0]["digests"]}
        if parts
        else {},
        "content_mix": _shares_of([p["content_mix"] for p in parts]),
        "click_position": _shares_of([p["click_position"] for p in parts]),
    }


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _tvd(today: dict[str, float], refs: list[dict[str, float]]) -> float:
    """Total variation distance between today's shares and the mean shares of ``refs``."""
    keys = set(today).union(*refs)
    ref = {k: float(np.mean([r.get(k, 0.0) for r in refs])) for k in keys}
    return 0.5 * sum(abs(today.get(k, 0.0) - ref[k]) for k in keys)


def drift_frame(today: dict[str, dict], refs: list[dict[str, dict]]) -> pd.DataFrame:
    """One row per (check, column): today's statistic against the trailing days' (``refs``, newest
    first).

    - ``distinct_ratio``: distinct values today / trailing median (a collapsed feature gives ~0);
    - ``dense_shift``: the larger move of the median and p99, over the trailing p1-p99 spread;
    - ``content_mix_tvd`` and ``click_position_tvd``: total variation distance of the shares from
      the newest validated day's. A day-to-day distance: a drift ramping over days (the simulator's
      ``content_shift`` moves the mix by ~0.18 a day) passes, a jump (one upstream change) fails.
    """
    rows = []
    for col, count in today["distinct"].items():
        ref = [r["distinct"][col] for r in refs if col in r.get("distinct", {})]
        if ref and _median(ref) > 0:
            rows.append(("distinct_ratio", col, count / _median(ref)))
    for col, qs in today["quantiles"].items():
        ref = [
            r["quantiles"][col]
            for r in refs
            if r.get("quantiles", {}).get(col) and None not in r["quantiles"][col]
        ]
        if not ref:
            continue
        lo, mid, hi = (_median([q[i] for q in ref]) for i in range(3))
        spread = max(hi - lo, 1e-9 + 1e-6 * abs(mid))
        if None in qs or not all(np.isfinite(qs)):
            rows.append(("dense_shift", col, float("inf")))
        else:
            rows.append(("dense_shift", col, max(abs(qs[1] - mid), abs(qs[2] - hi)) / spread))
    for check, key in (("content_mix_tvd", "content_mix"), ("click_position_tvd", "click_position")):
        ref = [r[key] for r in refs if r.get(key)][:1]  # the newest day: a jump, not a planned drift
        if ref and today[key]:
            rows.append((check, key, _tvd(today[key], ref)))
    return pd.DataFrame(rows, columns=["check", "column", "value"])
