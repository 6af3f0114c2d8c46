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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hap.core import schema
from hap.core.config import Config
from hap.data import frames as vf
from hap.data.buckets import STAGING_SUFFIX, DayBuckets, read_staged, write_partitioned
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
    write_partitioned(table, "part", part, cut.root / KEYS_DIR / batch, f"bucket-{bucket:05d}")


def check_bucket(
    cfg: Config, cut: DayBuckets, params: dict[str, Any], bucket: int, runner: GxRunner | None = None
) -> BucketResult:
    """Run the per-request checks on one bucket and hand back what the day-level checks need
    (``runner``: this process's shared one by default, or the day's, to put a bucket in its Data Docs)."""
    exposure, ranking, fullflow = (cut.read(log, bucket) for log in schema.RAW_LOGS)
    suites = {name: load_suite_json(name) for name in schema.RAW_LOGS}
    files = cut.raw
    runner = runner or _runner(cfg)
    out = BucketResult(bucket)
    out.findings += runner.run(
        suites["exposure"], "rows", vf.exposure_rows(exposure, ranking), params, files["exposure"]
    )
    out.findings += runner.run(suites["ranking"], "rows", vf.ranking_rows(ranking), params, files["ranking"])
    out.findings += runner.run(
        suites["ranking"], "positions", vf.ranking_positions(ranking), params, files["ranking"]
    )
    for batch, frame in vf.source_positions(ranking).items():
        out.findings += runner.run(suites["ranking"], batch, frame, params, files["ranking"])
    per_request = vf.requests_frame(exposure, ranking, cfg.contract.global_neg_per_pos)
    out.findings += runner.run(
        suites["ranking"],
        "requests",
        per_request,
        params,
        f"{files['ranking']} + {files['exposure']} (per request)",
    )
    out.findings += runner.run(
        suites["fullflow"], "rows", vf.fullflow_rows(fullflow, exposure), params, files["fullflow"]
    )
    out.counts = vf.bucket_counts(exposure, ranking, fullflow)
    out.profile = vf.profile_part(exposure, ranking, cfg.validation.profile_sample_rows)
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
    return out


def key_part_files(cut: DayBuckets, batch: str, part: int) -> list[Path]:
    return sorted((cut.root / KEYS_DIR / batch / f"part={part}").glob(f"*{STAGING_SUFFIX}"))


def check_key_part(
    cfg: Config, cut: DayBuckets, params: dict[str, Any], item: tuple[str, int]
) -> list[Finding]:
    """Uniqueness of a key that spans requests, on the one partition its duplicates would meet in."""
    batch, part = item
    files = key_part_files(cut, batch, part)
    if not files:
        return []
    frame = pa.concat_tables(read_staged(f) for f in files).to_pandas()
    suite = KEY_BATCHES[batch]
    label = cut.raw["exposure"]
    if batch == "content_keys":  # the request-level checks' label (``check_bucket``)
        label = f"{cut.raw['ranking']} + {label} (per request)"
    return _runner(cfg).run(load_suite_json(suite), batch, frame, params, label)
