"""``make bench``: every speed benchmark in turn, then one markdown page of their tables.

Each benchmark runs as its own process (clean memory figures, no state carried between them)
and writes ``bench/results/<name>.{json,md}``; this script then joins the tables into
``bench/results/README.md``, the page the project README links. ``--only`` picks a subset.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS, machine

BENCHMARKS: dict[str, list[str]] = {
    "data_path": ["bench.bench_data_path", "--volumes", "10000,100000,300000"],
    "split": ["bench.bench_split", "--volumes", "10000,100000"],
    "validate": ["bench.bench_validate", "--requests", "100000"],
    "model": ["bench.bench_model"],
    "serving": ["bench.bench_serving"],
    "e2e": ["bench.bench_e2e"],
}


def collect() -> str:
    """The tables of every result present, in benchmark order, under one heading."""
    parts = [
        f"# Benchmarks\n\nLatest run of `make bench` on {machine()}. Every figure is a ratio against a "
        "baseline measured in the same process; seconds are indications only.\n"
    ]
    for name in BENCHMARKS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            parts.append(md.read_text().replace("### ", "## ", 1))
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS)
    )
    ap.add_argument("--collect", action="store_true", help="only rebuild bench/results/README.md")
    args = ap.parse_args()
    failed = []
    if not args.collect:
        for name in args.only.split(","):
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            if subprocess.run([sys.executable, "-m", *BENCHMARKS[name]]).returncode != 0:
                failed.append(name)
            print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    (RESULTS / "README.md").write_text(collect())
    print(f"wrote {RESULTS / 'README.md'}")
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
