"""Training throughput against a dense matmul peak, and DAMR serving latency.

Training: real ``train_step`` calls (``hap.model.steps.time_training_steps``) of each tower on the
default-scale training set, read as ``hap train`` reads it (``StreamingTrainData``, each step with
its full-flow requests), as candidate samples/s and achieved FLOP/s. The baseline, measured in the
same process right before, is a dense float32 matmul (bf16 as well on CUDA): achieved FLOP/s is
reported as a fraction of it. FLOPs per step are counted from the layer shapes over the grids the
model actually runs (B anchors x C candidate slots, and the full-flow requests' candidates),
forward + backward = 3 x forward. Each step's time is split into batch assembly, forward,
harmonisation, backward, optimizer and weight averaging (``torch.profiler`` labels of
``train_step``, on a few more steps).

Serving: the trained bundle as ``load_bundle`` serves it (the lean path, TorchScript towers),
timed by ``bench.bench_serving.measure``: light-only, HAP at rho = 0.05-0.5 and ``expressive_all``
on one request of 1,000 and 10,000 candidates, on 1 thread and on every thread, without and with
the item-tower cache (filled from the request's candidates, as a serving process fills it from the
day's catalogue); latency as a ratio of ``expressive_all``'s under the same setting, beside the
FLOP ratio from the layer shapes (item towers included: the uncached cost).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import markdown_table, write_results

DEFAULT_HOME = Path(__file__).resolve().parent.parent / "data" / "bench-quality"


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 20
) -> float:
    """FLOP/s of a dense ``n x n`` matmul: the machine's practical peak for this process."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_flops(model: torch.nn.Module, requests: int, grid_cells: int) -> float:
    """Forward + backward FLOPs (3 x forward) of the dense layers over the executed grid."""
    f = model.flops()
    return 3.0 * (requests * f["user"] + grid_cells * (f["item"] + f["head"]))


def bench_training(
    cfg: Any, data: Any, device: torch.device, steps: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    from hap.model.steps import PARTS
    from hap.model.towers import build_models
    from hap.model.train import time_training_steps

    if device.type == "cpu":  # one thread: the peak and the steps on the same core (threads: bench_threads)
        torch.set_num_threads(1)
    peak = matmul_peak(device)
    out: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "matmul_peak_flops": peak,
    }
    if device.type == "cuda":
        out["matmul_peak_bf16_flops"] = matmul_peak(device, torch.bfloat16)
        torch.cuda.reset_peak_memory_stats(device)
    rows = [["dense matmul 1024² fp32 (baseline)", "-", f"{peak / 1e9:.1f}", 1.0, "-", "-"]]
    light, expressive = build_models(cfg.model.model_dump(mode="json"))
    for name, model in (("light", light), ("expressive", expressive)):
        timing = time_training_steps(cfg, data, name, steps, device, profiled=max(5, steps // 4))
        flops = step_flops(model, timing.user_passes, timing.grid_cells)
        achieved = flops / timing.seconds
        out[name] = {
            "seconds": timing.seconds,
            "steps": timing.steps,
            "samples": timing.cells,
            "samples_per_second": timing.cells / timing.seconds,
            "achieved_flops": achieved,
            "fraction_of_peak": achieved / peak,
            "assembly_seconds": timing.assembly_seconds,
            "parts": timing.parts,
        }
        shares = ", ".join(f"{p} {timing.parts.get(p, 0):.0%}" for p in ("assembly", *PARTS))
        rows.append(
            [
                f"train {name} ({timing.steps} steps)",
                f"{timing.cells / timing.seconds:,.0f}",
                f"{achieved / 1e9:.2f}",
                achieved / peak,
                f"{timing.seconds:.2f}",
                shares,
            ]
        )
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return rows, out


def bench_serving(bundle: Any, eval_table: Any) -> tuple[str, list[dict[str, Any]]]:
    """The trained bundle's scorers on the lean path (``bench.bench_serving.measure``): one
    request of 1,000 and 10,000 candidates, 1 thread and every thread, without and with the item
    cache; latency ratios beside FLOP ratios."""
    from bench.bench_serving import measure

    rows, headers, raw = measure({"new": bundle}, eval_table, SERVING_REPS, ["off", "on"])
    return markdown_table(headers, rows), raw


SERVING_REPS = {1_000: 31, 10_000: 11}  # candidates: interleaved repetitions


def run(home: Path, steps: int) -> None:
    import pyarrow.dataset as ds

    from bench.paper_table import prepare
    from hap.core import layout
    from hap.core.config import load_config
    from hap.model.serving import load_bundle
    from hap.model.stream import StreamingTrainData
    from hap.model.train import fit, pick_device

    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    environ["HAP_HOME"] = str(home)
    cfg = load_config(environ=environ).updated({"train.diagnostics_every": 0, "evaluate.latency_repeats": 21})
    date = prepare(cfg)
    data = StreamingTrainData(cfg, layout.training_set(cfg, date), 0, 1)  # what hap train reads
    device = pick_device(cfg)
    train_rows, train_out = bench_training(cfg, data, device, steps)

    bundle_dir = home / "bench-bundles" / "serving"
    if not (bundle_dir / layout.BUNDLE_META_FILE).exists():
        fit(cfg.updated({"train.epochs": 1}), data, bundle_dir, meta={"date": date.isoformat()}, log=False)
    eval_table = ds.dataset(layout.eval_set(cfg, date), format="parquet").to_table()
    serve_table, serve_out = bench_serving(load_bundle(bundle_dir), eval_table)

    table = (
        f"Training on {device} ({train_out['threads']} thread(s)), batch of "
        f"{cfg.train.batch_requests} requests:\n\n"
        + markdown_table(
            ["what", "samples/s", "GFLOP/s", "× matmul peak", "s", "share of a step"], train_rows
        )
        + f"\n\nServing one request (medians of {SERVING_REPS} interleaved repetitions, candidates: "
        "repetitions) through `load_bundle`'s lean path; FLOPs count the item towers, which the cache "
        "skips:\n\n" + serve_table
    )
    write_results("model", {"training": train_out, "serving": serve_out}, table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--home", type=Path, default=DEFAULT_HOME, help="data root (shared with bench.paper_table)"
    )
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per tower")
    args = ap.parse_args()
    np.seterr(all="ignore")
    run(args.home, args.steps)


if __name__ == "__main__":
    main()
