"""Validation time against reading the same day with pyarrow, as a ratio.

For one simulated, landed day (default 100k requests: about 1M exposure rows and 3.3M ranking
rows), each measured stage runs in a fresh process (honest peak RSS, imports included):
- ``read``: the baseline, ``pyarrow.parquet.read_table`` of the day's three raw logs;
- ``validate``: ``hap.validate.validate_day`` as the pipeline runs it (GX suites, Data Docs,
  summary, marker).
The target is validation under 60 s on 2 cores for 100k requests.

Usage: python -m bench.bench_validate [--requests 100000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile

from bench.common import markdown_table, measure, volume_config, write_results

DAY = dt.date(2026, 11, 1)


def _cfg(home: str, requests: int, docs: bool = True):
    return volume_config(home, requests, {"validation.data_docs": docs})


def prepare(home: str, requests: int) -> int:
    """Land one simulated day (validation reads the landing files, before ingest)."""
    from hap.sources.simulator import simulate_day

    stats = simulate_day(_cfg(home, requests), DAY, progress=False)
    return stats.exposures + stats.ranking_rows + stats.fullflow_rows


def read_day(home: str, requests: int) -> int:
    import pyarrow.parquet as pq

    from hap.core import layout, schema

    cfg = _cfg(home, requests)
    return sum(pq.read_table(layout.raw_log(cfg, DAY, n)).num_rows for n in schema.RAW_LOGS)


def validate(home: str, requests: int, docs: bool = True) -> int:
    from hap.data.validate import validate_day

    report = validate_day(_cfg(home, requests, docs), DAY)
    return sum(report.rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="hap-bench-validate-")
    try:
        prep = measure("simulate", prepare, home, args.requests)
        read = measure("read (pyarrow)", read_day, home, args.requests)
        val = measure("validate", validate, home, args.requests, True)
        val_nodocs = measure("validate, no Data Docs", validate, home, args.requests, False)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    rows = [
        [m.name, m.rows, m.seconds, m.peak_rss_mb, m.seconds / read.seconds] for m in (read, val, val_nodocs)
    ]
    table = markdown_table(["stage", "rows", "seconds", "peak RSS MB", "x read"], rows)
    print(
        f"validation of one day at {args.requests:,} requests ({prep.rows:,} raw rows; "
        f"simulate took {prep.seconds:.1f}s)"
    )
    print(table)
    write_results(
        "validate",
        {
            "requests": args.requests,
            "read_s": read.seconds,
            "validate_s": val.seconds,
            "validate_nodocs_s": val_nodocs.seconds,
            "ratio": val.seconds / read.seconds,
            "peak_rss_mb": val.peak_rss_mb,
            "rows": val.rows,
        },
        table,
    )


if __name__ == "__main__":
    main()
