"""Shared benchmark plumbing: timing, peak memory in a clean child process, result tables.

Machines here are shared and noisy, so each benchmark runs its baseline in the same process
and reports ratios; absolute seconds are printed only as indications.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"

# The full-flow log is a count of requests a day (params.yaml), so at 100k+ requests it stays a
# small share of the day; volume benchmarks keep the default count.
PRODUCTION_LIKE: dict[str, object] = {}


@dataclass
class Measurement:
    name: str
    seconds: float
    peak_rss_mb: float
    rows: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")

    def figures(self) -> dict[str, Any]:
        """Its fields and its throughput, for a result's JSON."""
        return self.__dict__ | {"rows_per_s": self.rows_per_s}


def volume_config(home: str, requests: int, overrides: dict[str, Any] | None = None):
    """The repo's config rooted at ``home``, at ``requests`` a day and production-like otherwise,
    plus ``overrides`` (dotted keys). The shell's ``HAP__`` variables are left out: a benchmark
    measures the repo's settings."""
    from hap.core.config import load_config

    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    env["HAP_HOME"] = home
    settings = {"simulate.requests_per_day": requests, **PRODUCTION_LIKE, **(overrides or {})}
    return load_config(environ=env, overrides=settings)


def _child(fn: Callable[..., int], args: tuple, conn) -> None:
    start = time.perf_counter()
    rows = fn(*args)
    seconds = time.perf_counter() - start
    conn.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, int(rows or 0)))
    conn.close()


def measure(name: str, fn: Callable[..., int], *args: Any) -> Measurement:
    """Run ``fn(*args)`` in a fresh spawned process; ``fn`` returns the rows it processed.

    A fresh process gives an honest peak RSS for that stage alone (interpreter and imports
    included; ``import_floor`` measures that floor).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, child))
    proc.start()
    child.close()
    seconds, rss, rows = parent.recv()
    proc.join()
    return Measurement(name, seconds, rss, rows)


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"
    )


def volume_rows(requests: int, measurements: list[Measurement], *baselines: Measurement) -> list[list[Any]]:
    """Table rows of one volume: each stage's figures, then its time as a multiple of each baseline's."""
    return [
        [f"{requests:,}", m.name, m.seconds, m.rows, m.rows_per_s, m.peak_rss_mb]
        + [m.seconds / b.seconds for b in baselines]
        for m in measurements
    ]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def code_version(*folders: str) -> str:
    """The git trees of ``folders`` (``-dirty`` with uncommitted changes there): a cache key that
    changes with the code that made a cached result, and not with a bench-only change."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    trees = [git("rev-parse", "--short", f"HEAD:{folder}") or "nogit" for folder in folders]
    return "-".join(trees) + ("-dirty" if git("status", "--porcelain", *folders) else "")


def seeded_parser(doc: str | None, home: str, seeds: int) -> argparse.ArgumentParser:
    """The options of a benchmark over training seeds: ``--seeds``, ``--home`` (its data root under
    ``data/``) and ``--from-json`` (re-render a saved run instead of training)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--home", type=Path, default=Path(__file__).resolve().parent.parent / "data" / home)
    ap.add_argument("--from-json", type=Path, help="re-summarize a saved run instead of training")
    return ap


def write_results(name: str, payload: dict[str, Any], table: str) -> Path:
    """``bench/results/NAME.json`` (figures) and ``NAME.md`` (the table, with the machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M"), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md = f"### {name}\n\nMachine: {payload['machine']} ({payload['when']})\n\n{table}\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return RESULTS / f"{name}.md"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
