"""Quick model-quality experiments: ``python -m bench.model_quality --home DIR --label L --set k=v ...``.

One seed, one training of both towers on the default window (``bench.paper_table.prepare``), then
on the full-flow eval day: Recall@50 of clicks and the ground-truth top-50 overlap (the share of each
request's true top-50 by ``true_affinity`` inside the model's top-50) for the light model, the
expressive model on every candidate, and DAMR for each rho and each score merge. Appends one JSON
line per run to ``DIR/model_quality.jsonl``; what it measured is summarised by hand in
``bench/results/model_quality.md``.
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
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

RHOS = (0.05, 0.1, 0.2)
MERGES = ("stack", "raw", "sum")


def top50_metrics(key: np.ndarray, label: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Recall@50 of clicks and the ground-truth top-50 overlap; ``[R, n]`` grids, -inf = padding."""
    top = np.argsort(-key, axis=1, kind="stable")[:, :50]
    hits = np.take_along_axis(label, top, 1).sum(1)
    has = label.sum(1) > 0
    true_top = np.argsort(-truth, axis=1, kind="stable")[:, :50]
    in_true = np.zeros_like(key, dtype=bool)
    np.put_along_axis(in_true, true_top, True, 1)
    gt = np.take_along_axis(in_true, top, 1).sum(1) / 50
    recall = float((hits[has] / label.sum(1)[has]).mean()) if has.any() else float("nan")
    return {"recall@50": recall, "gt@50": float(gt.mean())}


def evaluate(cfg: Any, bundle_dir: Path, eval_path: Path, fullflow: Path) -> dict[str, float]:
    """Top-50 metrics of the light model, expressive-all and every (rho, merge) DAMR variant."""
    from hap.model.routing import merge_scores, route_grid
    from hap.model.serving import RequestIndex, load_bundle

    bundle = load_bundle(bundle_dir)
    table = ds.dataset(str(eval_path), format="parquet").to_table()
    aff = pq.read_table(fullflow, columns=["request_id", "item_id", "true_affinity"]).to_pandas()
    keys = table.select(["request_id", "item_id"]).to_pandas()
    truth = keys.merge(aff, on=["request_id", "item_id"], how="left").true_affinity.to_numpy()
    index = RequestIndex.of(table["request_id"].to_numpy())
    light = bundle.tower_scores("light", table, index=index)
    expr = bundle.tower_scores("expressive", table, index=index)
    label = index.grid(table["label"].to_numpy().astype(float), 0.0)
    gt = index.grid(truth, -np.inf)
    valid = index.valid()
    out: dict[str, float] = {}
    for name, s in (("light", light), ("expressive_all", expr)):
        out.update({f"{name}/{k}": v for k, v in top50_metrics(index.grid(s, -np.inf), label, gt).items()})
    lg = torch.from_numpy(index.grid(light, -np.inf).astype(np.float32))
    for rho in RHOS:
        routing = bundle.routing.model_copy(update={"mode": "topk", "rho": rho})
        routed = route_grid(lg, torch.from_numpy(valid), routing).numpy()[index.row_request, index.column]
        for merge in MERGES:
            key = merge_scores(light, np.where(routed, expr, np.nan), routed, merge)
            m = top50_metrics(index.grid(key, -np.inf), label, gt)
            out.update({f"hap@{rho}:{merge}/{k}": v for k, v in m.items()})
    out["n_requests"] = float(len(index.counts))
    return out


def oracles(cfg: Any, day: Any) -> dict[str, float]:
    """Ground-truth top-50 overlap of what each part of the true affinity alone recovers, and of the
    logged stage orders, on ``day``'s full-flow requests: what a model can reach from which signal."""

    from hap.core import layout
    from hap.model.serving import RequestIndex
    from hap.sources.universe import build_universe

    uni = build_universe(cfg.simulate, cfg.contract.hash_buckets, cfg.contract.n_content_types)
    cols = ["request_id", "item_id", "true_affinity", "prerank_pos", "retrieval_pos"]
    ff = pq.read_table(layout.raw_log(cfg, day, "fullflow"), columns=cols).to_pandas()
    users = pq.read_table(layout.raw_log(cfg, day, "exposure"), columns=["request_id", "user_id"]).to_pandas()
    ff = ff.merge(users.drop_duplicates("request_id"), on="request_id")
    u, i = ff.user_id.to_numpy(), ff.item_id.to_numpy()
    pref = uni.user_pref[u, uni.item_ctype[i]]
    # an item's category centre (the mean latent vector of its category): what category side features carry
    cat = np.unique(uni.item_static["i_category"], return_inverse=True)[1]
    centres = np.stack([uni.item_vec[cat == c].mean(0) for c in range(cat.max() + 1)])
    by_category = np.einsum("nkd,nd->nk", uni.user_vec[u], centres[cat[i]]).max(1)
    signals = {
        "item bias": uni.item_bias[i],
        "item bias + content-type preference": uni.item_bias[i] + pref,
        "mean interest vector + bias + content-type": np.einsum(
            "nd,nd->n", uni.user_vec[u].mean(1), uni.item_vec[i]
        )
        + uni.item_bias[i]
        + pref,
        "best-matching interest on the item's category centre + bias + content-type": by_category
        + uni.item_bias[i]
        + pref,
        "best-matching interest alone": np.einsum("nkd,nd->nk", uni.user_vec[u], uni.item_vec[i]).max(1),
        "logged retrieval order": -ff.retrieval_pos.to_numpy(np.float64),
        "logged pre-ranking order": -ff.prerank_pos.to_numpy(np.float64),
    }
    index = RequestIndex.of(ff.request_id.to_numpy())
    truth = index.grid(ff.true_affinity.to_numpy(), -np.inf)
    zeros = np.zeros(index.shape)
    return {name: top50_metrics(index.grid(s, -np.inf), zeros, truth)["gt@50"] for name, s in signals.items()}


def main() -> None:
    from bench.paper_table import prepare
    from hap.core import layout
    from hap.core.config import load_config
    from hap.model.batches import TrainData
    from hap.model.train import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--oracles", action="store_true", help="only the signal oracles on the eval day")
    args = ap.parse_args()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HAP__")}
    environ["HAP_HOME"] = args.home
    base = ["validation.data_docs=false", "train.num_threads=1", "train.diagnostics_every=0"]
    cfg = load_config(environ=environ, overrides=base + args.set)
    date = prepare(cfg)
    if args.oracles:
        for name, v in oracles(cfg, date + dt.timedelta(days=1)).items():
            print(f"{name:45s} GT@50={v:.3f}")
        return
    torch.set_num_threads(1)
    data = TrainData.load(cfg, layout.training_set(cfg, date))
    bundle_dir = Path(args.home) / "mq-bundles" / args.label
    t = time.perf_counter()
    result = fit(cfg, data, bundle_dir, meta={"date": date.isoformat()}, log=True)
    train_s = time.perf_counter() - t
    history = json.loads((bundle_dir / layout.HISTORY_FILE).read_text())
    eval_day = date + dt.timedelta(days=1)
    metrics = evaluate(cfg, bundle_dir, layout.eval_set(cfg, date), layout.raw_log(cfg, eval_day, "fullflow"))
    row = {
        "label": args.label,
        "set": args.set,
        "train_seconds": round(train_s, 1),
        "best_epoch": result.best_epoch,
        "val": result.val_metric,
        "history": history,
        "metrics": metrics,
    }
    with open(Path(args.home) / "model_quality.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    brief = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("recall@50", "gt@50"))}
    print(
        json.dumps({"label": args.label, "best_epoch": result.best_epoch, "train_s": round(train_s), **brief})
    )


if __name__ == "__main__":
    main()
