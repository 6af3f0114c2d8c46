"""Training threads: intra-op threads and DDP ranks, on a quiet machine and on a busy one.

Each setting trains the default window (``bench.paper_table.prepare``, the data ``bench_model``
uses) as a user does: ``python -m hap.model.train --date D`` in one process with
``train.num_threads`` threads, or ``torchrun --nproc-per-node R -m hap.model.train`` with R ranks
of one thread each. "Busy" runs the same beside one spinning process per core, as a training job
that shares its machine with others (a laptop, a shared CI runner, a node without CPU limits).

Reported: candidate samples/s of training (the run's own ``samples_per_second``, every rank's
samples over the training loop's seconds) and the wall seconds of the command, each setting as a
ratio of one thread on the quiet machine, measured in the same run. Quality is not compared here:
thread counts change only the order of float sums, and ranks are checked by ``tests/model/test_ddp.py``.
Options: ``--epochs 2 --home DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = ROOT / "data" / "bench-quality"  # shared with bench_model and the paper table


@contextlib.contextmanager
def busy_machine(busy: bool) -> Iterator[None]:
    """One spinning process per core while the block runs (nothing when ``busy`` is False)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range((os.cpu_count() or 1) if busy else 0)
    ]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def train_once(home: Path, date: dt.date, epochs: int, threads: str, ranks: int) -> dict[str, Any]:
    """One training run as a subprocess; its samples/s from the bundle's run record."""
    from hap.core import layout
    from hap.core.config import load_config

    sets = [f"train.epochs={epochs}", f"train.num_threads={threads}", "train.keep=last"]
    args = [a for s in sets for a in ("--set", s)]
    entry = ["-m", "hap.model.train", "--date", date.isoformat(), *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *entry]
    else:
        cmd = [sys.executable, *entry]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")} | {"HAP_HOME": str(home)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cfg = load_config(environ=env)
    run = json.loads((layout.model_dir(cfg, date) / layout.RUN_FILE).read_text())
    return {
        "samples_per_second": run["samples_per_second"],
        "train_seconds": run["train_seconds"],
        "wall": wall,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(home: Path, epochs: int) -> None:
    from bench.paper_table import prepare
    from hap.core.config import load_config

    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")} | {"HAP_HOME": str(home)}
    date = prepare(load_config(environ=env))
    cores = os.cpu_count() or 1
    settings = {
        "1 thread": ("1", 1),
        f"{cores} threads": (str(cores), 1),
        "auto": ("auto", 1),
        f"{cores} ranks x 1 thread": ("1", cores),
    }
    results: dict[str, dict[str, Any]] = {}
    rows: list[list[Any]] = []
    for machine in ("quiet", "busy"):
        with busy_machine(machine == "busy"):
            for label, (threads, ranks) in settings.items():
                results[f"{machine}/{label}"] = r = train_once(home, date, epochs, threads, ranks)
                print(machine, label, r, flush=True)
    base = results["quiet/1 thread"]
    for key, r in results.items():
        machine, label = key.split("/")
        rows.append(
            [
                machine,
                label,
                f"{r['samples_per_second']:,.0f}",
                r["samples_per_second"] / base["samples_per_second"],
                f"{r['wall']:.1f}",
                base["wall"] / r["wall"],
            ]
        )
    headers = ["machine", "setting", "samples/s", "× 1 thread quiet", "wall s", "× faster (wall)"]
    table = (
        f"`hap train` on the default window, {epochs} epochs, {cores} cores; busy = one spinning "
        "process per core beside it. `auto` is `train.num_threads: auto` "
        "(`hap.model.member.training_threads`).\n\n" + markdown_table(headers, rows)
    )
    write_results("threads", {"epochs": epochs, "cores": cores, "results": results}, table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME, help="data root (shared with bench_model)")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    run(args.home, args.epochs)


if __name__ == "__main__":
    main()
