"""The promotion gate's power: ``make bench-gate`` -> ``bench/results/gate_power.{md,json}``.

How often does the gate (``hap.registry.gate.compare_vectors`` + ``hap.registry.blessing.decide``,
the code ``hap gate`` runs) reject a challenger that is as good as its champion, and how often
does it let through one that is worse by a given amount of the primary metric?

1. The default world (``params.yaml``) is simulated, validated, ingested and split for the window
   ``simulate.start .. + split.window_days - 1`` (``bench.paper_table.prepare``); eval day the day
   after, ``simulate.full_flow_requests`` eval requests, as in ``make run``.
2. ``--seeds K`` models are trained on that window with ``hap``'s own ``train_day``, differing only
   in ``train.seed``, and each is evaluated on the eval set (``evaluate_bundle``, the per-request
   vectors the gate compares). Bundles and evaluations are cached under ``--home``, keyed by the
   config hash and the git tree of ``hap/``, so a re-run on the same model code only re-judges.
3. **A/A**: every pair (i < j) is gated with model i as champion and model j as challenger: the
   same config and data, other seeds, so an equal challenger. C(K, 2) pairs.
4. **Degraded**: each challenger's served order is degraded by mixing seeded Gaussian noise into
   its within-request rank (``key = rank / n + lambda * N(0, 1)``), with ``lambda`` found by
   bisection so that its own ``gt_recall@50`` drops by ``delta`` (measured, reported); every
   ranking metric of the degraded order is recomputed with ``evaluate.ranker_vectors`` (the
   slices, which score the eval samples with the towers, are left as they were). Each pair is then
   gated again with the degraded challenger; ``delta`` = 0.03 is the acceptance's A/B, the smaller
   ones trace the power curve around ``gate.margin``.
5. The same pairs are also judged by the previous rule (every slice blocking, 95% each:
   ``slice_decisive_ratio`` = inf, ``slice_adjust`` = none), for comparison.

6. ``--truthless``: the same pairs judged as on real logs, where the eval set has no
   ``true_affinity``. The truth builds the benchmark (each degraded challenger loses ``delta`` of
   ``gt_recall@50``) but is hidden from the gate: its metrics and vectors lose every ground-truth
   metric, so the gate's primary is ``evaluate.fallback_metric``. Every candidate primary for real
   logs (``--candidates``) is judged the same way, beside its agreement in sign with
   ``gt_recall@50`` over every pair of the eval's rankers that differ by more than the margin in it
   (the model, its light model, the model-free references and the logged retrieval order; the
   logged pre-ranking and ranking orders define the stage-aware metrics, so they are left out).

Options: ``--seeds 8 --deltas 0.005,0.01,0.015,0.02,0.03 --home DIR``; ``--date D`` gates models
trained on an already split day of ``--home`` (e.g. ``make run``'s window 2026-11-03..05 with
``--date 2026-11-05``), ``--set key=value`` overrides the config as ``hap --set`` does;
``--truthless`` (results in ``gate_power_truthless``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import code_version, markdown_table, seeded_parser, write_results

DELTAS = (0.005, 0.01, 0.015, 0.02, 0.03)
ACCEPT_DELTA = 0.03
OLD_RULE = {"gate.slice_decisive_ratio": 1e9, "gate.slice_adjust": "none", "gate.primary_decisive_ratio": 1e9}
# what only ground truth gives: its metrics, under any ranker's or interval's name, and its ranker
TRUTH_MARKS = ("gt_", "exp_clicks", "ref_truth")
CANDIDATES = ("recall@50", "ndcg@50", "exposure_auc", "rank50_recall@50", "rank50_recall@100")
# rankers whose order defines the stage-aware metrics (or is the truth): not fair yardsticks of them
SIGN_EXCLUDED = ("ref_prerank", "ref_ranking", "ref_truth")


def hide_truth(model: dict[str, Any]) -> dict[str, Any]:
    """The model as the gate sees it on real logs: every ground-truth metric and vector gone."""

    def truthful(name: str) -> bool:
        return any(mark in name for mark in TRUTH_MARKS)

    return {
        **model,
        "metrics": {k: v for k, v in model["metrics"].items() if not truthful(k)},
        "vectors": {k: v for k, v in model["vectors"].items() if not truthful(k)},
    }


def sign_agreement(model: dict[str, Any], metric: str, truth: str, margin: float) -> tuple[int, int]:
    """Over every pair of the eval's rankers whose ``truth`` means differ by more than ``margin``:
    (pairs where ``metric`` orders them the same way, pairs)."""
    vectors = model["vectors"]
    rankers = sorted(
        {k.split("/", 1)[0] for k in vectors if k.endswith(f"/{truth}")} - set(SIGN_EXCLUDED),
    )
    agree = total = 0
    for a, b in itertools.combinations(rankers, 2):
        if f"{a}/{metric}" not in vectors or f"{b}/{metric}" not in vectors:
            continue
        d_truth = np.nanmean(vectors[f"{a}/{truth}"] - vectors[f"{b}/{truth}"])
        d_metric = np.nanmean(vectors[f"{a}/{metric}"] - vectors[f"{b}/{metric}"])
        if abs(d_truth) > margin:
            total += 1
            agree += int(np.sign(d_truth) == np.sign(d_metric))
    return agree, total


def trained_models(base: Any, date: Any, seeds: int, work: Path) -> list[dict[str, Any]]:
    """Train (or reuse) and evaluate one model per seed: its metrics, vectors and final scores."""
    import pyarrow.parquet as pq

    from hap.core import layout
    from hap.data.versioning import data_version
    from hap.model.evaluate import evaluate_bundle, json_metrics, load_eval_set
    from hap.model.serving import load_bundle
    from hap.model.train import config_hash, train_day

    eval_path = layout.eval_set(base, date)
    es = load_eval_set(eval_path)
    # the cache key: the config, the library's code and the training set (a re-split retrains)
    data_code = f"{data_version(base, date)[:12]}-{code_version('hap')}"
    models = []
    for k in range(seeds):
        cfg = base.updated({"train.seed": base.train.seed + k})
        folder = work / f"{config_hash(cfg)[:12]}-{data_code}" / f"seed{cfg.train.seed}"
        done = folder / "eval.json"
        if not done.exists():
            t = time.perf_counter()
            own = cfg.updated({"paths.models": str(folder / "models")})
            train_day(own, date)
            train_s = time.perf_counter() - t
            bundle = load_bundle(layout.model_dir(own, date))
            result = evaluate_bundle(cfg, bundle, eval_path)
            final = bundle.score_table(es.table, es.index).final
            pq.write_table(result.table(), folder / "vectors.parquet")
            np.save(folder / "final.npy", np.asarray(final, np.float64))
            done.write_text(json.dumps({"metrics": json_metrics(result.metrics), "train_s": train_s}))
            print(f"seed {cfg.train.seed}: trained in {train_s:.0f}s, {folder}", flush=True)
        saved = json.loads(done.read_text())
        table = pq.read_table(folder / "vectors.parquet")
        models.append(
            {
                "seed": cfg.train.seed,
                "metrics": saved["metrics"],
                "ids": table["request_id"].to_numpy(),
                "vectors": {c: table[c].to_numpy() for c in table.column_names if c != "request_id"},
                "final": np.load(folder / "final.npy"),
            }
        )
    return models


def degrade(
    cfg: Any, es: Any, model: dict[str, Any], delta: float, primary: str, seed: int
) -> dict[str, Any]:
    """The model with its served order degraded so that its own ``primary`` drops by ``delta``."""
    from hap.model.evaluate import ranker_vectors

    grid = es.grid(model["final"], -np.inf)
    order = np.argsort(-grid, axis=1, kind="stable")
    pct = np.empty_like(grid)
    np.put_along_axis(pct, order, np.broadcast_to(-np.arange(grid.shape[1], dtype=np.float64), grid.shape), 1)
    pct = (pct / es.index.counts[:, None])[es.index.row_request, es.index.column]  # 0 (top) .. -1
    noise = np.random.default_rng(seed).standard_normal(len(pct))
    target = np.nanmean(model["vectors"][f"model/{primary}"]) - delta

    def vectors(lam: float) -> dict[str, np.ndarray]:
        return ranker_vectors(cfg, es, pct + lam * noise)

    lo, hi = 0.0, 4.0
    for _ in range(14):  # the primary falls as the noise grows: bisection on lambda
        mid = (lo + hi) / 2
        if np.nanmean(vectors(mid)[primary]) > target:
            lo = mid
        else:
            hi = mid
    got = vectors(hi)
    new_vectors = dict(model["vectors"]) | {f"model/{m}": v for m, v in got.items()}
    metrics = dict(model["metrics"]) | {m: float(np.nanmean(v)) for m, v in got.items()}
    achieved = float(np.nanmean(model["vectors"][f"model/{primary}"]) - metrics[primary])
    return {**model, "vectors": new_vectors, "metrics": metrics, "lambda": hi, "achieved": achieved}


def judge(cfg: Any, champion: dict[str, Any], challenger: dict[str, Any], primary: str) -> dict[str, Any]:
    """The gate's decision on one pair: the flow's interval function and rule, no training health."""
    from hap.registry.blessing import decide, slice_metrics
    from hap.registry.gate import compare_vectors

    compared = [primary, *slice_metrics(challenger["metrics"], cfg.gate.slice_prefixes)]
    intervals = compare_vectors(
        cfg,
        (challenger["ids"], challenger["vectors"]),
        (champion["ids"], champion["vectors"]),
        compared,
    )
    d = decide(challenger["metrics"], champion["metrics"], cfg.gate, primary, intervals)
    checks = [c for c in d.checks if c.name.startswith(("gain:", "slice:"))]
    return {
        "champion": champion["seed"],
        "challenger": challenger["seed"],
        "promoted": d.promote,
        "verdict": d.verdict,
        "reasons": d.reasons,
        "checks": [
            {
                "name": c.name,
                "delta": c.delta,
                "lower": c.lower,
                "upper": c.upper,
                "halfwidth": c.halfwidth,
                "n": c.n,
                "confidence": c.confidence,
                "decisive": c.decisive,
                "verdict": c.verdict,
            }
            for c in checks
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.paper_table import prepare
    from hap.core import layout
    from hap.core.config import load_config
    from hap.model.evaluate import load_eval_set, primary_metric

    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    environ["HAP_HOME"] = str(args.home)
    base = load_config(overrides=args.set, environ=environ)
    date = layout.day(args.date) if args.date else prepare(base)
    if not layout.eval_set(base, date).exists():
        raise SystemExit(f"no eval set at {layout.eval_set(base, date)}; run `hap split --date {date}` first")
    t0 = time.perf_counter()
    models = trained_models(base, date, args.seeds, Path(args.home) / "gate-bundles")
    train_wall = time.perf_counter() - t0
    truth_metric = primary_metric(base, models[0]["metrics"])  # what degrades the challengers
    seen = [hide_truth(m) for m in models] if args.truthless else models
    primary = primary_metric(base, seen[0]["metrics"])
    es = load_eval_set(layout.eval_set(base, date))
    pairs = list(itertools.combinations(range(len(models)), 2))
    old = base.updated(OLD_RULE)
    challengers = sorted({j for _, j in pairs})
    worse = {
        delta: {j: degrade(base, es, models[j], delta, truth_metric, seed=1000 + j) for j in challengers}
        for delta in args.deltas
    }
    if args.truthless:
        worse = {delta: {j: hide_truth(m) for j, m in by_j.items()} for delta, by_j in worse.items()}

    def judged(cfg: Any, metric: str) -> tuple[list[Any], dict[str, Any]]:
        aa = [judge(cfg, seen[i], seen[j], metric) for i, j in pairs]
        out: dict[str, Any] = {}
        for delta, by_j in worse.items():
            verdicts = [judge(cfg, seen[i], by_j[j], metric) for i, j in pairs]
            out[f"{delta:g}"] = {
                "delta": delta,
                "achieved": [by_j[j]["achieved"] for j in sorted(by_j)],
                "lambda": [by_j[j]["lambda"] for j in sorted(by_j)],
                "pairs": verdicts,
                "rejected": sum(not v["promoted"] for v in verdicts),
            }
        return aa, out

    aa, degraded = judged(base, primary)
    aa_old, _ = judged(old, primary)
    candidates = {}
    if args.truthless:
        for metric in args.candidates:
            c_aa, c_deg = judged(base, metric)
            agree = [sign_agreement(m, metric, truth_metric, base.gate.margin) for m in models]
            candidates[metric] = {
                "aa_promoted": sum(v["promoted"] for v in c_aa),
                "aa_undecided": sum(v["verdict"] == "undecided" for v in c_aa),
                "aa_halfwidth": [v["checks"][0]["halfwidth"] for v in c_aa],
                "rejected": {k: d["rejected"] for k, d in c_deg.items()},
                "undecided": {
                    k: sum(v["verdict"] == "undecided" for v in d["pairs"]) for k, d in c_deg.items()
                },
                "n_requests": int(np.median([v["checks"][0]["n"] or 0 for v in c_aa])),
                "sign_agree": [sum(a for a, _ in agree), sum(t for _, t in agree)],
            }
    return {
        "date": date.isoformat(),
        "overrides": list(args.set),
        "truthless": bool(args.truthless),
        "truth_metric": truth_metric,
        "candidates": candidates,
        "primary": primary,
        "seeds": [m["seed"] for m in models],
        "n_requests": int(models[0]["metrics"].get("n_requests") or 0),
        "primary_by_seed": [m["metrics"][primary] for m in models],
        "truth_by_seed": [m["metrics"][truth_metric] for m in models],
        "calibration_by_seed": [
            {k: m["metrics"].get(k) for k in ("logloss", "logloss_constant", "ece", "mean_prob", "ctr")}
            for m in models
        ],
        "gate": base.gate.model_dump(mode="json"),
        "confidence": base.evaluate.confidence,
        "train_and_eval_seconds": train_wall,
        "aa": aa,
        "aa_old_rule": aa_old,
        "degraded": degraded,
    }


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "-"


def summarize(payload: dict[str, Any]) -> str:
    aa, old = payload["aa"], payload["aa_old_rule"]
    n = len(aa)
    primary = payload["primary"]
    g = payload["gate"]
    scores = np.asarray(payload["primary_by_seed"])
    truth = payload.get("truth_metric", primary)
    truthless = (
        f"Truth-less: {truth} is hidden from the gate (it only sizes the degraded challengers), so the "
        f"gate's primary is {primary}. "
        if payload.get("truthless")
        else ""
    )
    lines = [
        truthless
        + f"Default world, window ending {payload['date']}, {payload['n_requests']} eval requests"
        + (f" (overrides: {' '.join(payload['overrides'])})" if payload.get("overrides") else "")
        + "; "
        f"{len(payload['seeds'])} training seeds ({primary} {scores.mean():.4f} ± {scores.std(ddof=1):.4f} "
        f"std over seeds), {n} pairs (champion seed i, challenger seed j > i). Gate: margin {g['margin']} on "
        f"{primary}, slice margin {g['max_slice_regression']}, a slice blocks only when its half-width <= "
        f"{g['slice_decisive_ratio']} x margin, slice family adjusted by {g['slice_adjust']}.",
        "",
    ]

    def why(verdicts: list[dict[str, Any]]) -> str:
        blocked: dict[str, int] = {}
        for v in verdicts:
            for c in v["checks"]:
                if c["verdict"] == "fail":
                    blocked[c["name"]] = blocked.get(c["name"], 0) + 1
        return ", ".join(f"{k} x{c}" for k, c in sorted(blocked.items())) or "-"

    rows = [
        ["A/A (equal challengers), this gate", _rate(sum(v["promoted"] for v in aa), n), "promoted", why(aa)],
        [
            "A/A, the rule before (every slice blocks, 95% each)",
            _rate(sum(v["promoted"] for v in old), n),
            "promoted",
            why(old),
        ],
    ]
    for key, d in payload["degraded"].items():
        ach = np.asarray(d["achieved"])
        rows.append(
            [
                f"challenger degraded by {key} {truth} (measured {ach.min():.4f}..{ach.max():.4f})",
                _rate(d["rejected"], n),
                "rejected",
                why(d["pairs"]),
            ]
        )
    lines.append(markdown_table(["challengers", "rate", "outcome", "blocking checks (pairs)"], rows))
    undecided = sum(v.get("verdict") == "undecided" for v in aa)
    if undecided:
        lines += [
            "",
            f"{undecided} of the {n} A/A pairs were undecided (gate.on_undecided: {g['on_undecided']}).",
        ]
    if payload.get("candidates"):
        lines += ["", candidates_table(payload, n)]

    slices: dict[str, list[dict[str, Any]]] = {}
    for v in aa:
        for c in v["checks"]:
            slices.setdefault(c["name"], []).append(c)
    rows = []
    for name, cs in sorted(slices.items()):
        half = np.asarray([c["halfwidth"] for c in cs if c["halfwidth"] is not None])
        conf = cs[0]["confidence"]
        rows.append(
            [
                name,
                f"{conf:.4f}" if conf is not None else "-",
                f"{np.median(half):.4f}" if len(half) else "-",
                _rate(sum(bool(c["decisive"]) for c in cs), len(cs)),
                _rate(sum(c["verdict"] == "fail" for c in cs), len(cs)),
                _rate(sum(c["verdict"] == "not_decisive" for c in cs), len(cs)),
            ]
        )
    lines += [
        "",
        "Checks over the A/A pairs (interval level, median half-width, how often decisive / blocking / "
        "failed but not decisive):",
        "",
        markdown_table(["check", "level", "median half-width", "decisive", "fail", "not decisive"], rows),
    ]
    cal = payload.get("calibration_by_seed") or []
    if cal:
        mean = {k: float(np.mean([c[k] for c in cal])) for k in cal[0]}
        lines += [
            "",
            f"Served probability on the eval day's exposures (mean over the {len(cal)} models): log loss "
            f"{mean['logloss']:.4f} against the constant predictor's {mean['logloss_constant']:.4f}, ECE "
            f"{mean['ece']:.4f}, mean predicted {mean['mean_prob']:.4f} against the observed CTR "
            f"{mean['ctr']:.4f}.",
        ]
    by_seed = dict(zip(payload["seeds"], payload["primary_by_seed"]))
    rejected = [v for v in aa if not v["promoted"]]
    if rejected:
        lines += [
            "",
            f"Rejected A/A pairs (champion seed -> challenger seed: {primary} of each; paired difference):",
            "",
        ]
        for v in rejected:
            gain = v["checks"][0]
            lines.append(
                f"- {v['champion']} -> {v['challenger']}: {by_seed[v['champion']]:.4f} -> "
                f"{by_seed[v['challenger']]:.4f}; {gain['delta']:+.4f} "
                f"[{gain['lower']:+.4f}, {gain['upper']:+.4f}]"
            )
    acc = payload["degraded"].get(f"{ACCEPT_DELTA:g}")
    promoted = sum(v["promoted"] for v in aa)
    verdict = [f"A/A promotion rate {promoted / n:.0%} (acceptance >= 95%)"]
    if acc:
        rate = acc["rejected"] / n
        verdict.append(f"rejection of challengers degraded by {ACCEPT_DELTA} {rate:.0%} (>= 95%)")
    lines += ["", "Acceptance: " + "; ".join(verdict) + "."]
    return "\n".join(lines)


def candidates_table(payload: dict[str, Any], n: int) -> str:
    """Every candidate primary for real logs, judged on the same pairs with the truth hidden."""
    rows = []
    for metric, c in payload["candidates"].items():
        agree, total = c["sign_agree"]
        rows.append(
            [
                metric,
                str(c["n_requests"]),
                f"{np.median(c['aa_halfwidth']):.4f}",
                _rate(c["aa_promoted"], n)
                + (f", {c['aa_undecided']} undecided" if c["aa_undecided"] else ""),
                _rate(c["rejected"].get(f"{ACCEPT_DELTA:g}", 0), n),
                _rate(c["rejected"].get("0.01", 0), n) if "0.01" in c["rejected"] else "-",
                _rate(agree, total),
            ]
        )
    truth = payload.get("truth_metric")
    header = [
        "candidate primary",
        "requests it is defined on",
        "A/A median half-width",
        "A/A promoted",
        f"{ACCEPT_DELTA} worse ({truth}) rejected",
        f"0.01 worse ({truth}) rejected",
        f"agrees in sign with {truth} (ranker pairs > margin apart)",
    ]
    return (
        "Candidate primaries on the same pairs, truth hidden from the gate "
        f"(margin {payload['gate']['margin']}):\n\n" + markdown_table(header, rows)
    )


def main() -> None:
    p = seeded_parser(__doc__, "bench-gate", seeds=8)
    p.add_argument("--deltas", type=lambda s: [float(x) for x in s.split(",")], default=list(DELTAS))
    p.add_argument(
        "--date",
        help="gate models trained on this already split day of --home (its window "
        "ending there, its eval day the next) instead of simulating the default window",
    )
    p.add_argument("--set", action="append", default=[], help="a config override, as `hap --set`")
    p.add_argument(
        "--truthless",
        action="store_true",
        help="judge as on real logs: the truth sizes the degraded challengers but is hidden from the gate",
    )
    p.add_argument("--candidates", type=lambda s: s.split(","), default=list(CANDIDATES))
    args = p.parse_args()
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
    else:
        payload = run(args)
    write_results(
        "gate_power_truthless" if payload.get("truthless") else "gate_power", payload, summarize(payload)
    )


if __name__ == "__main__":
    main()
