"""The checks validation maps over a cut day (``hap.data.buckets``), one task per partition.

- ``check_bucket``: one request-hash bucket of the three logs: the suites' ``rows`` and
  ``requests`` batches (exact inside a bucket: every row of a request is there), the bucket's
  counts for the day-level checks, its part of the distribution profile, and the keys that span
  requests, written out partitioned by their own hash;
- ``check_key_part``: one such key partition, where uniqueness across requests is exact.

Findings name the landing file, not the bucket: the merge (``gx_runner.merge_findings``) folds the
partitions of a file back into one finding per expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from hap.core import schema
from hap.core.config import Config
from hap.data import day_profile
from hap.data import frames as vf
from hap.data.buckets import DayBuckets
from hap.data.gx_runner import Finding, GxRunner, bucket_runner
from hap.data.suites import load_suite_json

KEYS_DIR = "keys"
KEY_BATCHES = {"exposure_keys": "exposure", "content_keys": "ranking"}  # batch -> the suite it is in


@dataclass
class BucketResult:
    bucket: int
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)


def _runner(cfg: Config) -> GxRunner:
    v = cfg.validation
    return bucket_runner(v.examples, v.extra_columns, v.on_distribution_shift)


def _write_keys(cut: DayBuckets, batch: str, bucket: int, table: pa.Table, part: np.ndarray) -> None:
    cut.store.write_partitioned(table, "part", part, cut.store.join(KEYS_DIR, batch), f"bucket-{bucket:05d}")


Batch = tuple[str, str, pd.DataFrame, str]  # (suite, batch, frame, the file its findings name)
BUILD_ORDER = ("fullflow", "requests", "ranking", "exposure")  # cheapest frames first


def _batches(
    cfg: Config, files: dict[str, str], exposure: pa.Table, ranking: pa.Table, fullflow: pa.Table
) -> dict[str, Callable[[], list[Batch]]]:
    """The frames a bucket's GX batches run on, one builder per part, in the order findings are
    reported (pyarrow-side work)."""
    per_request = f"{files['ranking']} + {files['exposure']} (per request)"
    return {
        "exposure": lambda: [("exposure", "rows", vf.exposure_rows(exposure, ranking), files["exposure"])],
        "ranking": lambda: [
            ("ranking", "rows", vf.ranking_rows(ranking), files["ranking"]),
            ("ranking", "positions", vf.ranking_positions(ranking), files["ranking"]),
            *[("ranking", b, f, files["ranking"]) for b, f in vf.source_positions(ranking).items()],
        ],
        "requests": lambda: [
            (
                "ranking",
                "requests",
                vf.requests_frame(exposure, ranking, cfg.contract.global_neg_per_pos),
                per_request,
            )
        ],
        "fullflow": lambda: [("fullflow", "rows", vf.fullflow_rows(fullflow, exposure), files["fullflow"])],
    }


def _summarize(
    cfg: Config, cut: DayBuckets, bucket: int, tables: tuple[pa.Table, ...], out: BucketResult
) -> None:
    """What the day-level checks need from the bucket, and its keys that span requests."""
    exposure, ranking, fullflow = tables
    out.counts = vf.bucket_counts(exposure, ranking, fullflow)
    out.profile = day_profile.profile_part(exposure, ranking, cfg.validation.profile_sample_rows)
    keys = vf.exposure_keys(exposure)
    _write_keys(cut, "exposure_keys", bucket, keys, vf.exposure_key_part(keys, cut.buckets))
    content = vf.content_keys(exposure)
    _write_keys(
        cut,
        "content_keys",
        bucket,
        pa.Table.from_pandas(content, preserve_index=False),
        vf.content_key_part(content, cut.buckets),
    )


def check_bucket(
    cfg: Config, cut: DayBuckets, params: dict[str, Any], bucket: int, runner: GxRunner | None = None
) -> BucketResult:
    """Run the per-request checks on one bucket and hand back what the day-level checks need
    (``runner``: this process's shared one by default, or the day's, to put a bucket in its Data Docs).

    GX's work is Python (it holds the GIL) while building frames and the bucket's summary is mostly
    pyarrow (it releases it), so the three overlap: the summary (counts, profile, keys) is built in
    one background thread from the start, and each log's frames in another, one log ahead of GX,
    cheapest first so that GX starts at once (measured: 2.4 -> 1.9 s a bucket of a 100k-request
    day, once GX's part had shrunk to 0.5 s and the frames had become the longer chain).
    Findings keep ``_batches``' order whatever the schedule. The whole bucket runs under pandas
    copy-on-write, as GX's runs do (``GxRunner``): the option is process-wide, and toggling it
    under another thread would mix the two modes."""
    tables = tuple(cut.read(log, bucket) for log in schema.RAW_LOGS)
    suites = {name: load_suite_json(name) for name in schema.RAW_LOGS}
    runner = runner or _runner(cfg)
    out = BucketResult(bucket)
    builders = _batches(cfg, cut.raw, *tables)
    findings: dict[str, list[Finding]] = {}
    with pd.option_context("mode.copy_on_write", True), ThreadPoolExecutor(2, "bucket-build") as pool:
        summary = pool.submit(_summarize, cfg, cut, bucket, tables, out)
        pending = pool.submit(builders[BUILD_ORDER[0]])
        for part, following in zip(BUILD_ORDER, [*BUILD_ORDER[1:], None]):
            batches = pending.result()
            if following is not None:  # one part ahead: a bucket holds two parts' frames at most
                pending = pool.submit(builders[following])
            findings[part] = [
                f
                for suite, batch, frame, file in batches
                for f in runner.run(suites[suite], batch, frame, params, file)
            ]
            del batches
        summary.result()
    out.findings = [f for part in builders for f in findings[part]]
    return out


def key_part_files(cut: DayBuckets, batch: str, part: int) -> list[str]:
    return cut.store.files(cut.store.join(KEYS_DIR, batch, f"part={part}"))


def check_key_part(
    cfg: Config, cut: DayBuckets, params: dict[str, Any], item: tuple[str, int]
) -> list[Finding]:
    """Uniqueness of a key that spans requests, on the one partition its duplicates would meet in."""
    batch, part = item
    files = key_part_files(cut, batch, part)
    if not files:
        return []
    frame = pa.concat_tables(cut.store.read(f) for f in files).to_pandas()
    suite = KEY_BATCHES[batch]
    label = cut.raw["exposure"]
    if batch == "content_keys":  # the request-level checks' label (``check_bucket``)
        label = f"{cut.raw['ranking']} + {label} (per request)"
    return _runner(cfg).run(load_suite_json(suite), batch, frame, params, label)
