"""Model issue: dataset, losses, routing, metrics, train/evaluate/bundle (resume: test_checkpoint.py
and test_stream.py; DDP: test_ddp.py).

Tiny data (3 simulated days, 240 requests each) and tiny towers; real torch, real files.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sklearn.metrics import roc_auc_score

from hap.core import layout
from hap.core.config import Config
from hap.data import markers

DATE = dt.date(2026, 11, 2)
TINY_MODEL = {
    "model.hash_buckets": 4096,
    "model.embed_dim": 8,
    "model.light.tower_dims": [16, 8],
    "model.light.mlp_dims": [8],
    "model.expressive.tower_dims": [16, 8],
    "model.expressive.mlp_dims": [16, 8, 8],
    "model.expressive.attention_heads": 2,
    "train.epochs": 2,
    "train.batch_requests": 64,
    "train.diagnostics_every": 5,
    "train.patience": 5,
    "evaluate.latency_repeats": 1,
    "evaluate.latency_candidates": 200,
    "routing.serve": "hap",  # these tests check the DAMR wiring, whatever the default serves
    "train.lr": 0.003,  # a handful of steps on tiny data
}


def model_cfg(home: Path, **kw) -> Config:
    return tiny_config(home, **{k.replace(".", "__"): v for k, v in {**TINY_MODEL, **kw}.items()})


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Three simulated, ingested days; window 11-01..11-02, eval day 11-03 (held out)."""
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    home = tmp_path_factory.mktemp("model") / "data"
    cfg = model_cfg(home)
    for day, _ in simulate_days(cfg, cfg.simulate.start, 3):
        ingest_day(cfg, day, require_validated=False)
        markers.mark_validated(cfg, day, {"by": "test_model"})
    build_training_set(cfg, DATE)
    return cfg


# ---- metric kernels -----------------------------------------------------------------------------
def test_auc_and_gauc_match_sklearn() -> None:
    from hap.model.evaluate import auc, gauc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding makes ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    groups = rng.integers(0, 20, 500)
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            num += roc_auc_score(y[m], s[m]) * m.sum()
            den += m.sum()
    assert gauc(groups, y, s) == pytest.approx(num / den, abs=1e-12)
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_recall_and_ndcg_match_brute_force() -> None:
    from hap.model.evaluate import ranking_metrics

    rng = np.random.default_rng(1)
    r, n = 30, 40
    key = rng.normal(size=(r, n))
    lab = (rng.random((r, n)) < 0.1).astype(np.int64)
    valid = np.ones((r, n), bool)
    valid[:, 35:] = rng.random((r, 5)) < 0.5
    top = (rng.random((r, n)) < 0.2).astype(np.int64)
    got = ranking_metrics(key, lab, valid, [5, 10, 50], top)
    for k in (5, 10, 50):
        recs, ndcgs, cons = [], [], []
        for i in range(r):
            items = [j for j in range(n) if valid[i, j]]
            ranked = sorted(items, key=lambda j: -key[i, j])[:k]
            rel = [j for j in items if lab[i, j]]
            if rel:
                recs.append(sum(lab[i, j] for j in ranked) / len(rel))
                dcg = sum(lab[i, j] / np.log2(p + 2) for p, j in enumerate(ranked))
                ndcgs.append(dcg / sum(1 / np.log2(p + 2) for p in range(min(len(rel), k))))
            t = [j for j in items if top[i, j]]
            if t:
                cons.append(sum(top[i, j] for j in ranked) / len(t))
        assert got[f"recall@{k}"] == pytest.approx(np.mean(recs))
        assert got[f"ndcg@{k}"] == pytest.approx(np.mean(ndcgs))
        assert got[f"rank50_recall@{k}"] == pytest.approx(np.mean(cons))


# ---- losses ----------------------------------------------------------------------------------------
def test_ghcl_group_softmax_sees_only_its_group() -> None:
    from hap.model.batches import column_layout
    from hap.model.losses import group_losses, mixed_bce, mixed_infonce

    cols = column_layout({"expose_neg": 2, "rank_neg": 2, "prerank_neg": 2, "global_neg": 1})
    torch.manual_seed(0)
    logits = torch.randn(4, len(cols))
    valid = torch.ones_like(logits, dtype=torch.bool)
    base, present = group_losses(logits, valid, cols, 0.5, 0.0)
    assert present.all()
    bumped = logits.clone()
    bumped[:, cols == 3] += 5.0  # a global negative gets harder
    after, _ = group_losses(bumped, valid, cols, 0.5, 0.0)
    assert torch.allclose(after[:3], base[:3]) and after[3] > base[3]
    # a single group's InfoNCE by hand
    z = torch.cat([logits[:, :1], logits[:, cols == 0]], 1) / 0.5
    assert base[0] == pytest.approx(float((torch.logsumexp(z, 1) - z[:, 0]).mean()), rel=1e-6)
    # invalid slots are ignored
    valid2 = valid.clone()
    valid2[:, cols == 3] = False
    _, present2 = group_losses(logits, valid2, cols, 0.5, 1.0)
    assert not present2[3]
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    assert mixed_bce(logits, valid) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    )
    z = logits / 0.3
    assert mixed_infonce(logits, valid, 0.3) == pytest.approx(
        float((torch.logsumexp(z, 1) - z[:, 0]).mean()), rel=1e-6
    )


def test_harmonizers() -> None:
    from hap.model.losses import Harmonizer, pcgrad_combine

    logits = torch.randn(8, 5, requires_grad=True)
    losses = torch.stack([(logits[:, 0] * 10).pow(2).mean(), logits[:, 1].pow(2).mean()])
    present = torch.tensor([True, True])
    w = Harmonizer("gradnorm").weights(losses, present, logits)
    assert w.sum() == pytest.approx(1.0) and w[0] < w[1]  # the dominating group is damped
    assert torch.allclose(Harmonizer("uniform").weights(losses, present, logits), torch.tensor([0.5, 0.5]))
    g1, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    (merged,) = pcgrad_combine([g1, g2], torch.Generator().manual_seed(0))
    assert float(merged @ g1[0]) >= -1e-6 and float(merged @ g2[0]) >= -1e-6  # no conflict left


# ---- routing -----------------------------------------------------------------------------------------
def test_routing_and_order() -> None:
    from hap.core.config import RoutingConfig
    from hap.model.routing import damr_order, route, route_grid

    light = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.0, 0.4, 0.6])
    topk = RoutingConfig(mode="topk", rho=0.2, cap=0.2)
    routed = route(light, topk)
    assert set(np.flatnonzero(routed)) == {1, 6}
    thr = route(light, RoutingConfig(mode="threshold", rho=0.1, threshold=0.35, cap=0.3))
    assert thr.sum() == 3 and set(np.flatnonzero(thr)) == {1, 6, 3}
    expr = np.where(routed, np.array([0, 0.1, 0, 0, 0, 0, 0.9, 0, 0, 0]), np.nan)
    _, rank = damr_order(light, expr, routed)
    assert rank[6] == 1 and rank[1] == 2 and rank[3] == 3  # routed by expressive, then light order
    grid = torch.tensor(np.stack([light, light[::-1]]), dtype=torch.float32)
    valid = torch.ones_like(grid, dtype=torch.bool)
    valid[1, :5] = False
    got = route_grid(grid, valid, topk).numpy()
    assert (got[0] == routed).all()
    assert got[1].sum() == 1 and got[1, 5:].tolist() == route(light[::-1][5:], topk).tolist()


# ---- data --------------------------------------------------------------------------------------------
def test_batches_are_stratified_by_group(tiny_split: Config) -> None:
    from hap.model.batches import GROUPS, TrainData

    data = TrainData.load(tiny_split, layout.training_set(tiny_split, DATE))
    props = tiny_split.train.group_proportions
    batches = data.batches(0)
    assert sum(b.size for b in batches) == len(data.train_anchors)
    b = batches[0]
    for gi, g in enumerate(GROUPS):
        assert int((b.col_group == gi).sum()) == props[g]  # every batch holds every group, fixed counts
    # every candidate comes from the anchor's own request: the request-side features match
    anchors = data.train_anchors[
        torch.randperm(
            len(data.train_anchors),
            generator=torch.Generator().manual_seed(tiny_split.train.seed * 1_000_003),
        )
    ][: b.size]
    assert torch.equal(b.item_cat[:, 0], data.item_cat[anchors])
    assert b.valid[:, 0].all()
    assert set(data.row_req[data.val_anchors].tolist()).isdisjoint(data.row_req[data.train_anchors].tolist())
    # same (seed, epoch) -> same batches; another epoch -> another order
    again = data.batches(0)[0]
    assert torch.equal(again.item_cat, b.item_cat) and not torch.equal(
        data.batches(1)[0].item_cat, b.item_cat
    )


# ---- train, bundle, evaluate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_split: Config, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Any]:
    """The tiny window's HAP bundle, trained once in its own models folder: its config and its
    ``TrainResult``."""
    from hap.model.train import train_day

    cfg = tiny_split.updated({"paths.models": str(tmp_path_factory.mktemp("trained") / "models")})
    return cfg, train_day(cfg, DATE)


@pytest.fixture(scope="module")
def bundle_dir(trained: tuple[Config, Any]) -> Path:
    return layout.model_dir(trained[0], DATE)


@pytest.fixture(scope="module")
def evaluated(trained: tuple[Config, Any]) -> dict[str, float]:
    from hap.model.evaluate import evaluate_day

    return evaluate_day(trained[0], DATE)


def test_training_writes_a_complete_bundle(bundle_dir: Path) -> None:
    for name in (
        layout.BUNDLE_META_FILE,
        layout.tower_weights_file("light"),
        layout.tower_weights_file("expressive"),
        layout.HISTORY_FILE,
        layout.DIAGNOSTICS_FILE,
    ):
        assert (bundle_dir / name).is_file() and (bundle_dir / name).stat().st_size > 0, name


def test_bundle_records_its_data_and_a_calibrated_threshold(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.data.versioning import data_version

    meta = json.loads((bundle_dir / layout.BUNDLE_META_FILE).read_text())
    assert meta["data_version"] == data_version(tiny_split, DATE)
    assert meta["window"] == ["2026-11-01", "2026-11-02"]
    assert np.isfinite(meta["routing"]["threshold"])


def test_training_records_gradient_diagnostics_and_one_history_row_per_epoch(
    trained: tuple[Config, Any], bundle_dir: Path
) -> None:
    diag = json.loads((bundle_dir / layout.DIAGNOSTICS_FILE).read_text())
    first = diag["steps"][0]
    assert np.isfinite(first["cos_easy_hard"]) and np.isfinite(first["grad_norm/global_neg"])
    history = json.loads((bundle_dir / layout.HISTORY_FILE).read_text())
    assert len(history) == trained[1].epochs_run == 2


def test_light_model_learns_over_chance(trained: tuple[Config, Any]) -> None:
    assert trained[1].val_metric["light"] > 0.55  # pairwise accuracy on held-out requests


def test_evaluation_saves_what_it_returns(trained: tuple[Config, Any], evaluated: dict[str, float]) -> None:
    saved = json.loads((layout.metrics_dir(trained[0], DATE) / layout.EVAL_FILE).read_text())
    # JSON has no NaN: an undefined metric (a content type without clicks) is saved as null
    assert {k: (np.nan if v is None else v) for k, v in saved.items()} == pytest.approx(
        evaluated, nan_ok=True
    )


@pytest.mark.parametrize(
    "key",
    [
        "recall@10",
        "recall@50",
        "recall@100",
        "ndcg@50",
        "rank50_recall@50",
        "auc_light",
        "auc_expressive",
        "gauc",
        "logloss",
        "logloss_constant",
        "ece",
        "mean_prob",
        "ctr",
        "gt_recall@50",
        "exp_clicks@10",
        "ref_prerank_recall@50",
        "ref_truth_gt_recall@50",
        "ci/gt_recall@50/halfwidth",
        "vs_light/gt_recall@50/lo",
        "vs_ref_random/rank50_recall@50/diff",  # against each reference on the real-log primary too
        "auc_slice_easy",
        "auc_slice_hard",
        "auc_slice_global_neg",
        "flops_per_request",
        "latency_ms_per_1k",
    ],
)
def test_evaluation_reports_metric(evaluated: dict[str, float], key: str) -> None:
    assert key in evaluated and np.isfinite(evaluated[key]), key


def test_recall_grows_with_k_and_the_truth_order_is_perfect(evaluated: dict[str, float]) -> None:
    assert evaluated["recall@10"] <= evaluated["recall@50"] <= evaluated["recall@100"]
    assert evaluated["ref_truth_gt_recall@50"] == pytest.approx(1.0)


def test_hap_routes_rho_of_candidates_at_a_cost_between_its_towers(evaluated: dict[str, float]) -> None:
    assert evaluated["routed_share"] == pytest.approx(0.1, abs=0.01)
    assert evaluated["flops_light"] < evaluated["flops_hap"] < evaluated["flops_expressive_all"]


def test_serving_routes_the_ceiling_of_rho_and_ranks_routed_first(
    tiny_split: Config, bundle_dir: Path
) -> None:
    from hap.model.serving import load_bundle

    _, one = _one_request(tiny_split)
    here = load_bundle(bundle_dir).score_request(one)
    assert here.routed.sum() == int(np.ceil(0.1 * one.num_rows))
    assert (here.rank[here.routed] <= here.routed.sum()).all()


def test_request_side_encoded_once_scores_like_the_batch_path(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.model.serving import load_bundle

    _, one = _one_request(tiny_split)
    bundle = load_bundle(bundle_dir)
    here = bundle.score_request(one)
    enc = bundle.encode(one)  # the batch path encodes the request side on every row
    with torch.no_grad():
        batch_light = bundle.light(
            enc["req_cat"],
            enc["req_dense"],
            enc["seq"],
            enc["item_cat"][:, None],
            enc["item_dense"][:, None],
            enc["cross"][:, None],
        )[:, 0].numpy()
    assert np.allclose(batch_light, here.light, atol=1e-5)


def test_a_fresh_process_scores_like_this_one(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.model.serving import load_bundle

    _, one = _one_request(tiny_split)
    here = load_bundle(bundle_dir).score_request(one)
    code = (
        "import sys, json, pyarrow.parquet as pq; from hap.model.serving import load_bundle; "
        "t = pq.read_table(sys.argv[2]); "
        "t = t.filter(t['request_id'].to_numpy() == t['request_id'][0].as_py()); "
        "r = load_bundle(sys.argv[1]).score_request(t); print(json.dumps(r.light.tolist()))"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(bundle_dir),
            str(layout.eval_set(tiny_split, DATE) / "part-0.parquet"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert np.allclose(json.loads(out.stdout), here.light, atol=1e-6)


def _one_request(cfg: Config):
    import pyarrow.parquet as pq

    table = pq.read_table(layout.eval_set(cfg, DATE))
    return table, table.filter(table["request_id"].to_numpy() == table["request_id"][0].as_py())


def test_damr_order_does_not_depend_on_candidate_order(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.model.serving import load_bundle

    _, one = _one_request(tiny_split)
    bundle = load_bundle(bundle_dir)
    here = bundle.score_request(one)
    perm = np.random.default_rng(0).permutation(one.num_rows)
    shuffled = bundle.score_request(one.take(perm))
    assert np.allclose(shuffled.final, here.final[perm], atol=1e-5)
    assert (shuffled.rank == here.rank[perm]).all() and (shuffled.routed == here.routed[perm]).all()


def test_item_cache_changes_no_score(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.model.serving import load_bundle

    table, one = _one_request(tiny_split)
    plain = load_bundle(bundle_dir).score_table(table)
    cached = load_bundle(bundle_dir).cache_items(table).score_table(table)
    assert np.allclose(cached.final, plain.final, atol=1e-5) and (cached.rank == plain.rank).all()
    # one request scored alone (serving) equals its rows scored among all the others (evaluation)
    alone = load_bundle(bundle_dir).score_request(one)
    rows = np.flatnonzero(table["request_id"].to_numpy() == one["request_id"][0].as_py())
    assert np.allclose(alone.final, plain.final[rows], atol=1e-5)


def test_a_partial_item_cache_changes_no_score(tiny_split: Config, bundle_dir: Path) -> None:
    """Cached candidates come from the cache, the others through the tower: the same scores."""
    from hap.model.serving import load_bundle

    table, one = _one_request(tiny_split)
    here = load_bundle(bundle_dir).score_request(one)
    for catalogue in (table, one.slice(0, one.num_rows // 2)):
        cached = load_bundle(bundle_dir).cache_items(catalogue).score_request(one)
        assert np.allclose(cached.light, here.light, atol=1e-5)
        assert (cached.routed == here.routed).all()
        assert np.allclose(cached.expressive[cached.routed], here.expressive[here.routed], atol=1e-5)


def test_higher_true_affinity_gives_higher_light_score(tiny_split: Config, bundle_dir: Path) -> None:
    from scipy.stats import spearmanr

    from hap.model.serving import load_bundle

    table, _ = _one_request(tiny_split)
    light = load_bundle(bundle_dir).tower_scores("light", table)
    truth = table["true_affinity"].to_numpy()
    top, bottom = truth >= np.quantile(truth, 0.9), truth <= np.quantile(truth, 0.1)
    assert light[top].mean() > light[bottom].mean()
    assert spearmanr(truth, light).statistic > 0.1


def test_typed_routing_config_and_validated_copies(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.core.config import RoutingConfig
    from hap.core.errors import HapError
    from hap.model.serving import load_bundle

    bundle = load_bundle(bundle_dir)
    assert (
        isinstance(bundle.routing, RoutingConfig) and bundle.routing.cap == 0.2
    )  # params, not a 1.0 default
    light_only = bundle.cache_items(_one_request(tiny_split)[1]).with_routing(serve="light")
    assert light_only.serve == "light" and light_only.item_cache is not None  # every field carried over
    assert bundle.serve == "hap"
    with pytest.raises(ValueError):
        bundle.with_routing(rho=2.0)  # validated like params
    meta = json.loads((bundle_dir / layout.BUNDLE_META_FILE).read_text())
    broken = bundle_dir.parent / "broken-bundle"
    broken.mkdir(exist_ok=True)
    del meta["routing"]["cap"]
    (broken / layout.BUNDLE_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(HapError, match="routing config is invalid"):
        load_bundle(broken)


def test_nan_scores_give_nan_metrics_and_a_rejection(tiny_split: Config, bundle_dir: Path) -> None:
    from hap.model.evaluate import evaluate_bundle, json_metrics, primary_metric
    from hap.model.serving import load_bundle
    from hap.registry.blessing import decide

    bundle = load_bundle(bundle_dir)
    with torch.no_grad():  # the light tower that scores: the bundle's export
        bundle._towers()["light"].out.bias.fill_(float("nan"))
    result = evaluate_bundle(tiny_split, bundle, layout.eval_set(tiny_split, DATE))
    m = result.metrics
    assert m["nonfinite_scores"] > 0
    for key in ("recall@50", "gt_recall@50", "gauc", "auc_light", "auc_slice_hard", "ndcg@10"):
        assert np.isnan(m[key]), key  # never a high recall from NaN sorting first
    assert m["ref_prerank_recall@50"] > 0  # the yardsticks do not depend on the model
    saved = json_metrics(m)
    assert saved["recall@50"] is None
    cfg = tiny_split.updated({"gate.floors": {}})
    d = decide(saved, None, cfg.gate, primary_metric(cfg, saved))
    assert not d.passed and any("never promoted" in r for r in d.reasons)


def test_the_served_probability_is_calibrated_and_is_what_evaluation_measures(
    tiny_split: Config, bundle_dir: Path, evaluated: dict[str, float]
) -> None:
    """One served score (issue 29): training fits a Platt scaling per score kind on its validation
    exposures; serving, the pyfunc and evaluation all read ``RequestScores.prob``."""
    from hap.model.calibration import served_probability
    from hap.model.evaluate import load_eval_set
    from hap.model.metrics import calibration_metrics
    from hap.model.serving import load_bundle
    from hap.registry.pyfunc import score_frame

    bundle = load_bundle(bundle_dir)
    assert bundle.calibration is not None
    assert all(len(bundle.calibration[k]) == 2 for k in ("light", "expressive", "sum"))
    es = load_eval_set(layout.eval_set(tiny_split, DATE))
    scores = bundle.score_table(es.table, es.index)
    routing = bundle.routing
    again = served_probability(
        scores.light, scores.expressive, scores.routed, bundle.serve, routing.merge, bundle.calibration
    )
    assert np.allclose(scores.prob, again) and ((scores.prob > 0) & (scores.prob < 1)).all()
    exposed = es.column("exposed").astype(bool)
    y = es.column("label").astype(int)[exposed]
    measured = calibration_metrics(y, scores.prob[exposed])
    assert evaluated["logloss"] == pytest.approx(measured["logloss"])
    assert evaluated["ece"] == pytest.approx(measured["ece"])
    # the registered model serves the same probability
    rid = es.column("request_id")
    rows = np.flatnonzero(rid == rid[0])
    served = score_frame(bundle, es.table.take(rows).to_pandas())
    assert np.allclose(served["prob"], scores.prob[rows], atol=1e-6)
