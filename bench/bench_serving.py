"""The serving path's cost: each scorer on one request, the lean path against the path it replaced.

Scorers: ``light``, HAP at rho = 0.05, 0.1, 0.2, 0.5 (top-k) and ``expressive_all``, each through
``HapBundle.score_request`` on one request of 1,000 and 10,000 candidates, on 1 thread and on
every thread (``torch.set_num_threads``), without and with the item cache. Every (path, scorer) call of a
repetition runs in a shuffled order, repetition after repetition in one process (medians and
p90), so a noisy neighbour slows every figure alike. Latency is reported as a ratio of
``expressive_all``'s on the same path, next to the FLOP ratio (``HapBundle.flops_per_request``,
item towers included), and as each baseline's time over the new path's.

Three paths, on the same weights: new (the lean path through the bundle's TorchScript towers, as
``load_bundle`` serves), eager (the same path through the eager towers: what the export buys) and
old, the scorer of ``--base`` (default: the commit before the lean path), imported in this process
from git: every ``hap/model`` module that changed since is loaded from that commit under another
name, so the old scorer runs its own encoding and its own attention. Every path's results are
checked equal (routed set and rank) before timing. ``measure`` is what ``bench_model`` and the
paper table time their trained bundles with.

The bundle has the default (``params.yaml``) model sizes with random weights: a scorer's cost
does not depend on the weights. Its feature statistics and user profile come from a small
simulated window (built once under ``--home``); the request is one simulated request's candidates
repeated up to the size, as ``evaluate.latency_ms_per_1k`` does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = ROOT / "data" / "bench-serving"
BASE = "623f356"  # the scorer before the lean path
SIZES = (1_000, 10_000)
SCORERS: dict[str, dict[str, Any]] = {
    "light": {"serve": "light"},
    **{f"hap@{rho}": {"serve": "hap", "mode": "topk", "rho": rho} for rho in (0.05, 0.1, 0.2, 0.5)},
    "expressive_all": {"serve": "expressive_all"},
}
SMALL_WINDOW = {  # the data only feeds feature statistics, the profile and one request's rows
    "simulate.start": "2026-11-01",
    "simulate.requests_per_day": 200,
    "simulate.n_users": 300,
    "simulate.n_items": 4000,
    "simulate.full_flow_requests": 20,
    "simulate.chunk_requests": 100,
    "split.window_days": 2,
    "validation.fullflow_min_requests": 10,
}
DATE = dt.date(2026, 11, 2)


# ---- the old scorer, from git ----------------------------------------------------------------------
def base_serving(base: str) -> Any:
    """``hap.model.serving`` as of ``base``: the ``hap/model`` modules changed since are loaded
    from that commit as ``hap_base_<name>`` (their imports of each other rewired), the rest shared."""
    changed = subprocess.run(
        ["git", "diff", "--name-only", base, "--", "hap/model"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    names = [Path(p).stem for p in changed if p.endswith(".py")]
    for name in ("cross", "batches", "towers", "calibration", "routing", "serving"):
        if name not in names:
            continue
        source = subprocess.run(
            ["git", "show", f"{base}:hap/model/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for other in names:
            source = source.replace(f"from hap.model.{other} import", f"from hap_base_{other} import")
        spec = importlib.util.spec_from_loader(f"hap_base_{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module.__name__] = module
        exec(compile(source, f"{base}:hap/model/{name}.py", "exec"), module.__dict__)
    return sys.modules.get("hap_base_serving") or importlib.import_module("hap.model.serving")


# ---- the bundle and the request --------------------------------------------------------------------
def prepare(home: Path) -> tuple[Path, Any]:
    """A default-size bundle with random weights and one simulated request's rows (built once)."""
    import pyarrow.parquet as pq

    from bench.common import volume_config
    from hap.core import layout
    from hap.data import markers
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set, open_training_set
    from hap.model.batches import FeatureSpec
    from hap.model.cross import CrossFeatures, profile_folder
    from hap.model.towers import build_models, save_bundle
    from hap.sources.simulator import simulate_days

    cfg = volume_config(str(home), SMALL_WINDOW["simulate.requests_per_day"], SMALL_WINDOW)
    folder = home / "bundle"
    exported = (folder / layout.tower_export_file("light")).exists()
    if (folder / layout.BUNDLE_META_FILE).exists() and not exported:
        from hap.model.export import export_towers
        from hap.model.serving import load_bundle

        eager = load_bundle(folder, exported=False)  # a bundle written before exports existed
        export_towers(folder, {"light": eager.light, "expressive": eager.expressive})
    if not (folder / layout.BUNDLE_META_FILE).exists():
        for day, _ in simulate_days(cfg, cfg.simulate.start, 3, progress=False):
            ingest_day(cfg, day, require_validated=False)
            markers.mark_validated(cfg, day, {"by": "bench_serving"})
        build_training_set(cfg, DATE)
        train = open_training_set(layout.training_set(cfg, DATE)).to_table()
        spec = FeatureSpec(cfg.model.hash_buckets, cfg.model.seq_len).fit(train)
        spec.cross = CrossFeatures.load(
            cfg.model.cross_features, profile_folder(layout.training_set(cfg, DATE))
        )
        torch.manual_seed(0)
        light, expressive = build_models(cfg.model)
        for model in (light, expressive):  # random weights, the wide term too (it starts at zero)
            if model.wide is not None:
                torch.nn.init.normal_(model.wide.weight, std=0.1)
        folder.mkdir(parents=True, exist_ok=True)
        spec.cross.save(folder)
        meta = {"features": spec.to_dict(), "model": cfg.model.model_dump(mode="json")}
        save_bundle(folder, meta | {"routing": cfg.routing.model_dump(mode="json")}, light, expressive)
        pq.write_table(pq.read_table(layout.eval_set(cfg, DATE)), folder / "eval.parquet")
    return folder, pq.read_table(folder / "eval.parquet")


def one_request(table: Any, n: int) -> Any:
    import pyarrow as pa

    rid = table["request_id"].to_numpy()
    one = table.filter(pa.array(rid == rid[0]))
    return pa.concat_tables([one] * int(np.ceil(n / one.num_rows))).slice(0, n).combine_chunks()


# ---- timing -----------------------------------------------------------------------------------------
def check_equal(paths: dict[str, Any], frame: Any) -> None:
    for label, routing in SCORERS.items():
        new, old = (paths[p].with_routing(**routing).score_request(frame) for p in ("new", "old"))
        assert (new.routed == old.routed).all() and (new.rank == old.rank).all(), label
        assert np.allclose(new.final, old.final, atol=1e-5, equal_nan=True), label


def time_calls(paths: dict[str, Any], frame: Any, reps: int, seed: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each (path, scorer) call, ``reps`` rounds, each round in a shuffled order."""
    bundles = {(p, s): b.with_routing(**r) for p, b in paths.items() for s, r in SCORERS.items()}
    for b in bundles.values():
        b.score_request(frame)  # warm-up
    times: dict[tuple[str, str], list[float]] = {k: [] for k in bundles}
    rng = np.random.default_rng(seed)
    keys = list(bundles)
    for _ in range(reps):
        for i in rng.permutation(len(keys)):
            t = time.perf_counter()
            bundles[keys[i]].score_request(frame)
            times[keys[i]].append(time.perf_counter() - t)
    return times


def measure(
    paths: dict[str, Any], table: Any, reps: dict[int, int], caches: list[str] = ("off",)
) -> tuple[list[list[Any]], list[str], list[dict[str, Any]]]:
    """Every scorer of ``SCORERS`` through each path of ``paths`` (``"new"``, the lean path as
    loaded, first; the others its baselines) on one request of each size in ``reps``, on 1 thread
    and on every thread, without and/or with the item cache: markdown rows, headers, raw rows.
    Latency ratios are ``expressive_all``'s on the same path; speed-ups are a baseline's time over
    the new path's, both timed interleaved in this process."""
    threads = sorted({1, os.cpu_count() or 1})
    others = [p for p in paths if p != "new"]
    headers = [
        "candidates",
        "item cache",
        "threads",
        "scorer",
        *[f"{p} ms" for p in others],
        "new ms",
        "new p90 ms",
        *[f"× faster than {p}" for p in others],
        "× expressive_all latency",
        "× expressive_all FLOPs",
    ]
    rows: list[list[Any]] = []
    raw: list[dict[str, Any]] = []
    for n, n_reps in reps.items():
        frame = one_request(table, n)
        if others:
            check_equal(paths, frame)
        flops = {
            s: paths["new"].with_routing(**r).flops_per_request(n)["flops_per_request"]
            for s, r in SCORERS.items()
        }
        for cache in caches:  # "on": the request's items cached, as a daily catalogue cache would hold
            timed = paths if cache == "off" else {k: b.cache_items(frame) for k, b in paths.items()}
            for t in threads:
                torch.set_num_threads(t)
                times = time_calls(timed, frame, n_reps, seed=n + t)
                med = {k: float(np.median(v)) for k, v in times.items()}
                for s in SCORERS:
                    new = med[("new", s)]
                    row = {
                        "candidates": n,
                        "item_cache": cache,
                        "threads": t,
                        "scorer": s,
                        **{f"{p}_ms": med[(p, s)] * 1e3 for p in paths},
                        "new_p90_ms": float(np.quantile(times[("new", s)], 0.9)) * 1e3,
                        **{f"faster_than_{p}": med[(p, s)] / new for p in others},
                        **{
                            f"{p}_latency_vs_expressive_all": med[(p, s)] / med[(p, "expressive_all")]
                            for p in paths
                        },
                        "flops": flops[s],
                        "flops_vs_expressive_all": flops[s] / flops["expressive_all"],
                    }
                    raw.append(row)
                    rows.append(
                        [
                            f"{n:,}",
                            cache,
                            t,
                            s,
                            *[f"{row[f'{p}_ms']:.2f}" for p in others],
                            f"{new * 1e3:.2f}",
                            f"{row['new_p90_ms']:.2f}",
                            *[row[f"faster_than_{p}"] for p in others],
                            row["new_latency_vs_expressive_all"],
                            row["flops_vs_expressive_all"],
                        ]
                    )
                print(markdown_table(headers, rows[-len(SCORERS) :]), flush=True)
    torch.set_num_threads(threads[-1])
    return rows, headers, raw


def run(home: Path, reps: dict[int, int], base: str, caches: list[str]) -> None:
    from hap.model.serving import load_bundle

    folder, table = prepare(home)
    paths = {
        "new": load_bundle(folder),  # the bundle's TorchScript towers (hap.model.export)
        "eager": load_bundle(folder, exported=False),  # the same lean path, eager towers
        "old": base_serving(base).load_bundle(folder),
    }
    rows, headers, raw = measure(paths, table, reps, caches)
    table_md = (
        "One request through `HapBundle.score_request`; default-size towers with random weights; "
        f"medians of {reps} interleaved repetitions (candidates: repetitions). New: the lean path "
        "through the bundle's TorchScript towers, as `load_bundle` serves; eager: the same path "
        f"through the eager towers; old: the scorer of {base}, all three in the same process on "
        "the same weights. FLOPs count the item towers, which the item cache skips.\n\n"
        + markdown_table(headers, rows)
    )
    write_results("serving", {"base": base, "reps": reps, "results": raw}, table_md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME, help="data root of the small window")
    ap.add_argument("--reps", type=int, default=31, help="repetitions at 1,000 candidates")
    ap.add_argument("--reps-large", type=int, default=11, help="repetitions at 10,000 candidates")
    ap.add_argument("--base", default=BASE, help="the commit whose scorer is the old path")
    ap.add_argument("--item-cache", default="off,on", help="item-cache settings to time: off, on or both")
    args = ap.parse_args()
    np.seterr(all="ignore")
    run(args.home, {SIZES[0]: args.reps, SIZES[1]: args.reps_large}, args.base, args.item_cache.split(","))


if __name__ == "__main__":
    main()
