"""The paper's table on our data: ``make bench-quality``.

Simulates the default data (``params.yaml``), ingests and validates it, builds the training set
for the window ending ``D = simulate.start + split.window_days - 1`` (eval day ``D + 1``), then for
each seed trains and evaluates:

- ``mixed_bce``, ``mixed_infonce`` (light model, one loss over all sources mixed);
- ``ghcl_<h>`` for each harmonization ``h`` (light model);
- ``expressive_all`` (the expressive model trained on all groups, scoring every candidate);
- ``hap@rho`` (GHCL light with the configured harmonization + the hard-group expressive model,
  DAMR top-rho routing) for rho in {0.05, 0.1, 0.2, 0.5}.

The light model of the HAP run *is* its ``ghcl_<default>`` row: training of the two towers is
independent given the seed (same batches, separate optimizers), so it is not trained twice.
Prints a markdown table of mean ± std over seeds, with the reference rankers of the same eval set
as ``ref_*`` rows (logged retrieval / pre-ranking / ranking orders, random, ground truth) and the
paired bootstrap intervals of the compared variants on the primary metric, and writes
``bench/results/paper_table.{md,json}`` plus the claims check.
Options: ``--seeds 3 --epochs E --batch B --home DIR --from-json FILE``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, markdown_table, write_results

RHOS = (0.05, 0.1, 0.2, 0.5)
HARMONIZATIONS = ("uniform", "gradnorm", "pcgrad")
REFERENCES = ("retrieval", "prerank", "ranking", "random", "truth")
PAIRS = (  # (a, b): the paired interval of a - b on the primary metric, per seed, same eval requests
    ("ghcl_{h}", "mixed_bce"),
    ("ghcl_{h}", "mixed_infonce"),
    ("hap@0.1", "expressive_all"),
    ("hap@0.1", "ghcl_{h}"),
)
COLUMNS = (
    "gt_recall@50",
    "exp_clicks@10",
    "recall@10",
    "recall@50",
    "recall@100",
    "ndcg@50",
    "gauc",
    "auc_slice_easy",
    "auc_slice_hard",
    "flops_per_request",
    "latency_ms_per_1k",
)


def prepare(cfg: Any) -> dt.date:
    """Simulate, ingest, validate and split; reuses what exists (same params => same bytes)."""
    from hap.core import layout
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.data.validate import validate_day
    from hap.sources.simulator import simulate_day

    start = cfg.simulate.start
    date = start + dt.timedelta(days=cfg.split.window_days - 1)
    if layout.eval_set(cfg, date).exists():
        return date
    for i in range(cfg.split.window_days + 1):
        day = start + dt.timedelta(days=i)
        if not layout.lake_partition(cfg, "samples", day).exists():
            simulate_day(cfg, day)
            validate_day(cfg, day)
            ingest_day(cfg, day)
    print(build_training_set(cfg, date).render(), flush=True)
    return date


def run(args: argparse.Namespace) -> dict[str, Any]:

    from hap.core import layout
    from hap.core.config import load_config
    from hap.model.batches import TrainData
    from hap.model.evaluate import evaluate_bundle
    from hap.model.serving import load_bundle
    from hap.model.train import fit

    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    environ["HAP_HOME"] = str(args.home)
    base = load_config(environ=environ)
    over: dict[str, Any] = {"train.diagnostics_every": args.diag_every}
    if args.epochs:
        over["train.epochs"] = args.epochs
    if args.batch:
        over["train.batch_requests"] = args.batch
    base = base.updated(over)
    date = prepare(base)
    eval_path = layout.eval_set(base, date)
    default_h = base.train.harmonization
    runs: list[dict[str, Any]] = []
    work = Path(args.home) / "bench-bundles"
    primary = base.evaluate.primary_metric
    vectors: dict[int, dict[str, Any]] = {}
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        cfg_seed = base.updated({"train.seed": base.train.seed + seed})
        data = TrainData.load(cfg_seed, layout.training_set(cfg_seed, date))
        plan: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = [
            (
                "mixed_bce",
                {"train.loss": "mixed_bce", "train.expressive_groups": "none"},
                [("mixed_bce", {})],
            ),
            (
                "mixed_infonce",
                {"train.loss": "mixed_infonce", "train.expressive_groups": "none"},
                [("mixed_infonce", {})],
            ),
        ]
        for h in HARMONIZATIONS:
            if h == default_h:
                evals = [(f"ghcl_{h}", {"serve": "light"})] + [
                    (f"hap@{rho}", {"serve": "hap", "mode": "topk", "rho": rho}) for rho in RHOS
                ]
                plan.append(
                    (
                        f"ghcl_{h}+expressive",
                        {"train.harmonization": h, "train.expressive_groups": "hard"},
                        evals,
                    )
                )
            else:
                plan.append(
                    (
                        f"ghcl_{h}",
                        {"train.harmonization": h, "train.expressive_groups": "none"},
                        [(f"ghcl_{h}", {})],
                    )
                )
        plan.append(
            (
                "expressive_all",
                {"train.expressive_groups": "all", "routing.serve": "expressive_all"},
                [("expressive_all", {"serve": "expressive_all"})],
            )
        )
        for name, overrides, evals in plan:
            cfg = cfg_seed.updated(overrides)
            t = time.perf_counter()
            result = fit(cfg, data, work / f"seed{seed}" / name, meta={"date": date.isoformat()}, log=False)
            train_s = time.perf_counter() - t
            bundle = load_bundle(work / f"seed{seed}" / name)
            for label, routing in evals:
                t = time.perf_counter()
                result_eval = evaluate_bundle(
                    cfg, bundle.with_routing(**routing) if routing else bundle, eval_path
                )
                metrics = result_eval.metrics
                vectors.setdefault(seed, {})[label] = result_eval.vectors.get(f"model/{primary}")
                if not any(r["variant"].startswith("ref_") for r in runs):
                    runs += reference_rows(metrics)
                row = {
                    "variant": label,
                    "seed": seed,
                    "train_seconds": train_s,
                    "eval_seconds": time.perf_counter() - t,
                    "epochs_run": result.epochs_run,
                    "samples_per_second": result.samples_per_second,
                    "diagnostics": result.diagnostics_summary,
                    "metrics": metrics,
                }
                runs.append(row)
                print(
                    f"[{time.perf_counter() - t_all:7.0f}s] seed {seed} {label}: train {train_s:.0f}s "
                    f"R@50={metrics.get('recall@50', float('nan')):.4f} "
                    f"easyAUC={metrics.get('auc_slice_easy', float('nan')):.4f} "
                    f"cos={result.diagnostics_summary.get('mean/cos_easy_hard', float('nan')):.3f}",
                    flush=True,
                )
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "paper_table.partial.json").write_text(json.dumps(runs, indent=1, default=str))
        del data
    return {
        "date": date.isoformat(),
        "seeds": args.seeds,
        "default_harmonization": default_h,
        "config": {
            "epochs": base.train.epochs,
            "batch_requests": base.train.batch_requests,
            "requests_per_day": base.simulate.requests_per_day,
            "window_days": base.split.window_days,
        },
        "runs": runs,
        "primary_metric": primary,
        "paired": paired_intervals(base, vectors, default_h),
    }


def reference_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The reference rankers of the eval set as table rows (they do not depend on the seed)."""
    rows = []
    for ref in REFERENCES:
        got = {k: metrics.get(f"ref_{ref}_{k}") for k in COLUMNS if f"ref_{ref}_{k}" in metrics}
        if got:
            rows.append({"variant": f"ref_{ref}", "seed": 0, "metrics": got, "diagnostics": {}})
    return rows


def paired_intervals(cfg: Any, vectors: dict[int, dict[str, Any]], default_h: str) -> list[dict[str, Any]]:
    """Per seed, the paired bootstrap interval of each compared pair on the same eval requests."""
    from hap.model.metrics import paired_interval

    e, out = cfg.evaluate, []
    for seed, by_variant in sorted(vectors.items()):
        for a, b in PAIRS:
            a, b = a.format(h=default_h), b.format(h=default_h)
            if by_variant.get(a) is None or by_variant.get(b) is None:
                continue
            d, lo, hi, n = paired_interval(
                by_variant[a], by_variant[b], e.confidence, e.bootstrap_resamples, e.seed
            )
            out.append({"seed": seed, "a": a, "b": b, "diff": d, "lo": lo, "hi": hi, "n": n})
    return out


def _stats(runs: list[dict[str, Any]], variant: str, key: str) -> tuple[float, float]:
    vals = [
        r["metrics"][key] if key in r["metrics"] else r["diagnostics"].get(key, np.nan)
        for r in runs
        if r["variant"] == variant
    ]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarize(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    runs = payload["runs"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    rows, summary = [], {}
    for v in variants:
        cells, summary[v] = [v], {}
        for key in (*COLUMNS, "mean/cos_easy_hard"):
            m, s = _stats(runs, v, key)
            summary[v][key] = {"mean": m, "std": s}
            if key.startswith("flops"):
                cells.append(f"{m / 1e6:.1f}M")
            elif key.startswith("latency"):
                cells.append(f"{m:.0f}±{s:.0f}")
            else:
                cells.append(f"{m:.4f}±{s:.4f}")
        rows.append(cells)
    table = markdown_table(
        [
            "variant",
            "gtR@50",
            "E[clicks]@10",
            "R@10",
            "R@50",
            "R@100",
            "NDCG@50",
            "GAUC",
            "AUC easy",
            "AUC hard",
            "FLOPs/req",
            "ms/1k cand",
            "cos(easy,hard)",
        ],
        rows,
    )
    claims = check_claims(summary, payload["default_harmonization"])
    paired = payload.get("paired") or []
    if paired:
        table += f"\n\nPaired 95% intervals on {payload.get('primary_metric')} (same eval requests):\n\n"
        table += markdown_table(
            ["seed", "a - b", "diff", "95% interval", "requests"],
            [
                [
                    p["seed"],
                    f"{p['a']} - {p['b']}",
                    f"{p['diff']:+.4f}",
                    f"[{p['lo']:+.4f}, {p['hi']:+.4f}]",
                    p["n"],
                ]
                for p in paired
            ],
        )
    return table, {"summary": summary, "claims": claims, "paired": paired}


def check_claims(summary: dict[str, Any], default_h: str) -> dict[str, Any]:
    def g(v: str, k: str) -> tuple[float, float]:
        d = summary.get(v, {}).get(k, {"mean": float("nan"), "std": float("nan")})
        return d["mean"], d["std"]

    out: dict[str, Any] = {}
    bce_r, bce_rs = g("mixed_bce", "recall@50")
    bce_e, bce_es = g("mixed_bce", "auc_slice_easy")
    per_h = {}
    for h in HARMONIZATIONS:
        r, rs = g(f"ghcl_{h}", "recall@50")
        e, es = g(f"ghcl_{h}", "auc_slice_easy")
        sd_r, sd_e = max(rs, bce_rs), max(es, bce_es)
        per_h[h] = {
            "recall@50_gain": r - bce_r,
            "recall@50_2std": 2 * sd_r,
            "easy_auc_gain": e - bce_e,
            "easy_auc_2std": 2 * sd_e,
            "holds": bool(r - bce_r > 2 * sd_r and e - bce_e > 2 * sd_e),
        }
    out["1_ghcl_beats_mixed_bce"] = per_h
    hap_r, _ = g("hap@0.1", "recall@50")
    ea_r, _ = g("expressive_all", "recall@50")
    hap_f, _ = g("hap@0.1", "flops_per_request")
    ea_f, _ = g("expressive_all", "flops_per_request")
    out["2_hap_vs_expressive_all"] = {
        "recall_ratio": hap_r / ea_r,
        "flops_ratio": hap_f / ea_f,
        "holds": bool(hap_r / ea_r >= 0.99 and hap_f / ea_f <= 0.25),
    }
    cos = {v: g(v, "mean/cos_easy_hard")[0] for v in summary if v.startswith(("mixed_", "ghcl_"))}
    mixed = min(cos.get("mixed_bce", np.nan), cos.get("mixed_infonce", np.nan))
    ghcl = cos.get(f"ghcl_{default_h}", np.nan)
    out["3_mixing_more_conflict"] = {"cos": cos, "holds": bool(mixed < ghcl)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=0, help="override train.epochs (0: params)")
    ap.add_argument("--batch", type=int, default=0, help="override train.batch_requests (0: params)")
    ap.add_argument("--diag-every", type=int, default=10)
    ap.add_argument(
        "--home", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "bench-quality"
    )
    ap.add_argument("--from-json", type=Path, help="re-summarize a saved run instead of training")
    args = ap.parse_args()
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        payload = payload.get("raw", payload)
    else:
        payload = run(args)
    table, extra = summarize(payload)
    table += "\n\nClaims:\n\n```json\n" + json.dumps(extra["claims"], indent=1) + "\n```\n"
    write_results("paper_table", {"raw": payload, **extra}, table)


if __name__ == "__main__":
    main()
