"""Split throughput and peak RSS against DuckDB doing the same grouping on the same lake.

For each volume (requests per day) it simulates and ingests a window of days once, marks them
validated (this benchmark measures the split, not validation), then runs in fresh processes:

- ``split``: ``hap.split.build_training_set`` (sampling hash, group/difficulty, Hive partitions,
  eval set, data-version hash);
- ``pyarrow scan``: reading the same lake columns batch by batch, nothing else (the I/O floor);
- ``split w/o write``: scan + sampling + group/difficulty labelling, without writing (so
  ``split - this`` is the Parquet encode/compress/write cost and ``this - scan`` the compute);
- ``duckdb``: one SQL ``COPY`` doing the same per-source sampling, group/difficulty columns and
  difficulty partitioning, plus the eval-set selection, into zstd Parquet.

Rows are the lake rows read. Usage: ``python -m bench.bench_split [--volumes 10000,100000] [--days 1]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
from pathlib import Path

from bench.common import Measurement, markdown_table, measure, volume_config, volume_rows, write_results

END = dt.date(2026, 11, 1)


def _cfg(home: str, requests: int, days: int):
    return volume_config(home, requests, {"split.window_days": days, "pipeline.date": END.isoformat()})


def prepare(home: str, requests: int, days: int) -> int:
    from hap.core import layout
    from hap.data.ingest import ingest_day
    from hap.data.markers import mark_validated
    from hap.sources.simulator import simulate_day

    cfg = _cfg(home, requests, days)
    rows = 0
    for day in layout.window(END, days):
        simulate_day(cfg, day, progress=False)
        rows += ingest_day(cfg, day, require_validated=False).samples
        mark_validated(cfg, day, {"source": "bench_split (validation not measured here)"})
    return rows


def run_split(home: str, requests: int, days: int) -> int:
    from hap.data.split import build_training_set

    return build_training_set(_cfg(home, requests, days), END).lake_rows


def _window_datasets(cfg, days: int):
    from hap.core import layout
    from hap.data.split import _lake_dataset

    return {day: _lake_dataset(cfg, "samples", day) for day in layout.window(END, days)}


def run_scan(home: str, requests: int, days: int) -> int:
    from hap.core import schema
    from hap.data.split import stream_batches

    cfg = _cfg(home, requests, days)
    cols = [c for c in schema.TRAINING_SET.names if c not in ("dt", "group", "difficulty")]
    rows = 0
    for dataset in _window_datasets(cfg, days).values():
        for batch in stream_batches(dataset, cols, cfg.split.batch_rows):
            rows += batch.num_rows
    return rows


def run_label_only(home: str, requests: int, days: int) -> int:
    import pyarrow.compute as pc

    from hap.core import schema
    from hap.data.split import DIFFICULTIES, _label_batch, _sample_ratios, stream_batches

    cfg = _cfg(home, requests, days)
    cols = [c for c in schema.TRAINING_SET.names if c not in ("dt", "group", "difficulty")]
    ratios, rows = _sample_ratios(cfg), 0
    for day, dataset in _window_datasets(cfg, days).items():
        for batch in stream_batches(dataset, cols, cfg.split.batch_rows):
            rows += batch.num_rows
            table, _ = _label_batch(batch, day, cfg, ratios, None)
            for difficulty in DIFFICULTIES:
                table.filter(pc.equal(table["difficulty"], difficulty))
    return rows


def run_duckdb(home: str, requests: int, days: int, write: bool = True) -> int:
    import duckdb

    from hap.core import layout, schema
    from hap.data import lake

    cfg = _cfg(home, requests, days)
    out = Path(home) / "duckdb-split"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    files = ", ".join(
        f"'{p.uri}'" for d in layout.window(END, days) for p in lake.day_parts(cfg, "samples", d)
    )
    ratio = " ".join(f"WHEN '{s}' THEN {cfg.split.sample_ratio.get(s, 1.0)}" for s in schema.SOURCES)
    group = " ".join(f"WHEN '{s}' THEN '{g}'" for s, g in schema.GROUP_OF_SOURCE.items())
    diff = " ".join(f"WHEN '{s}' THEN '{d}'" for s, d in schema.DIFFICULTY_OF_SOURCE.items())
    features = ", ".join(schema.FEATURE_COLUMNS)
    con = duckdb.connect()
    select = f"""
          SELECT regexp_extract(filename, 'dt=([0-9-]+)', 1) AS dt, request_id, item_id, source,
                 CASE source {group} END AS "group", CASE source {diff} END AS difficulty, label,
                 retrieval_pos, prerank_pos, rank_pos, content_type, {features}
          FROM read_parquet([{files}], filename = true)
          WHERE (hash(request_id, item_id, {cfg.split.seed}) % 1000000) / 1000000.0
                < CASE source {ratio} END"""
    if not write:  # the same scan and expressions, aggregated instead of written
        cols = ", ".join(["dt", '"group"', "difficulty", "source", "label", *schema.FEATURE_COLUMNS])
        return con.execute(
            f"SELECT count(*), {', '.join(f'count({c})' for c in cols.split(', '))} FROM ({select})"
        ).fetchone()[0]
    con.execute(
        f"COPY ({select}) TO '{out}/train' (FORMAT parquet, PARTITION_BY (difficulty), COMPRESSION zstd)"
    )
    fullflow = ", ".join(f"'{p.uri}'" for p in lake.day_parts(cfg, "fullflow", END))
    con.execute(f"""
        COPY (
          WITH chosen AS (SELECT DISTINCT request_id FROM read_parquet([{fullflow}])
                          ORDER BY hash(request_id, {cfg.split.seed}), request_id
                          LIMIT {cfg.split.eval_max_requests})
          SELECT f.* FROM read_parquet([{fullflow}]) f SEMI JOIN chosen USING (request_id)
        ) TO '{out}/eval.parquet' (FORMAT parquet, COMPRESSION zstd)
    """)
    return con.execute(f"SELECT count(*) FROM read_parquet([{files}])").fetchone()[0]


def bench_volume(requests: int, days: int, keep: bool) -> list[Measurement]:
    home = tempfile.mkdtemp(prefix=f"hap-bench-split-{requests}-")
    try:
        prep = measure("prepare (simulate+ingest, not compared)", prepare, home, requests, days)
        print(
            f"prepared {requests:,} requests/day x {days} day(s): "
            f"{prep.rows:,} lake rows in {prep.seconds:.0f}s"
        )
        return [
            measure("split", run_split, home, requests, days),
            measure("pyarrow scan (I/O floor)", run_scan, home, requests, days),
            measure("split w/o write (scan+label)", run_label_only, home, requests, days),
            measure("duckdb same grouping", run_duckdb, home, requests, days),
            measure("duckdb w/o write (scan+expressions)", run_duckdb, home, requests, days, False),
        ]
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", default="10000,100000")
    parser.add_argument("--days", type=int, default=1, help="window days (each simulated at the volume)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lake")
    args = parser.parse_args()
    rows, payload, notes = [], {}, []
    for requests in (int(v) for v in args.volumes.split(",")):
        ms = bench_volume(requests, args.days, args.keep)
        split, scan, label, duck, duck_nowrite = ms
        payload[requests] = [m.figures() for m in ms]
        rows += volume_rows(requests, ms, split, duck)
        write_s, compute_s = split.seconds - label.seconds, label.seconds - scan.seconds
        slower = "split" if split.seconds > duck.seconds else "duckdb"
        if slower == "split":
            parts = {
                "Parquet encode+zstd+write (and eval set, hashing)": write_s,
                "per-batch compute (hash, index_in, filters, casts)": compute_s,
                "scan/decode": scan.seconds,
            }
            worst = max(parts, key=parts.get)
            why = (
                f"split is {split.seconds / duck.seconds:.2f}x DuckDB; its largest part is {worst} "
                f"({parts[worst]:.1f}s of {split.seconds:.1f}s: scan {scan.seconds:.1f}s, compute "
                f"{compute_s:.1f}s, write {write_s:.1f}s)"
            )
        else:
            d_write = duck.seconds - duck_nowrite.seconds
            worst = (
                "the partitioned Parquet write (PARTITION_BY + zstd)"
                if d_write > duck_nowrite.seconds
                else "the scan with its expressions"
            )
            why = (
                f"DuckDB is {duck.seconds / split.seconds:.2f}x split; its largest part is {worst}: "
                f"scan+expressions {duck_nowrite.seconds:.1f}s, write {d_write:.1f}s (+ eval set), "
                f"peak RSS {duck.peak_rss_mb:.0f} MB vs {split.peak_rss_mb:.0f} MB"
            )
        payload[f"bottleneck_{requests}"] = why
        notes.append(f"- {requests:,} requests/day: {why}.")
    table = markdown_table(
        ["requests/day", "stage", "s", "lake rows", "rows/s", "peak RSS MB", "× split", "× DuckDB"], rows
    )
    write_results("split", {"days": args.days, "volumes": payload}, table + "\n\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
