"""Data path: ingest, validate and split for one day at several volumes.

Each stage runs in a fresh process (honest peak RSS). Baselines in the same run:
- the I/O limit: plain pyarrow reading the day's raw logs and writing them back as Parquet;
- DuckDB doing the same join (exposures onto the ranking log, request side attached) and the
  same difficulty split, written as Parquet.

Usage: python -m bench.bench_data_path [--volumes 10000,100000,300000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
from pathlib import Path

from bench.common import Measurement, markdown_table, measure, volume_config, volume_rows, write_results

DAY = dt.date(2026, 11, 1)


def _cfg(home: str, requests: int):
    return volume_config(home, requests, {"split.window_days": 1, "pipeline.date": DAY.isoformat()})


def run_simulate(home: str, requests: int) -> int:
    from hap.sources.simulator import simulate_day

    return simulate_day(_cfg(home, requests), DAY, progress=False).requests


def run_ingest(home: str, requests: int) -> int:
    from hap.data.ingest import ingest_day

    return ingest_day(_cfg(home, requests), DAY, require_validated=False).samples


def run_validate(home: str, requests: int) -> int:
    from hap.data.validate import validate_day

    validate_day(_cfg(home, requests), DAY)
    import pyarrow.parquet as pq

    from hap.core import layout

    cfg = _cfg(home, requests)
    return sum(pq.read_metadata(layout.raw_log(cfg, DAY, n)).num_rows for n in ("exposure", "ranking"))


def run_split(home: str, requests: int) -> int:
    from hap.data.split import build_training_set

    report = build_training_set(_cfg(home, requests), DAY)
    return int(getattr(report, "rows", 0) or getattr(report, "train_rows", 0))


def run_pyarrow_io(home: str, requests: int) -> int:
    """The I/O limit: read every raw log and write it back, nothing else."""
    import pyarrow.parquet as pq

    from hap.core import layout

    cfg = _cfg(home, requests)
    out = Path(home) / "io-baseline"
    out.mkdir(exist_ok=True)
    rows = 0
    for name in ("exposure", "ranking", "fullflow"):
        table = pq.read_table(layout.raw_log(cfg, DAY, name))
        pq.write_table(table, out / f"{name}.parquet", compression="zstd")
        rows += table.num_rows if name == "ranking" else 0
    return rows


def run_duckdb(home: str, requests: int) -> int:
    """The same join and difficulty split in DuckDB SQL."""
    import duckdb

    from hap.core import layout, schema

    cfg = _cfg(home, requests)
    exp, rank = layout.raw_log(cfg, DAY, "exposure"), layout.raw_log(cfg, DAY, "ranking")
    out = Path(home) / "duckdb-baseline"
    shutil.rmtree(out, ignore_errors=True)
    req_cols = ", ".join(f"r.{c}" for c in schema.REQUEST_FEATURES)
    hard = ", ".join(f"'{s}'" for s in schema.HARD_SOURCES)
    con = duckdb.connect()
    con.execute(f"""
        COPY (
          WITH req AS (
            SELECT * EXCLUDE (rn) FROM (
              SELECT *, row_number() OVER (PARTITION BY request_id ORDER BY position) AS rn
              FROM read_parquet('{exp}')) WHERE rn = 1),
          joined AS (
            SELECT k.*, r.timestamp, r.user_id, {req_cols},
                   CASE WHEN k.source = 'exposed' AND e.click = 1 THEN 'expose_pos'
                        WHEN k.source = 'exposed' THEN 'expose_neg' ELSE k.source END AS sample_source,
                   coalesce(e.click, 0) AS label
            FROM read_parquet('{rank}') k
            JOIN req r USING (request_id)
            LEFT JOIN read_parquet('{exp}') e ON e.request_id = k.request_id AND e.item_id = k.item_id
                                              AND k.source = 'exposed')
          SELECT *, CASE WHEN sample_source = 'expose_pos' THEN 'positive'
                         WHEN sample_source IN ({hard}) THEN 'hard' ELSE 'easy' END AS difficulty
          FROM joined
        ) TO '{out}' (FORMAT parquet, PARTITION_BY (difficulty), COMPRESSION zstd)
    """)
    return con.execute(f"SELECT count(*) FROM read_parquet('{out}/*/*.parquet')").fetchone()[0]


def bench_volume(requests: int) -> list[Measurement]:
    home = tempfile.mkdtemp(prefix=f"hap-bench-{requests}-")
    try:
        results = [
            measure("simulate", run_simulate, home, requests),
            measure("pyarrow I/O (baseline)", run_pyarrow_io, home, requests),
            measure("ingest", run_ingest, home, requests),
        ]
        for name, fn in (("validate", run_validate), ("split", run_split)):
            try:
                results.append(measure(name, fn, home, requests))
            except Exception as err:  # a stage that fails is reported, not hidden
                print(f"{name} at {requests}: {type(err).__name__}: {err}")
        results.append(measure("duckdb join+split", run_duckdb, home, requests))
        done = {m.name: m for m in results}
        if "split" in done:  # what DuckDB's one query does: the join (ingest) and the split
            results.append(
                Measurement(
                    "ingest + split (vs DuckDB's join+split)",
                    done["ingest"].seconds + done["split"].seconds,
                    max(done["ingest"].peak_rss_mb, done["split"].peak_rss_mb),
                    done["ingest"].rows,
                )
            )
        return results
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", default="10000,100000,300000")
    args = parser.parse_args()
    volumes = [int(v) for v in args.volumes.split(",")]
    rows, payload = [], {}
    for requests in volumes:
        ms = bench_volume(requests)
        base = next(m for m in ms if m.name.startswith("pyarrow"))
        duck = next(m for m in ms if m.name.startswith("duckdb"))
        payload[requests] = [m.figures() for m in ms]
        rows += volume_rows(requests, ms, base, duck)
    table = markdown_table(
        ["requests/day", "stage", "s", "rows", "rows/s", "peak RSS MB", "× pyarrow I/O", "× DuckDB"], rows
    )
    write_results("data_path", {"volumes": payload}, table)


if __name__ == "__main__":
    main()
