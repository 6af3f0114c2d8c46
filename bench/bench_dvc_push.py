"""Cost of pushing a trained day's training set and bundle to the DVC remote by content hash.

The daily flow's ``version-data`` step now runs ``hap.data.dvc_store.push_day`` after every
training run (one DVC process: ``dvc add --to-remote`` of ``training/dt=D`` and ``models/dt=D``).
Baseline in the same process: the split that builds that training set. The first push also creates
the scratch DVC project; the second pushes an already-present day (nothing to upload).

Usage: python -m bench.bench_dvc_push [--requests 3000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time

from bench.common import volume_config, write_results

DAY = dt.date(2026, 11, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()

    from hap.core import layout
    from hap.data import dvc_store, markers
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    with tempfile.TemporaryDirectory() as home:
        cfg = volume_config(home, args.requests, {"split.window_days": 3, "pipeline.date": DAY.isoformat()})
        for day, _ in simulate_days(cfg, DAY - dt.timedelta(days=2), 3, progress=False):
            ingest_day(cfg, day, require_validated=False)
            markers.mark_validated(cfg, day, {"note": "bench"})
        started = time.perf_counter()
        build_training_set(cfg, DAY)
        split_s = time.perf_counter() - started
        model = layout.model_dir(cfg, DAY)  # a stand-in bundle: the push cost is the training set's
        model.mkdir(parents=True)
        (model / "bundle.json").write_text("{}")
        rows = []
        for label in ("first push (creates the DVC project)", "push again (nothing new)"):
            started = time.perf_counter()
            dvc_store.push_day(cfg, DAY)
            seconds = time.perf_counter() - started
            rows.append((label, seconds, seconds / split_s))
        size = sum(p.stat().st_size for p in layout.training_set(cfg, DAY).parent.rglob("*") if p.is_file())
    lines = [
        f"training set of a 3-day window at {args.requests:,} requests/day: {size / 2**20:.1f} MiB",
        "",
        "| step | s | x split (baseline) |",
        "|---|---|---|",
        f"| split (baseline) | {split_s:.2f} | 1 |",
        *[f"| {label} | {s:.2f} | {ratio:.2f} |" for label, s, ratio in rows],
    ]
    payload = {"split_s": split_s, "push": {label: s for label, s, _ in rows}, "bytes": size}
    write_results("dvc_push", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
