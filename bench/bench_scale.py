"""Scale: the bucketed data path (validate, ingest, split) at 100k and 1M requests a day, on one and
two Dask workers, against today's single-process path and plain pyarrow I/O, then a 3-day window
of the largest volume through split, one training epoch and evaluate.

Every stage runs in a fresh process; its figures are its wall time and the peak RSS of its
largest process (the stage's own, or one of its Dask worker processes: ``getrusage`` peaks, and
the process tree sampled every 0.2 s with psutil). Baselines in the same run:

- ``pyarrow I/O``: read the day's three raw logs and write them back, nothing else; ``pairs``
  runs it again just before each in-process step, ``--repeat`` times, because it moves with the
  page cache (2.3-4.0 s at 100k in one session) and one baseline per run makes the ratios noisy;
- ``running cluster``: the bucketed path against a Dask scheduler and 1 or 2 worker processes
  started and warmed up before the stages (as compose's long-lived workers are), so the speed-up
  from a second worker is not hidden by per-step start-up (``buckets, N worker(s)`` starts a local
  cluster inside each stage, and every worker imports GX);
- ``single-process (BASE)``: the data path as it was before buckets (commit ``--base``, checked
  out into a temporary worktree), on the same landing files. Its validate held the whole day in
  pandas (6.3 GB at 300k requests), so above ``--base-validate-max`` requests only its ingest and
  split run, on the marker written by today's validate.

Usage::

    python -m bench.bench_scale simulate --volumes 100000,1000000 --days 3   # once, ~10 min per 1M day
    python -m bench.bench_scale run --volumes 100000,1000000 --parts day --out scale_day
    python -m bench.bench_scale run --volumes 1000000 --parts window --out scale_window
    python -m bench.bench_scale pairs --volumes 100000 --repeat 3 --out scale_pairs

Figures go to ``bench/results/<out>.{json,md}``; ``run`` keeps what it measured so far if a
later stage fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
START = dt.date(2026, 11, 1)
ROOT = Path(tempfile.gettempdir()) / "hap-bench-scale"
BASE_COMMIT = "208ff89"  # the last single-process data path
DATA_STAGES = ("validate", "ingest", "split")

# Runs in a child interpreter whose ``hap`` is either this checkout or the baseline's worktree.
CHILD = r"""
import json, os, resource, sys, time, datetime as dt
from hap.core.config import load_config
stage, day, workers = sys.argv[1], dt.date.fromisoformat(sys.argv[2]), int(sys.argv[3])
overrides = json.loads(sys.argv[4])
env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
cfg = load_config(environ=env, overrides=overrides)
import threading, psutil
largest = [0]

def sample():  # the largest RSS of any process of this stage's tree (Dask workers included)
    me = psutil.Process()
    while True:
        for p in [me, *me.children(recursive=True)]:
            try:
                largest[0] = max(largest[0], p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)

threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()

def mapped(fn):
    if workers == 0:  # the baseline: no engine, no mapper
        return fn(None)
    from hap.core import engine
    with engine.session(cfg) as mapper:
        return fn(mapper)

def kw(m):
    return {} if m is None else {"mapper": m}

if stage == "validate":
    from hap.data.validate import validate_day
    rows = sum(mapped(lambda m: validate_day(cfg, day, **kw(m))).rows.values())
elif stage == "ingest":
    from hap.data.ingest import ingest_day
    rows = mapped(lambda m: ingest_day(cfg, day, **kw(m))).samples
elif stage == "split":
    from hap.data.split import build_training_set
    rows = mapped(lambda m: build_training_set(cfg, day, **kw(m))).lake_rows
elif stage == "train":
    from hap.model.train import train_day
    result = train_day(cfg, day)
    rows = getattr(result, "train_rows", 0)
elif stage == "evaluate":
    from hap.model.evaluate import evaluate_day
    evaluate_day(cfg, day)
    rows = 0
elif stage == "pyarrow-io":
    import pyarrow.parquet as pq
    from hap.core import layout
    out = cfg.home / "io-baseline"
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for name in ("exposure", "ranking", "fullflow"):
        table = pq.read_table(layout.raw_log(cfg, day, name))
        pq.write_table(table, out / f"{name}.parquet", compression="zstd")
        rows += table.num_rows
else:
    raise SystemExit(f"unknown stage {stage}")
seconds = time.perf_counter() - started
peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
peak = max(peak / 1024, largest[0] / 2**20)
print("BENCH " + json.dumps({"seconds": seconds, "rows": int(rows or 0), "peak_rss_mb": peak}))
"""


def overrides(requests: int, window: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "simulate.requests_per_day": requests,
        # ~4 requests per user a day, as at make run's scale: with 750 users a 1M-request day has 1,333
        # requests per user, and a user's requests collide on their millisecond timestamp (the
        # replay check rightly fails it: 30 duplicate exposures in 10M, measured)
        "simulate.n_users": max(750, requests // 4),
        "split.window_days": window,
        "validation.data_docs": False,
        "train.epochs": 1,
        **extra,
    }


def _simulate(home: str, requests: int, day: str) -> str:
    os.environ["HAP_HOME"] = home
    from hap.core.config import load_config
    from hap.sources.simulator import simulate_day

    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    cfg = load_config(environ=env, overrides=overrides(requests))
    simulate_day(cfg, dt.date.fromisoformat(day), progress=False)
    return f"{requests} {day}"


def landing_home(requests: int) -> Path:
    return ROOT / f"{requests}" / "landed"


def simulate(volumes: list[int], days: int) -> None:
    """Simulate every (volume, day) once, two at a time: each day is independent of the others."""
    jobs = [
        (str(landing_home(v)), v, (START + dt.timedelta(days=i)).isoformat())
        for v in volumes
        for i in range(days)
        if not (landing_home(v) / "landing" / f"dt={START + dt.timedelta(days=i)}").exists()
    ]
    with ProcessPoolExecutor(max_workers=2) as pool:
        for done in pool.map(_simulate, *zip(*jobs)) if jobs else []:
            print("simulated", done, flush=True)


def fresh_home(requests: int, name: str) -> Path:
    """A data root whose landing folder links to the shared simulated days."""
    home = ROOT / f"{requests}" / name
    shutil.rmtree(home, ignore_errors=True)
    (home / "landing").mkdir(parents=True)
    for day in sorted((landing_home(requests) / "landing").iterdir()):
        (home / "landing" / day.name).mkdir()
        for f in day.iterdir():
            os.link(f, home / "landing" / day.name / f.name)  # same inode: same size and mtime
    return home


def run_stage(
    code: Path, home: Path, stage: str, day: dt.date, workers: int, ov: dict[str, Any], watch: tuple = ()
) -> dict:
    """One stage in a fresh process; ``watch``: processes outside its tree whose memory counts too
    (a running cluster's workers)."""
    env = {**os.environ, "HAP_HOME": str(home), "PYTHONPATH": str(code)}
    env.pop("HAP_DASK_ADDRESS", None)
    with _peak_rss(watch) as outside:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, stage, day.isoformat(), str(workers), json.dumps(ov)],
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{stage} failed: {(proc.stderr or proc.stdout)[-1500:]}")
    out = json.loads(line[len("BENCH ") :])
    out["peak_rss_mb"] = max(out["peak_rss_mb"], outside[0] / 2**20)
    print(f"  {stage:10s} workers={workers} {out}", flush=True)
    return out


@contextlib.contextmanager
def _peak_rss(processes: tuple) -> Iterator[list[int]]:
    """The largest RSS of any of ``processes`` or their children while the block runs."""
    import psutil

    largest, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            for root in processes:
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in tree:
                    try:
                        largest[0] = max(largest[0], p.memory_info().rss)
                    except psutil.Error:
                        pass
            done.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield largest
    finally:
        done.set()
        thread.join()


def _gx_imported() -> bool:
    import importlib

    return importlib.import_module("great_expectations") is not None  # waits for the preload's import


@contextlib.contextmanager
def running_cluster(workers: int, logs: Path) -> Iterator[tuple[str, tuple]]:
    """A Dask scheduler and ``workers`` worker processes on 127.0.0.1, started once and warmed up
    before any stage runs: the production shape (compose's and Kubernetes' workers are long-lived),
    so a stage pays no cluster or worker start-up. Yields the address and the processes to watch."""
    import psutil
    from distributed import Client

    from hap.core.config import load_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    engine = load_config().engine
    preload = [arg for module in engine.worker_preload for arg in ("--preload", module)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs.mkdir(parents=True, exist_ok=True)
    commands = [
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        [dask, "worker", address, "--nworkers", str(workers), "--nthreads", "1", "--host", "127.0.0.1"]
        + ["--memory-limit", engine.worker_memory, "--no-dashboard", *preload],
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT
        )
        for name, cmd in zip(("scheduler", "workers"), commands)
    ]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
            assert all(client.run(_gx_imported).values())
        yield address, tuple(psutil.Process(p.pid) for p in procs)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def base_worktree(commit: str) -> Path:
    path = ROOT / f"base-{commit}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True)
    return path


def bench_day(requests: int, base: Path, base_validate_max: int) -> list[dict[str, Any]]:
    """One day through each path; rows of (path, stage, figures)."""
    ov = overrides(requests)
    rows: list[dict[str, Any]] = []

    def add(path: str, stage: str, figures: dict) -> None:
        rows.append({"requests": requests, "path": path, "stage": stage, **figures})

    add(
        "pyarrow I/O", "read + write", run_stage(REPO, fresh_home(requests, "io"), "pyarrow-io", START, 1, ov)
    )
    home = fresh_home(requests, "base")
    base_path = f"single-process ({BASE_COMMIT})"
    if requests <= base_validate_max:
        add(base_path, "validate", run_stage(base, home, "validate", START, 0, ov))
    else:  # its ingest and split still run: today's validate writes the same marker they require
        run_stage(REPO, home, "validate", START, 1, ov)
    add(base_path, "ingest", run_stage(base, home, "ingest", START, 0, ov))
    add(base_path, "split", run_stage(base, home, "split", START, 0, ov))
    for workers in (1, 2):
        home = fresh_home(requests, f"buckets-{workers}")
        wov = {**ov, "engine.workers": workers}
        for stage in DATA_STAGES:
            add(f"buckets, {workers} worker(s)", stage, run_stage(REPO, home, stage, START, workers, wov))
    for workers in (1, 2):
        home = fresh_home(requests, f"cluster-{workers}")
        with running_cluster(workers, home / "cluster-logs") as (address, watch):
            cov = {**ov, "engine.address": address}
            for stage in DATA_STAGES:
                figures = run_stage(REPO, home, stage, START, 1, cov, watch)
                add(f"running cluster, {workers} worker(s)", stage, figures)
    return rows


def bench_window(requests: int, days: int) -> list[dict[str, Any]]:
    """A ``days``-day window of ``requests`` a day on two workers, through split, one epoch, evaluate."""
    ov = overrides(requests, window=days, **{"engine.workers": 2})
    home = fresh_home(requests, "window")
    rows = []
    window = [START + dt.timedelta(days=i) for i in range(days)]
    for day in window:
        for stage in ("validate", "ingest"):
            rows.append(
                {"requests": requests, "path": f"window of {days} days, 2 workers", "stage": f"{stage} {day}"}
                | run_stage(REPO, home, stage, day, 2, ov)
            )
    for stage, workers in (("split", 2), ("train", 1), ("evaluate", 1)):
        rows.append(
            {"requests": requests, "path": f"window of {days} days, 2 workers", "stage": stage}
            | run_stage(REPO, home, stage, window[-1], workers, ov)
        )
    return rows


def bench_pairs(requests: int, repeat: int) -> list[dict[str, Any]]:
    """Each in-process data step right after its own pyarrow I/O baseline, ``repeat`` times."""
    ov = {**overrides(requests), "engine.workers": 1}
    rows = []
    for attempt in range(1, repeat + 1):
        home = fresh_home(requests, "pairs")
        for stage in DATA_STAGES:
            io = run_stage(REPO, fresh_home(requests, "io"), "pyarrow-io", START, 1, ov)
            step = run_stage(REPO, home, stage, START, 1, ov)
            rows.append(
                {
                    "requests": requests,
                    "attempt": attempt,
                    "stage": stage,
                    "seconds": step["seconds"],
                    "pyarrow_io_seconds": io["seconds"],
                    "peak_rss_mb": step["peak_rss_mb"],
                }
            )
    return rows


def summarize_pairs(rows: list[dict[str, Any]]) -> str:
    table = [
        [
            f"{r['requests']:,}",
            r["attempt"],
            r["stage"],
            r["seconds"],
            r["pyarrow_io_seconds"],
            r["seconds"] / r["pyarrow_io_seconds"],
            r["peak_rss_mb"],
        ]
        for r in rows
    ]
    headers = ["requests/day", "attempt", "stage", "s", "pyarrow I/O just before, s", "× pyarrow I/O"]
    return markdown_table([*headers, "peak RSS MB"], table)


def with_data_path(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, plus a ``data path`` row (validate + ingest + split) for each path that ran all three."""
    out = list(rows)
    paths = dict.fromkeys((r["requests"], r["path"]) for r in rows if r["stage"] in DATA_STAGES)
    for requests, path in paths:
        mine = [
            r for r in rows if (r["requests"], r["path"]) == (requests, path) and r["stage"] in DATA_STAGES
        ]
        if len(mine) == len(DATA_STAGES):
            out.append(
                {
                    "requests": requests,
                    "path": path,
                    "stage": "data path",
                    "seconds": sum(r["seconds"] for r in mine),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                }
            )
    return out


def _family(path: str) -> str:
    """``buckets`` or ``running cluster``: paths that differ only in their number of workers."""
    return path.split(",")[0]


def summarize(rows: list[dict[str, Any]]) -> str:
    """The table, with each stage's ratio to pyarrow I/O, to the single-process path, to one worker,
    and its peak memory against the same path and stage at the smallest volume."""
    rows = with_data_path(rows)
    io = {r["requests"]: r["seconds"] for r in rows if r["path"] == "pyarrow I/O"}
    base = {(r["requests"], r["stage"]): r["seconds"] for r in rows if r["path"].startswith("single")}
    one = {  # each way of running buckets against its own 1-worker run
        (r["requests"], _family(r["path"]), r["stage"]): r["seconds"]
        for r in rows
        if r["path"].endswith(", 1 worker(s)")
    }
    smallest = min(r["requests"] for r in rows)
    rss = {(r["path"], r["stage"]): r["peak_rss_mb"] for r in rows if r["requests"] == smallest}
    table = []
    for r in rows:
        key = (r["requests"], r["stage"])
        table.append(
            [
                f"{r['requests']:,}",
                r["path"],
                r["stage"],
                r["seconds"],
                r["peak_rss_mb"],
                r["seconds"] / io[r["requests"]] if r["requests"] in io else "-",
                r["seconds"] / base[key] if key in base else "-",
                one[(*key[:1], _family(r["path"]), key[1])] / r["seconds"]
                if (*key[:1], _family(r["path"]), key[1]) in one
                else "-",
                r["peak_rss_mb"] / rss[(r["path"], r["stage"])]
                if r["requests"] != smallest and (r["path"], r["stage"]) in rss
                else "-",
            ]
        )
    return markdown_table(
        [
            "requests/day",
            "path",
            "stage",
            "s",
            "peak RSS MB (largest process)",
            "× pyarrow I/O",
            "× single-process",
            "speed-up vs 1 worker",
            f"peak RSS × {smallest:,}/day",
        ],
        table,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["simulate", "run", "pairs"])
    parser.add_argument("--volumes", default="100000,1000000")
    parser.add_argument("--days", type=int, default=3, help="window of the largest volume")
    parser.add_argument("--base", default=BASE_COMMIT)
    parser.add_argument("--base-validate-max", type=int, default=300_000)
    parser.add_argument("--parts", default="day,window", help="day: per-volume paths; window: the window")
    parser.add_argument("--out", default="scale", help="results name under bench/results/")
    parser.add_argument("--repeat", type=int, default=3, help="pairs: rounds of each step and its baseline")
    args = parser.parse_args()
    volumes = [int(v) for v in args.volumes.split(",")]
    if args.command == "simulate":
        simulate(volumes[:-1], 1)
        simulate(volumes[-1:], args.days)
        return
    if args.command == "pairs":
        rows = [r for requests in volumes for r in bench_pairs(requests, args.repeat)]
        write_results(args.out, {"rows": rows}, summarize_pairs(rows))
        return
    base = base_worktree(args.base)
    rows: list[dict[str, Any]] = []
    try:
        for requests in volumes if "day" in args.parts else []:
            print(f"{requests:,} requests a day", flush=True)
            rows += bench_day(requests, base, args.base_validate_max)
        if "window" in args.parts:
            rows += bench_window(volumes[-1], args.days)
    finally:
        if rows:
            write_results(args.out, {"rows": rows, "base": args.base}, summarize(rows))


if __name__ == "__main__":
    main()
