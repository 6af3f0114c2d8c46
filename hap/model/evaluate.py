"""Offline evaluation: ``hap evaluate --date D`` -> ``metrics/dt=D/eval.json`` + ``eval_requests.parquet``.

The eval set is every retrieved candidate of the eval day's full-flow requests. The served model
(``serving.HapBundle.score_table``, the DAMR final order) is measured next to yardsticks ranked on
the same requests, each metric first per request (``hap.model.metrics``):

- the model (bare names), its own light model (``light_``) and the reference rankers
  (``ref_<name>_``): the logged ``retrieval``, ``prerank`` and ``ranking`` orders, a seeded
  ``random`` order and, where the eval set has ``true_affinity`` (simulated data), the ``truth``
  order. Logged orders are favoured by click metrics: every click lies in the ranking stage's top
  by construction (selection bias), so only the ground-truth metrics compare them fairly;
- click metrics ``recall@K`` / ``ndcg@K`` (requests without a click skipped), ``exposure_auc``
  (per-request AUC of clicks among the exposures, unweighted GAUC) and the stage-aware
  ``rank50_recall@K`` (share of the ranking stage's top 50 in the ranker's top K, every request);
  ground-truth metrics ``gt_recall@K`` and ``exp_clicks@10`` (absent, not 0, without
  ``true_affinity``);
- on exposures: ``auc_light`` / ``auc_expressive`` (each model's own logits), ``gauc`` (final
  order), the calibration of the served probability (``logloss`` next to ``logloss_constant``,
  the base rate's; ``ece``; ``mean_prob`` next to ``ctr``: ``metrics.calibration_metrics``);
- ``auc_slice_<source|easy|hard>``: mean per-request AUC of positives against each negative source
  on the eval requests' samples, which the split writes next to the eval set (single-model score:
  light, or expressive for ``expressive_all``); ``ct<k>_recall@50`` by content type;
- paired bootstrap 95% intervals: ``ci/<metric>/lo|hi|halfwidth`` for the model's primary metric,
  ``vs_<other>/<metric>/diff|lo|hi|n`` against the light model and each reference ranker;
- cost: ``flops_*``, ``routed_share``, ``latency_ms_per_1k``.

A non-finite model score is a failure: every model metric is NaN (written as null), so the gate
never promotes it; NaN never sorts into a high recall. Per-request vectors are kept in
``eval_requests.parquet`` so the gate and the paper table compare models on the same requests.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from hap.core import layout, schema
from hap.core.atomic import atomic_write_bytes, atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError
from hap.model.metrics import (
    _nanmean,
    auc,
    calibration_metrics,
    click_vectors,
    gauc,
    group_aucs,
    logloss,
    order_of,
    paired_interval,
    ranking_metrics,
    share_vectors,
    truth_vectors,
)
from hap.model.serving import HapBundle, RequestIndex

EVAL_FILE = layout.EVAL_FILE
REQUESTS_FILE = layout.EVAL_REQUESTS_FILE
REFERENCES = ("retrieval", "prerank", "ranking", "random", "truth")
CLICKS_K = 10  # exp_clicks@10: the ranker's top 10 shown in slots 1..10, as the simulator exposes
__all__ = ["auc", "gauc", "logloss", "ranking_metrics", "evaluate_bundle", "evaluate_day"]


@dataclass
class Evaluation:
    """Metrics (``eval.json``) and the per-request vectors they are means of."""

    metrics: dict[str, float]
    request_ids: np.ndarray
    vectors: dict[str, np.ndarray]  # "<ranker>/<metric>" -> [requests]

    def table(self) -> pa.Table:
        return pa.table(
            {"request_id": self.request_ids, **{k: v.astype(np.float64) for k, v in self.vectors.items()}}
        )


@dataclass
class EvalSet:
    """The eval set on its request grid."""

    path: Path
    table: pa.Table
    index: RequestIndex
    valid: np.ndarray

    def grid(self, values: np.ndarray, fill: Any) -> np.ndarray:
        return self.index.grid(values, fill)

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)

    def has_truth(self) -> bool:
        names = self.table.schema.names
        return "true_affinity" in names and self.table["true_affinity"].null_count < self.table.num_rows


def primary_metric(cfg: Config, metrics: dict[str, Any]) -> str:
    """The gate's primary metric: ground truth where the eval set has it, else the click fallback."""
    p = cfg.evaluate.primary_metric
    return p if p in metrics or not p.startswith(("gt_", "exp_clicks")) else cfg.evaluate.fallback_metric


def load_eval_set(path: Path | str) -> EvalSet:
    path = Path(path)
    if not path.exists():
        raise HapError(f"no eval set at {path}; run `hap split` first")
    table = ds.dataset(str(path), format="parquet").to_table()
    if table.num_rows == 0:
        raise HapError(f"the eval set at {path} is empty")
    index = RequestIndex.of(table["request_id"].to_numpy(), table["item_id"].to_numpy())  # serving's ties
    return EvalSet(path, table, index, index.valid())


# ---- rankers ------------------------------------------------------------------------------------------
def reference_keys(cfg: Config, es: EvalSet) -> dict[str, np.ndarray]:
    """Row keys (higher ranks first) of the reference rankers present on this eval set."""
    big = 1e9
    retrieval = es.column("retrieval_pos").astype(np.float64)
    prerank = np.nan_to_num(pc.fill_null(es.table["prerank_pos"], int(big)).to_numpy().astype(np.float64))
    ranked = pc.fill_null(es.table["rank_pos"], 0).to_numpy().astype(np.float64)
    random = np.random.default_rng(cfg.evaluate.seed).random(es.table.num_rows)
    # positions a log leaves tied (every candidate no stage kept; a source that logs no order) are
    # ordered at random, never by the rows' order in the file, which can follow the labels
    jitter = random * 1e-3
    keys = {
        "retrieval": -retrieval + jitter,
        "prerank": -prerank + jitter,
        # the logged ranking order covers the pre-ranker's top only; the rest follows the pre-ranker
        "ranking": np.where(ranked > 0, -ranked, -big - prerank) + jitter,
        "random": random,
    }
    if es.has_truth():
        keys["truth"] = es.table["true_affinity"].to_numpy(zero_copy_only=False).astype(np.float64)
    return keys


# Model-free reference rankers (docs/evaluation.md "Reference rankers"): each from the training window's
# logs (the split's user-history profile as of the eval day: hap.data.user_history) and the candidates'
# own features.
MODEL_FREE: dict[str, str] = {
    "popularity": "i_popularity",  # the candidate's own popularity feature
    "segment_ctr": "segment_ctr",  # user segment x category click rate in the window
    "seq_match": "seq_match",  # the request's recent clicks sharing the candidate's category
    "user_clicks": "user_clicked",  # the user's clicks in the window, by category
    "user_logged": "user_logged",  # everything the cascade logged for the user in the window, by category
}


def model_free_keys(cfg: Config, es: EvalSet, profile: Path | None = None) -> dict[str, np.ndarray]:
    """Row keys of the model-free reference rankers; ties broken at random (``evaluate.seed``).
    ``profile``: the split's profile folder (default: next to the eval set); absent, only popularity."""
    from hap.model.cross import CrossFeatures

    folder = Path(profile) if profile is not None else Path(es.path).parent / "profile"
    names = [f for f in MODEL_FREE.values() if f != "i_popularity"]
    cross = CrossFeatures.load(names, folder) if folder.exists() else None
    features = cross.encode(es.table, cfg.model.seq_len) if cross is not None else None
    jitter = np.random.default_rng(cfg.evaluate.seed + 1).random(es.table.num_rows) * 1e-9
    keys = {}
    for name, feature in MODEL_FREE.items():
        if feature == "i_popularity":
            keys[name] = es.column("i_popularity").astype(np.float64) + jitter
        elif features is not None:
            keys[name] = features[:, names.index(feature)].astype(np.float64) + jitter
    return keys


def ranker_vectors(cfg: Config, es: EvalSet, key: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-request ranking metric of one ranker's row keys (all NaN if a key is not finite)."""
    ks = list(cfg.evaluate.ks)
    grid_key = es.grid(key, -np.inf)
    order = order_of(grid_key, es.valid)
    labels = es.grid(es.column("label").astype(np.int64), 0)
    rank_pos = pc.fill_null(es.table["rank_pos"], 10**9).to_numpy()
    out = click_vectors(order, labels, es.valid, ks)
    out.update(
        share_vectors(order, es.grid((rank_pos <= 50).astype(np.int64), 0), es.valid, ks, "rank50_recall")
    )
    out["exposure_auc"] = exposure_auc_vector(es, key)
    if es.has_truth():
        truth = es.grid(np.nan_to_num(es.column("true_affinity").astype(np.float64), nan=-np.inf), -np.inf)
        logit = (cfg.simulate.click_offset, cfg.simulate.position_bias)
        out.update(truth_vectors(order, truth, es.valid, ks, logit, CLICKS_K))
    if not np.isfinite(key).all():  # a NaN score is a failure, not a ranking
        out = {k: np.full_like(v, np.nan) for k, v in out.items()}
    return out


def exposure_auc_vector(es: EvalSet, key: np.ndarray) -> np.ndarray:
    """Per request, the AUC of its clicked exposures against its unclicked ones under ``key``
    (NaN for a request without both): the per-request terms of an unweighted GAUC."""
    rows = np.flatnonzero(es.column("exposed").astype(bool))
    labels = es.column("label").astype(np.int64)[rows]
    return group_aucs(
        es.index.row_request[rows], labels, np.asarray(key, np.float64)[rows], len(es.index.counts)
    )


def content_type_vectors(es: EvalSet, key: np.ndarray) -> dict[str, np.ndarray]:
    """Recall@50 of each content type's clicks."""
    order = order_of(es.grid(key, -np.inf), es.valid)
    ctype, labels = es.column("content_type").astype(np.int64), es.column("label").astype(np.int64)
    out = {}
    for c in np.unique(ctype):
        vec = click_vectors(order, es.grid(labels * (ctype == c), 0), es.valid, [50])["recall@50"]
        out[f"ct{c}_recall@50"] = vec if np.isfinite(key).all() else np.full_like(vec, np.nan)
    return out


# ---- exposure metrics ------------------------------------------------------------------------------
def exposure_metrics(
    bundle: HapBundle, es: EvalSet, light: np.ndarray, final: np.ndarray, served: np.ndarray, prob: np.ndarray
) -> dict[str, float]:
    """Each model's own AUC, the final order's GAUC, and the calibration of the served probability
    ``prob`` (the score serving returns) next to a constant predictor's log loss."""
    exposed = es.column("exposed").astype(bool)
    y = es.column("label").astype(np.int64)[exposed]
    rows = np.flatnonzero(exposed)
    out = {"auc_light": auc(y, light[rows]) if bundle.light is not None else float("nan")}
    if bundle.expressive is not None and len(rows):
        out["auc_expressive"] = auc(y, bundle.tower_scores("expressive", es.table, rows, es.index))
    out["gauc"] = gauc(es.index.row_request[rows], y, final[rows])
    out |= calibration_metrics(y, prob[rows])
    return {k: (v if np.isfinite(served).all() else float("nan")) for k, v in out.items()}


# ---- source slices (lake samples of the eval requests) --------------------------------------------
def _eval_samples(eval_set_path: Path) -> pa.Table | None:
    folder = layout.eval_samples_of(eval_set_path)
    if not folder.exists():
        return None
    table = ds.dataset(str(folder), format="parquet").to_table()
    return table if table.num_rows else None


def slice_vectors(bundle: HapBundle, es: EvalSet) -> dict[str, np.ndarray]:
    """Per eval request, the AUC of its positives against each negative source (and easy/hard)."""
    samples = _eval_samples(es.path)
    if samples is None:
        return {}
    tower = "expressive" if bundle.serve == "expressive_all" or bundle.light is None else "light"
    scores = bundle.tower_scores(tower, samples)
    req_ids = np.unique(es.column("request_id"))
    group = np.searchsorted(req_ids, samples["request_id"].to_numpy())
    src = samples["source"].to_numpy(zero_copy_only=False)
    pos = src == schema.Source.EXPOSE_POS.value
    slices = {s: [s] for s in schema.NEGATIVE_SOURCES} | {
        "easy": schema.EASY_SOURCES,
        "hard": schema.HARD_SOURCES,
    }
    out = {}
    for name, sources in slices.items():
        m = pos | np.isin(src, sources)
        vec = group_aucs(group[m], pos[m], scores[m], len(req_ids))
        out[f"auc_slice_{name}"] = vec if np.isfinite(scores).all() else np.full_like(vec, np.nan)
    return out


# ---- intervals -------------------------------------------------------------------------------------
def interval_metrics(cfg: Config, vectors: dict[str, np.ndarray], primary: str) -> dict[str, float]:
    """The model's primary-metric interval and paired intervals against its light model and each reference."""
    e = cfg.evaluate
    out: dict[str, float] = {}
    if f"model/{primary}" not in vectors:
        return out
    _, lo, hi, _ = paired_interval(
        vectors[f"model/{primary}"], None, e.confidence, e.bootstrap_resamples, e.seed
    )
    out |= {f"ci/{primary}/lo": lo, f"ci/{primary}/hi": hi, f"ci/{primary}/halfwidth": (hi - lo) / 2}
    compared = sorted({primary, e.fallback_metric} & {k.split("/", 1)[1] for k in vectors})
    others = sorted({k.split("/", 1)[0] for k in vectors} - {"model"})
    for other in others:
        for metric in compared:
            if f"{other}/{metric}" not in vectors:
                continue
            d, lo, hi, n = paired_interval(
                vectors[f"model/{metric}"],
                vectors[f"{other}/{metric}"],
                e.confidence,
                e.bootstrap_resamples,
                e.seed,
            )
            out |= {f"vs_{other}/{metric}/{k}": v for k, v in zip(("diff", "lo", "hi", "n"), (d, lo, hi, n))}
    return out


# ---- the evaluation ----------------------------------------------------------------------------------
def evaluate_bundle(
    cfg: Config, bundle: HapBundle, eval_set_path: Path | str, yardsticks: bool = True
) -> Evaluation:
    """Every offline metric of ``bundle`` and its yardsticks on the full-flow eval set. Without
    ``yardsticks`` the reference rankers and the latency timing are left out: the gate re-evaluates
    the champion on the challenger's eval set, whose yardsticks the challenger's evaluation holds."""
    es = load_eval_set(eval_set_path)
    scores = bundle.score_table(es.table, es.index, with_light=True)
    served = np.where(scores.routed, scores.expressive, scores.light)
    final = np.where(np.isfinite(served), scores.final, np.nan)
    rankers = {"model": final}
    if yardsticks:
        rankers |= {f"ref_{k}": v for k, v in reference_keys(cfg, es).items()}
        rankers |= {f"ref_{k}": v for k, v in model_free_keys(cfg, es).items()}
    if bundle.light is not None and bundle.serve != "light":
        rankers["light"] = scores.light.astype(np.float64)
    vectors = {f"{r}/{m}": v for r, key in rankers.items() for m, v in ranker_vectors(cfg, es, key).items()}
    vectors |= {f"model/{m}": v for m, v in content_type_vectors(es, final).items()}
    vectors |= {f"model/{m}": v for m, v in slice_vectors(bundle, es).items()}

    metrics = {_public(k): _nanmean(v) for k, v in vectors.items()}
    metrics |= exposure_metrics(bundle, es, scores.light, final, served, scores.prob)
    metrics |= interval_metrics(cfg, vectors, primary_metric(cfg, metrics))
    metrics |= cost_metrics(cfg, bundle, es, scores.routed, timed=yardsticks)
    metrics["nonfinite_scores"] = float((~np.isfinite(served)).sum())
    return Evaluation(dict(sorted(metrics.items())), np.unique(es.column("request_id")), vectors)


def _public(vector_name: str) -> str:
    """``model/recall@50`` -> ``recall@50``; ``ref_prerank/recall@50`` -> ``ref_prerank_recall@50``."""
    ranker, metric = vector_name.split("/", 1)
    return metric if ranker == "model" else f"{ranker}_{metric}"


def cost_metrics(
    cfg: Config, bundle: HapBundle, es: EvalSet, routed: np.ndarray, timed: bool = True
) -> dict[str, float]:
    counts = es.index.counts
    out = {
        **bundle.flops_per_request(int(round(float(counts.mean())))),
        "routed_share": float(routed.mean()),
        "n_requests": float(len(counts)),
        "n_clicks": float(es.column("label").sum()),
        "candidates_per_request": float(counts.mean()),
    }
    if timed:
        out["latency_ms_per_1k"] = latency_ms_per_1k(cfg, bundle, es.table)
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


RANKERS = (
    ("model", ""),
    ("its light model", "light_"),
    ("logged ranking order", "ref_ranking_"),
    ("logged pre-ranking order", "ref_prerank_"),
    ("logged retrieval order", "ref_retrieval_"),
    ("random order", "ref_random_"),
    ("item popularity", "ref_popularity_"),
    ("segment x category CTR", "ref_segment_ctr_"),
    ("recent clicks' category", "ref_seq_match_"),
    ("user's clicks' categories", "ref_user_clicks_"),
    ("user's logged categories", "ref_user_logged_"),
    ("ground truth", "ref_truth_"),
)
TABLE_METRICS = ("gt_recall@50", "exp_clicks@10", "rank50_recall@50", "recall@50", "ndcg@50")


def render_table(cfg: Config, metrics: dict[str, Any], key: Any = str) -> list[str]:
    """The model next to the reference rankers on the same requests, its interval and own AUCs;
    ``key`` maps a metric name to the dict's key (MLflow's spelling for logged metrics)."""

    def cell(name: str) -> str:
        value = metrics.get(key(name))
        return f"{value:>14.4f}" if isinstance(value, float) and math.isfinite(value) else f"{'-':>14}"

    lines = [f"{'ranker (same eval requests)':<28}" + "".join(f"{m:>14}" for m in TABLE_METRICS)]
    for label, prefix in RANKERS:
        if any(key(prefix + m) in metrics for m in TABLE_METRICS):
            lines.append(f"{label:<28}" + "".join(cell(prefix + m) for m in TABLE_METRICS))
    primary = primary_metric(cfg, {m: 0 for m in TABLE_METRICS if key(m) in metrics})
    half, n = metrics.get(key(f"ci/{primary}/halfwidth")), metrics.get(key("n_requests"))
    if half is not None and n is not None:
        lines.append(f"{primary}: 95% interval half-width {half:.4f} over {n:.0f} eval requests")
    for name in ("gauc", "auc_light", "auc_expressive", "logloss", "logloss_constant", "flops_per_request"):
        if isinstance(metrics.get(key(name)), float):
            lines.append(f"{name:<28}{metrics[key(name)]:.4g}")
    return lines


def json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN as null: present but not a number, which the gate never promotes."""
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def read_vectors(cfg: Config, date: dt.date | str) -> pa.Table:
    path = layout.metrics_dir(cfg, date) / REQUESTS_FILE
    if not path.exists():
        raise HapError(
            f"no per-request eval vectors at {path}; run `hap evaluate --date {layout.day(date)}` first"
        )
    return pq.read_table(path)


def evaluate_day(cfg: Config, date: dt.date | str) -> dict[str, float]:
    """Evaluate the day's bundle on the day's eval set; writes ``eval.json`` and the per-request vectors."""
    import io

    from hap.model.serving import load_bundle

    date = layout.day(date)
    result = evaluate_bundle(cfg, load_bundle(layout.model_dir(cfg, date)), layout.eval_set(cfg, date))
    sink = io.BytesIO()
    pq.write_table(result.table(), sink)
    atomic_write_bytes(layout.metrics_dir(cfg, date) / REQUESTS_FILE, sink.getvalue())
    atomic_write_json(layout.metrics_dir(cfg, date) / EVAL_FILE, json_metrics(result.metrics))
    return result.metrics
