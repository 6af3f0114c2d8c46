"""Engine choice for the bucketed data path: Dask distributed against Ray and Spark, measured here.

Why: the data path (validate, ingest, split) runs per request-hash bucket on a distributed engine;
this is the measurement behind choosing Dask. Each engine runs in a fresh process and is timed on:
start-up (to a cluster that has run one task) and teardown; 200 trivial tasks; the bucketed
workload on a simulated day (read exposure and ranking, hash-partition by request_id into 8
buckets, per (request_id, source) row count with the request's clicks, write every bucket); and
~10 GX expectations on one bucket (pandas GX inside a task for Dask/Ray, GX's Spark datasource
for Spark). Peak RSS is the sum over the driver's whole process tree (workers, raylet, JVM) and
its largest process, sampled every 0.1 s. Figures are ratios against Dask in the same run;
seconds are indications only. ``serial`` is the same pyarrow code in one process, no engine.

ray and pyspark are NOT project dependencies: install them only for this comparison, in a
scratch venv (pyspark[connect], or ``import great_expectations`` exits the process when run
from ``python -c``/stdin), then from the repo root:

    HAP_HOME=/tmp/engbench .venv/bin/hap simulate --days 1 --requests 100000
    /tmp/engines/bin/python -m bench.bench_engines --day /tmp/engbench/landing/dt=2026-11-01
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.common import machine, markdown_table, write_results

BUCKETS = 8
SLICE_GROUPS = 10  # row groups per cut task
LOGS = ("exposure", "ranking")
ENGINES = ("dask", "ray", "spark", "serial")
SOURCES = ["exposed", "rank_neg", "prerank_neg", "global_neg"]


class TreeSampler:
    """Peak RSS of this process and all its descendants: the sum, and the largest process."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.total, self.single = interval, 0.0, 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            rss = []
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss.append(proc.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            self.total, self.single = max(self.total, sum(rss)), max(self.single, max(rss))

    def take(self) -> tuple[float, float]:
        """The peaks since the last take (sampled once more now), then start again from zero."""
        time.sleep(self.interval * 1.5)
        peaks = (self.total, self.single)
        self.total = self.single = 0.0
        return peaks


def phase(res: dict[str, Any], name: str, t0: float, sampler: TreeSampler) -> None:
    res[f"{name}_s"] = time.perf_counter() - t0
    res[f"{name}_total_mb"], res[f"{name}_max_mb"] = sampler.take()


def noop(x: int) -> int:
    return x


def bucket_of(request_ids: np.ndarray) -> np.ndarray:
    from hap.core.hashing import mix64  # the project's hash (numpy only), same salt as hap.data.buckets

    return (mix64(request_ids, 0, 0xB0C3) % np.uint64(BUCKETS)).astype(np.int32)


def cut_slice(out: str, log: str, path: str, groups: list[int]) -> int:
    """One task of the cut: whole row groups of one log, written as one file per bucket."""
    table = pq.ParquetFile(path).read_row_groups(groups)
    buckets = bucket_of(table["request_id"].to_numpy())
    order = np.argsort(buckets, kind="stable")
    table, ends = table.take(order), np.cumsum(np.bincount(buckets, minlength=BUCKETS))
    for b in range(BUCKETS):
        folder = Path(out, "stage", log, f"bucket={b}")
        folder.mkdir(parents=True, exist_ok=True)
        start = int(ends[b - 1]) if b else 0
        pq.write_table(table.slice(start, int(ends[b]) - start), folder / f"slice-{groups[0]:05d}.parquet")
    return table.num_rows


def bucket_agg(out: str, b: int) -> int:
    """One bucket: its rows of each log as one file, and (request_id, source) -> rows, clicks."""
    tables = {log: ds.dataset(Path(out, "stage", log, f"bucket={b}")).to_table() for log in LOGS}
    counts = tables["ranking"].group_by(["request_id", "source"]).aggregate([([], "count_all")])
    clicks = tables["exposure"].group_by("request_id").aggregate([("click", "sum")])
    agg = counts.join(clicks, "request_id").rename_columns(["request_id", "source", "n", "clicks"])
    for name, table in {**tables, "agg": agg}.items():
        Path(out, name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, Path(out, name, f"bucket-{b}.parquet"))
    return sum(t.num_rows for t in tables.values())


def slices(day: Path) -> list[tuple[str, str, list[int]]]:
    out = []
    for log in LOGS:
        path = str(day / f"{log}.parquet")
        groups = list(range(pq.ParquetFile(path).metadata.num_row_groups))
        out += [(log, path, groups[i : i + SLICE_GROUPS]) for i in range(0, len(groups), SLICE_GROUPS)]
    return out


def expectations() -> list[Any]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("request_id", "item_id", "source")),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=SOURCES),
        gxe.ExpectColumnValuesToBeBetween(column="i_ctr", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="content_type", min_value=0, max_value=4),
        gxe.ExpectColumnValuesToBeBetween(column="rank_pos", min_value=1, max_value=200),  # nullable
        gxe.ExpectColumnValuesToNotBeNull(column="rank_pos", row_condition=Column("source") == "exposed"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["request_id", "item_id"]),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnMeanToBeBetween(column="i_quality", min_value=-1, max_value=1),
    ]


def probes() -> list[Any]:
    """Row conditions in pandas query syntax, as the project's suites write them (not timed)."""
    import great_expectations.expectations as gxe

    conditions = [
        'source == "prerank_neg"',
        'source in ["prerank_neg"]',
        '(source == "prerank_neg") & ~(item_id < 0)',
    ]
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="rank_pos", row_condition=c, condition_parser="pandas")
        for c in conditions
    ]


def gx_validate(frame: Any, spark: bool, suite: list[Any] | None = None) -> dict[str, list[Any]]:
    """Run the expectations on one in-memory frame; (success, unexpected count) per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_spark("s") if spark else context.data_sources.add_pandas("s")
    batch = source.add_dataframe_asset("bucket").add_batch_definition_whole_dataframe("all")
    gx_suite = context.suites.add(gx.ExpectationSuite(name="bucket", expectations=suite or expectations()))
    vd = context.validation_definitions.add(gx.ValidationDefinition(name="v", data=batch, suite=gx_suite))
    result = vd.run(batch_parameters={"dataframe": frame})
    out = {}
    for r in result.results:
        infos = [r.exception_info, *(v for v in r.exception_info.values() if isinstance(v, dict))]
        error = next(
            (str(x.get("exception_message"))[:200] for x in infos if x.get("raised_exception")), None
        )
        kwargs = r.expectation_config.kwargs
        key = " ".join(str(kwargs.get(k, "")) for k in ("column", "column_list", "row_condition")).strip()
        out[f"{r.expectation_config.type} {key}"] = [r.success, r.result.get("unexpected_count"), error]
    return out


def gx_pandas_task(path: str, probe: bool = False) -> tuple[float, dict[str, list[Any]]]:
    """What Dask/Ray run per bucket: read it with pandas, validate it with the project's pandas GX."""
    import pandas as pd

    start = time.perf_counter()
    found = gx_validate(pd.read_parquet(path), spark=False, suite=probes() if probe else None)
    return time.perf_counter() - start, found


def run_engine(engine: str, day: str, out: str, gx_path: str) -> dict[str, Any]:
    """One engine, in a fresh process: start-up, 200 tasks, the workload, GX, teardown."""
    os.environ["TQDM_DISABLE"] = "1"  # GX's progress bars
    sampler, res, t0 = TreeSampler(), {}, time.perf_counter()
    cut = [(out, *s) for s in slices(Path(day))]
    if engine == "serial":
        t0 = time.perf_counter()
        for c in cut:
            cut_slice(*c)
        res["rows"] = sum(bucket_agg(out, b) for b in range(BUCKETS))
        phase(res, "workload", t0, sampler)
        res["gx_cold_s"], res["gx"] = gx_pandas_task(gx_path)
        res["gx_warm_s"] = gx_pandas_task(gx_path)[0]
        return res
    if engine == "dask":
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
        client.submit(noop, 0).result()
        phase(res, "startup", t0, sampler)
        t0 = time.perf_counter()
        client.gather(client.map(noop, range(200), pure=False))
        res["tasks200_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.gather(client.map(cut_slice, *zip(*cut), pure=False))
        res["rows"] = sum(client.gather(client.map(bucket_agg, [out] * BUCKETS, range(BUCKETS), pure=False)))
        phase(res, "workload", t0, sampler)
        one = list(client.scheduler_info()["workers"])[:1]  # warm run on the same worker
        res["gx_cold_s"], res["gx"] = client.submit(gx_pandas_task, gx_path, pure=False, workers=one).result()
        res["gx_warm_s"] = client.submit(gx_pandas_task, gx_path, pure=False, workers=one).result()[0]
        res["gx_probes"] = client.submit(gx_pandas_task, gx_path, True, pure=False).result()[1]
        t0 = time.perf_counter()
        client.close()
        cluster.close()
    elif engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        r_noop, r_cut, r_agg, r_gx = (ray.remote(f) for f in (noop, cut_slice, bucket_agg, gx_pandas_task))
        ray.get(r_noop.remote(0))
        phase(res, "startup", t0, sampler)
        t0 = time.perf_counter()
        ray.get([r_noop.remote(i) for i in range(200)])
        res["tasks200_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get([r_cut.remote(*c) for c in cut])
        res["rows"] = sum(ray.get([r_agg.remote(out, b) for b in range(BUCKETS)]))
        phase(res, "workload", t0, sampler)
        res["gx_cold_s"], res["gx"] = ray.get(r_gx.remote(gx_path))
        res["gx_warm_s"] = ray.get(r_gx.remote(gx_path))[0]
        t0 = time.perf_counter()
        ray.shutdown()
    else:
        from pyspark import StorageLevel
        from pyspark.sql import SparkSession
        from pyspark.sql import functions as F

        builder = SparkSession.builder.master("local[2]").config("spark.ui.showConsoleProgress", "false")
        spark = builder.config("spark.sql.shuffle.partitions", str(BUCKETS)).getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        spark.sparkContext.parallelize([0], 1).map(noop).collect()
        phase(res, "startup", t0, sampler)
        t0 = time.perf_counter()
        spark.sparkContext.parallelize(range(200), 200).map(noop).collect()
        res["tasks200_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = {}
        for log in LOGS:
            frames[log] = spark.read.parquet(f"{day}/{log}.parquet").repartition(BUCKETS, "request_id")
            frames[log].persist(StorageLevel.MEMORY_AND_DISK).write.parquet(f"{out}/{log}")
        counts = frames["ranking"].groupBy("request_id", "source").agg(F.count("*").alias("n"))
        clicks = frames["exposure"].groupBy("request_id").agg(F.sum("click").alias("clicks"))
        counts.join(clicks, "request_id", "left").write.parquet(f"{out}/agg")
        res["rows"] = sum(
            pq.read_metadata(f).num_rows for log in LOGS for f in Path(out, log).glob("*.parquet")
        )
        phase(res, "workload", t0, sampler)
        for log in LOGS:
            frames[log].unpersist()
        for key in ("gx_cold_s", "gx_warm_s"):
            start = time.perf_counter()
            res["gx"] = gx_validate(spark.read.parquet(gx_path), spark=True)
            res[key] = time.perf_counter() - start
        res["gx_probes"] = gx_validate(spark.read.parquet(gx_path), True, probes())
        t0 = time.perf_counter()
        spark.stop()
    res["teardown_s"] = time.perf_counter() - t0
    time.sleep(1.0)
    res["left_after_teardown"] = [p.name() for p in psutil.Process().children(recursive=True)]
    return res


def _child(engine: str, args: tuple[str, str, str], conn: Any) -> None:
    # by module name, not __mp_main__: workers must find the task functions as bench.bench_engines.*
    from bench.bench_engines import run_engine

    try:
        conn.send(run_engine(engine, *args))
    except ImportError as exc:
        conn.send({"error": f"not installed: {exc}"})
    except Exception as exc:  # an engine that cannot start is a finding, not a crash
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        conn.send({"error": f"{type(exc).__name__}: {lines[0][:200]} ... {lines[-1][:300]}"})


def in_fresh_process(engine: str, args: tuple[str, str, str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(engine, args, child))
    proc.start()
    child.close()
    try:
        res = parent.recv()
    except EOFError:
        proc.join()
        res = {"error": f"process died (exit code {proc.exitcode})"}
    proc.join()
    return res


def check_output(out: Path) -> dict[str, int]:
    """Engine-independent check of what was written: rows per log, agg rows, sum of counts and clicks."""
    found = {log: ds.dataset(out / log).count_rows() for log in LOGS}
    agg = ds.dataset(out / "agg").to_table()
    per_request = agg.group_by("request_id").aggregate([("clicks", "max")])
    found |= {"agg_rows": agg.num_rows, "agg_n": int(pc.sum(agg["n"]).as_py())}
    return found | {"agg_clicks": int(pc.sum(per_request["clicks_max"]).as_py() or 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", required=True, help="landing folder of one day (exposure/ranking.parquet)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    repo = str(Path(__file__).resolve().parents[1])  # workers import bench/ and hap.core.hashing
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    day, work = Path(args.day), Path(tempfile.mkdtemp(prefix="bench-engines-"))
    ranking = pq.read_table(day / "ranking.parquet")
    gx_path = str(work / "gx_bucket.parquet")  # the same rows for every engine's GX run
    pq.write_table(ranking.filter(pa.array(bucket_of(ranking["request_id"].to_numpy()) == 0)), gx_path)
    gx_rows, versions, results = pq.read_metadata(gx_path).num_rows, {}, {}
    for engine in args.engines.split(","):
        module = {"dask": "distributed", "ray": "ray", "spark": "pyspark", "serial": "pyarrow"}[engine]
        try:
            versions[module] = __import__(module).__version__
        except ImportError as exc:
            results[engine] = {"error": f"not installed: {exc}"}
            continue
        print(f"running {engine} ...", flush=True)
        results[engine] = in_fresh_process(engine, (str(day), str(work / engine), gx_path))
        if "error" not in results[engine]:
            results[engine]["output"] = check_output(work / engine)
        shutil.rmtree(work / engine, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    import great_expectations

    versions["great_expectations"] = great_expectations.__version__
    base = results.get("dask", {})
    figures = [
        ("startup_s", "start-up to 1st task, s"),
        ("startup_total_mb", "idle cluster RSS, all processes, MB"),
        ("startup_max_mb", "idle cluster RSS, largest process, MB"),
        ("tasks200_s", "200 trivial tasks, s"),
        ("workload_s", f"bucketed workload ({BUCKETS} buckets), s"),
        ("workload_total_mb", "workload peak RSS, all processes, MB"),
        ("workload_max_mb", "workload peak RSS, largest process, MB"),
        ("gx_cold_s", f"GX on 1 bucket ({gx_rows:,} rows), first run, s"),
        ("gx_warm_s", "GX on 1 bucket, second run, s"),
        ("teardown_s", "teardown, s"),
    ]

    def cell(res: dict[str, Any], key: str) -> str:
        if "error" in res:
            return "failed"
        if key not in res:
            return "-"
        ratio = f" ({res[key] / base[key]:.2f}x)" if key in base and base[key] else ""
        return f"{res[key]:,.3g}{ratio}" if res[key] < 1000 else f"{res[key]:,.0f}{ratio}"

    rows = [[label, *(cell(results[e], key) for e in results)] for key, label in figures]
    table = markdown_table(["figure (ratio vs dask)", *results], rows)
    table += "\n\nVersions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    for key in ("gx", "gx_probes"):  # [success, unexpected count, error] per expectation, pandas vs Spark
        pandas_res, spark_res = base.get(key, {}), results.get("spark", {}).get(key, {})
        differ = {k: (v, spark_res.get(k)) for k, v in pandas_res.items() if spark_res.get(k) != v}
        table += f"\n\n{key}: {len(pandas_res)} expectations; pandas (Dask task) vs Spark native differ on: "
        table += str(differ or "none")
    for engine, res in results.items():
        if "error" in res:
            table += f"\n\n{engine}: {res['error']}"
    write_results("engines", {"day": str(day), "gx_rows": gx_rows, "versions": versions, **results}, table)
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
