"""Offline evaluation: ``hap evaluate --date D`` -> ``metrics/dt=D/eval.json``.

Everything is computed on padded ``[requests, candidates]`` grids, vectorized:
- ``recall@K`` / ``ndcg@K``: clicked items among each request's full candidate list (the full-flow
  eval set), ranked in the DAMR final order; means over requests with at least one click;
- ``rank50_recall@K``: share of the ranking stage's top 50 (``rank_pos <= 50``) inside our top K;
- ``auc`` / ``gauc`` / ``logloss`` on the exposed candidates (GAUC weighted by exposures);
- ``auc_slice_<source>``, ``auc_slice_easy``, ``auc_slice_hard``: pairwise AUC of positives against
  each negative source. The full-flow list has no ``global_neg`` and no source labels, so these come
  from the **lake samples of the eval day, restricted to the eval requests** (held out from training
  in both split modes). They use the single-model score of the served scorer (light for ``light``
  and ``hap``, which has no candidate list to route on there; expressive for ``expressive_all``);
- ``ct<k>_recall@50`` and ``ct<k>_auc``: slices by content type;
- ``flops_per_request`` (and light / HAP / expressive-all), ``routed_share``,
  ``latency_ms_per_1k`` (median wall time of the serving path on ``evaluate.latency_candidates``).
NaN metrics (an empty slice) are left out rather than written, so a gate never compares NaN.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from scipy.stats import rankdata

from hap.core import layout, schema
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError
from hap.model.routing import merge_scores, route_grid

EVAL_FILE = "eval.json"
CHUNK_ROWS = 8192


# ---- metric kernels (tested against scikit-learn and brute force) ---------------------------------
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum (ties averaged)."""
    y = np.asarray(labels).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(scores, np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-group AUC weighted by group size, over groups holding both classes."""
    g = np.asarray(groups)
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, np.float64)
    _, gi = np.unique(g, return_inverse=True)
    # rank within group (average ties): sort by (group, score), then average ranks of equal runs
    order = np.lexsort((s, gi))
    gs, ss = gi[order], s[order]
    new_run = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
    run_id = np.cumsum(new_run) - 1
    pos_in_group = np.arange(len(gs)) - np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1][gs]
    run_mean = np.bincount(run_id, weights=pos_in_group + 1.0) / np.bincount(run_id)
    ranks = np.empty(len(s))
    ranks[order] = run_mean[run_id]
    n = np.bincount(gi).astype(np.float64)
    n1 = np.bincount(gi, weights=y)
    n0 = n - n1
    rsum = np.bincount(gi, weights=ranks * y)
    ok = (n1 > 0) & (n0 > 0)
    if not ok.any():
        return float("nan")
    per = (rsum[ok] - n1[ok] * (n1[ok] + 1) / 2) / (n1[ok] * n0[ok])
    return float((per * n[ok]).sum() / n[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def ranking_metrics(
    key: np.ndarray, labels: np.ndarray, valid: np.ndarray, ks: list[int], rank50: np.ndarray | None = None
) -> dict[str, float]:
    """Recall@K, NDCG@K (binary relevance) and optionally rank50_recall@K on ``[R, n]`` grids."""
    key = np.where(valid, key, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    rel = np.take_along_axis(labels * valid, order, axis=1).astype(np.float64)
    n_rel = rel.sum(1)
    has = n_rel > 0
    disc = 1.0 / np.log2(np.arange(key.shape[1]) + 2.0)
    out: dict[str, float] = {}
    cum = np.cumsum(rel, axis=1)
    for k in ks:
        kk = min(k, key.shape[1])
        hits = cum[:, kk - 1]
        dcg = (rel[:, :kk] * disc[:kk]).sum(1)
        ideal = np.cumsum(disc)[np.clip(np.minimum(n_rel, kk).astype(int) - 1, 0, None)]
        out[f"recall@{k}"] = float((hits[has] / n_rel[has]).mean()) if has.any() else float("nan")
        out[f"ndcg@{k}"] = float((dcg[has] / ideal[has]).mean()) if has.any() else float("nan")
        if rank50 is not None:
            top = np.take_along_axis(rank50 * valid, order, axis=1).astype(np.float64)
            n_top = top.sum(1)
            ok = n_top > 0
            out[f"rank50_recall@{k}"] = (
                float((top[:, :kk].sum(1)[ok] / n_top[ok]).mean()) if ok.any() else float("nan")
            )
    return out


# ---- scoring many requests at once -----------------------------------------------------------------
@torch.no_grad()
def score_rows(
    model: torch.nn.Module,
    enc: dict[str, torch.Tensor],
    row_req: torch.Tensor,
    req_first: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of ``rows`` (default all): the user side once per request, the item side per row."""
    user = model.user(enc["req_cat"][req_first], enc["req_dense"][req_first], enc["seq"][req_first])
    rows = torch.arange(len(row_req)) if rows is None else rows
    out = torch.empty(len(rows))
    for s in range(0, len(rows), CHUNK_ROWS):
        r = rows[s : s + CHUNK_ROWS]
        v = model.item(enc["item_cat"][r], enc["item_dense"][r])
        u = {k: t[row_req[r]] for k, t in user.items()}
        out[s : s + CHUNK_ROWS] = model.head(u, v).float()
    return out


def _index(request_id: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(request index per row, first row per request, column in the grid per row, rows per request)."""
    uniq, ri = np.unique(request_id, return_inverse=True)
    order = np.argsort(ri, kind="stable")
    counts = np.bincount(ri, minlength=len(uniq))
    starts = np.cumsum(counts) - counts
    col = np.empty(len(ri), np.int64)
    col[order] = np.arange(len(ri)) - np.repeat(starts, counts)
    first = order[starts]
    return ri, first, col, counts


def _grid(
    values: np.ndarray, ri: np.ndarray, col: np.ndarray, shape: tuple[int, int], fill: Any
) -> np.ndarray:
    g = np.full(shape, fill, dtype=np.asarray(values).dtype if not isinstance(fill, float) else np.float64)
    g[ri, col] = values
    return g


def _put(out: dict[str, float], values: dict[str, float]) -> None:
    out.update({k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)})


def evaluate_bundle(cfg: Config, bundle: Any, eval_set_path: Path | str) -> dict[str, float]:
    """Every offline metric of ``bundle`` on the full-flow eval set at ``eval_set_path``."""
    eval_set_path = Path(eval_set_path)
    if not eval_set_path.exists():
        raise HapError(f"no eval set at {eval_set_path}; run `hap split` first")
    table = ds.dataset(str(eval_set_path), format="parquet").to_table()
    if table.num_rows == 0:
        raise HapError(f"the eval set at {eval_set_path} is empty")
    enc = {k: torch.from_numpy(v) for k, v in bundle.spec.encode(table).items()}
    ri, first, col, counts = _index(table["request_id"].to_numpy())
    shape = (len(counts), int(counts.max()))
    row_req, req_first = torch.from_numpy(ri), torch.from_numpy(first)
    serve = bundle.serve if bundle.expressive is not None else "light"
    valid = _grid(np.ones(len(ri), bool), ri, col, shape, False)

    light = score_rows(bundle.light, enc, row_req, req_first).numpy() if bundle.light is not None else None
    if serve == "light":
        routed_rows = np.zeros(len(ri), bool)
    elif serve == "expressive_all" or light is None:
        routed_rows = np.ones(len(ri), bool)
    else:
        lg = torch.from_numpy(_grid(light, ri, col, shape, -np.inf).astype(np.float32))
        routed_rows = route_grid(lg, torch.from_numpy(valid), bundle.routing).numpy()[ri, col]
    expr = np.full(len(ri), np.nan, np.float32)
    if routed_rows.any():
        idx = torch.from_numpy(np.flatnonzero(routed_rows))
        expr[routed_rows] = score_rows(bundle.expressive, enc, row_req, req_first, idx).numpy()
    base = light if light is not None else np.zeros(len(ri), np.float32)
    key = merge_scores(base, expr, routed_rows, bundle.routing.get("merge", "stack"))
    prob = 1.0 / (1.0 + np.exp(-np.where(routed_rows, np.nan_to_num(expr), base).astype(np.float64)))

    labels = table["label"].to_numpy().astype(np.int64)
    rank_pos = table["rank_pos"].fill_null(10**9).to_numpy()
    ctype = table["content_type"].to_numpy().astype(np.int64)
    grid_key = _grid(key, ri, col, shape, -np.inf)
    grid_lab = _grid(labels, ri, col, shape, 0)
    grid_r50 = _grid((rank_pos <= 50).astype(np.int64), ri, col, shape, 0)
    ks = list(cfg.evaluate.ks)
    out: dict[str, float] = {}
    _put(out, ranking_metrics(grid_key, grid_lab, valid, ks, grid_r50))

    exposed = table["exposed"].to_numpy(zero_copy_only=False).astype(bool)
    _put(
        out,
        {
            "auc": auc(labels[exposed], key[exposed]),
            "gauc": gauc(ri[exposed], labels[exposed], key[exposed]),
            "logloss": logloss(labels[exposed], prob[exposed]),
        },
    )
    for c in np.unique(ctype):
        m = ctype == c
        lab_c = _grid(labels * m, ri, col, shape, 0)
        rec = ranking_metrics(grid_key, lab_c, valid, [50])
        _put(
            out,
            {f"ct{c}_recall@50": rec["recall@50"], f"ct{c}_auc": auc(labels[exposed & m], key[exposed & m])},
        )

    slice_model = bundle.expressive if serve == "expressive_all" or bundle.light is None else bundle.light
    _put(out, source_slices(cfg, bundle, slice_model, table))

    n_mean = int(round(float(counts.mean())))
    flops = bundle.flops_per_request(n_mean)
    _put(out, flops)
    _put(
        out,
        {
            "routed_share": float(routed_rows.mean()),
            "n_requests": float(len(counts)),
            "n_clicks": float(labels.sum()),
            "candidates_per_request": float(counts.mean()),
        },
    )
    _put(out, {"latency_ms_per_1k": latency_ms_per_1k(cfg, bundle, table)})
    return dict(sorted(out.items()))


def source_slices(cfg: Config, bundle: Any, model: torch.nn.Module, eval_table: pa.Table) -> dict[str, float]:
    """Pairwise AUC of positives vs each negative source on the eval day's lake samples."""
    days = np.unique(eval_table["dt"].to_numpy(zero_copy_only=False))
    req = pa.array(np.unique(eval_table["request_id"].to_numpy()), pa.int64())
    parts = []
    for d in days:
        folder = layout.lake_partition(cfg, "samples", d)
        files = sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
        if files:
            parts.append(
                ds.dataset(files, format="parquet").to_table(
                    filter=pc.is_in(ds.field("request_id"), value_set=req)
                )
            )
    if not parts or sum(p.num_rows for p in parts) == 0:
        return {}
    samples = pa.concat_tables(parts)
    enc = {k: torch.from_numpy(v) for k, v in bundle.spec.encode(samples).items()}
    ri, first, _, _ = _index(samples["request_id"].to_numpy())
    s = score_rows(model, enc, torch.from_numpy(ri), torch.from_numpy(first)).numpy()
    src = samples["source"].to_numpy(zero_copy_only=False)
    pos = src == schema.Source.EXPOSE_POS.value
    out: dict[str, float] = {}
    for source in schema.NEGATIVE_SOURCES:
        m = pos | (src == source)
        out[f"auc_slice_{source}"] = auc(pos[m], s[m])
    for name, sources in (("easy", schema.EASY_SOURCES), ("hard", schema.HARD_SOURCES)):
        m = pos | np.isin(src, sources)
        out[f"auc_slice_{name}"] = auc(pos[m], s[m])
    return out


def latency_ms_per_1k(cfg: Config, bundle: Any, table: pa.Table) -> float:
    """Median wall time of ``bundle.score_request`` on one request of ``latency_candidates`` rows."""
    n = cfg.evaluate.latency_candidates
    rid = table["request_id"].to_numpy()
    one = table.filter(pa.array(rid == rid[0]))
    reps = int(math.ceil(n / one.num_rows))
    frame = pa.concat_tables([one] * reps).slice(0, n)
    bundle.score_request(frame)  # warm-up
    times = []
    for _ in range(max(1, cfg.evaluate.latency_repeats)):
        t = time.perf_counter()
        bundle.score_request(frame)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0 * 1000.0 / n)


def evaluate_day(cfg: Config, date: dt.date | str) -> dict[str, float]:
    """Evaluate the day's bundle on the day's eval set; writes ``metrics/dt=D/eval.json``."""
    from hap.model.towers import load_bundle

    date = layout.day(date)
    metrics = evaluate_bundle(cfg, load_bundle(layout.model_dir(cfg, date)), layout.eval_set(cfg, date))
    atomic_write_json(layout.metrics_dir(cfg, date) / EVAL_FILE, metrics)
    return metrics
