"""The lake (Delta tables, ``hap.data.lake``) on local disk and on an S3 server, against plain pyarrow.

For one simulated day it times, on each storage (a local folder; ``s3://`` on a moto S3 server on
127.0.0.1 started here, the one the tests use):

- ``plain pyarrow read+write`` (the baseline): read the day's three landing files with
  ``pq.read_table`` and write them with ``pq.write_table`` to the same storage;
- ``ingest``: ``hap.data.ingest.ingest_day`` (cut into buckets, join, write each bucket's file into
  the lake, one Delta commit per table);
- ``split``: ``hap.data.split.build_training_set`` on a one-day window read from that lake (the
  training set itself is written locally, as the training-set store is another step's business);
- ``commit only``: re-committing the day's already written files (the table format's own cost).

With ``--main PATH`` it also times today's ingest (Parquet partitions published by folder rename)
from a checkout of the previous code at PATH, in a subprocess, on local disk: the format's cost
against what it replaces. Every figure is a ratio to the baseline measured in the same process on
the same storage. Usage: ``python -m bench.bench_lake [--requests 10000] [--main /path/to/main]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, volume_config, write_results

DAY = dt.date(2026, 11, 1)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def plain_read_write(cfg, url: str) -> None:
    """The baseline: the day's landing files read and written once with pyarrow, on ``url``'s storage."""
    import pyarrow.parquet as pq

    from hap.core import layout, schema
    from hap.data import lake

    fs, root = lake.filesystem(cfg, url)
    fs.create_dir(f"{root}/plain", recursive=True)
    for name in schema.RAW_LOGS:
        table = pq.read_table(layout.raw_log(cfg, DAY, name))
        pq.write_table(table, f"{root}/plain/{name}.parquet", filesystem=fs, compression="zstd")


def recommit(cfg) -> None:
    import pyarrow.parquet as pq

    from hap.data import lake
    from hap.data.ingest import LAKE_TARGETS

    for table in ("fullflow", "samples"):
        fs, _ = lake.filesystem(cfg, lake.table_url(cfg, table))
        files = []
        for p in lake.day_parts(cfg, table, DAY):
            path = lake.filesystem(cfg, p.uri)[1]
            rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
            size = fs.get_file_info(path).size
            files.append(lake.PartFile(p.bucket, p.uri.split(f"/{table}/", 1)[1], size, rows))
        lake.commit_day(cfg, table, DAY, LAKE_TARGETS[table][2], files)


def run_storage(home: Path, requests: int, lake_url: str | None, scratch_url: str) -> dict[str, float]:
    from hap.data.ingest import ingest_day
    from hap.data.markers import mark_validated
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_day

    overrides: dict[str, Any] = {"split.window_days": 1, "pipeline.date": DAY.isoformat()}
    if lake_url:
        overrides["paths.lake"] = lake_url
    cfg = volume_config(str(home), requests, overrides)
    simulate_day(cfg, DAY, progress=False)
    out = {"plain pyarrow read+write": min(_timed(plain_read_write, cfg, scratch_url) for _ in range(2))}
    out["ingest"] = _timed(ingest_day, cfg, DAY, False)
    mark_validated(cfg, DAY, {"source": "bench_lake"})
    out["split (1-day window)"] = _timed(build_training_set, cfg, DAY)
    out["commit only (2 tables)"] = _timed(recommit, cfg)
    out["ingest again (replace the day)"] = _timed(ingest_day, cfg, DAY, False)
    return out


_MAIN_INGEST = """
import sys, time
from bench.common import volume_config
from hap.data.ingest import ingest_day
from hap.sources.simulator import simulate_day
cfg = volume_config(sys.argv[1], int(sys.argv[2]))
day = cfg.simulate.start.__class__.fromisoformat("2026-11-01")
simulate_day(cfg, day, progress=False)
start = time.perf_counter(); ingest_day(cfg, day, require_validated=False)
print(time.perf_counter() - start)
"""


def run_main(main: Path, home: Path, requests: int) -> float:
    """Today's ingest (folder renames) from the checkout at ``main``, on local disk."""
    env = {**os.environ, "PYTHONPATH": str(main)}
    out = subprocess.run(
        [sys.executable, "-c", _MAIN_INGEST, str(home), str(requests)],
        env=env,
        cwd=main,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--main", type=Path, help="a checkout of the previous (folder-rename) lake code")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.s3_server import s3_server

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lake-") as tmp:
        root = Path(tmp)
        results["local disk"] = run_storage(root / "local", args.requests, None, str(root / "scratch"))
        if args.main:
            seconds = run_main(args.main, root / "main", args.requests)
            results["local disk"]["ingest, previous code (Parquet + folder rename)"] = seconds
        with s3_server() as s3:
            os.environ.update(s3.env)
            bucket = s3.create_bucket("bench-lake")
            results["S3 server (moto, 127.0.0.1)"] = run_storage(
                root / "s3", args.requests, f"{bucket}/lake", f"{bucket}/scratch"
            )
    rows = []
    for storage, figures in results.items():
        base = figures["plain pyarrow read+write"]
        rows += [[storage, name, seconds, seconds / base] for name, seconds in figures.items()]
    table = markdown_table(["storage", "stage", "s", "× plain pyarrow read+write"], rows)
    note = (
        f"\n\n{args.requests:,} requests/day, one day. Reproduce: "
        f"`nice .venv/bin/python -m bench.bench_lake --requests {args.requests}"
        f"{' --main ' + str(args.main) if args.main else ''}`."
    )
    write_results("lake", {"requests": args.requests, "results": results}, table + note)


if __name__ == "__main__":
    main()
