"""Model issue: dataset, losses, routing, metrics, train/evaluate/bundle, resume and DDP.

Tiny data (3 simulated days, 240 requests each) and tiny towers; real torch, real files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

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
def test_train_evaluate_and_load_bundle_in_fresh_process(tiny_split: Config) -> None:
    from hap.model.evaluate import evaluate_day
    from hap.model.serving import load_bundle
    from hap.model.train import train_day

    result = train_day(tiny_split, DATE)
    folder = layout.model_dir(tiny_split, DATE)
    for name in (
        layout.BUNDLE_META_FILE,
        layout.tower_weights_file("light"),
        layout.tower_weights_file("expressive"),
        layout.HISTORY_FILE,
        layout.DIAGNOSTICS_FILE,
    ):
        assert (folder / name).exists(), name
    meta = json.loads((folder / layout.BUNDLE_META_FILE).read_text())
    assert meta["data_version"] and meta["window"] == ["2026-11-01", "2026-11-02"]
    assert np.isfinite(meta["routing"]["threshold"])
    diag = json.loads((folder / layout.DIAGNOSTICS_FILE).read_text())
    assert (
        diag["steps"] and "cos_easy_hard" in diag["steps"][0] and "grad_norm/global_neg" in diag["steps"][0]
    )
    assert len(json.loads((folder / layout.HISTORY_FILE).read_text())) == result.epochs_run == 2
    assert result.val_metric["light"] > 0.55  # learned something over chance on the pairs

    metrics = evaluate_day(tiny_split, DATE)
    saved = json.loads((layout.metrics_dir(tiny_split, DATE) / layout.EVAL_FILE).read_text())
    # JSON has no NaN: an undefined metric (a content type without clicks) is saved as null
    assert {k: (np.nan if v is None else v) for k, v in saved.items()} == pytest.approx(metrics, nan_ok=True)
    for key in (
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
        "gt_recall@50",
        "exp_clicks@10",
        "ref_prerank_recall@50",
        "ref_truth_gt_recall@50",
        "ci/gt_recall@50/halfwidth",
        "vs_light/gt_recall@50/lo",
        "vs_ref_random/recall@50/diff",
        "auc_slice_easy",
        "auc_slice_hard",
        "auc_slice_global_neg",
        "flops_per_request",
        "latency_ms_per_1k",
    ):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["routed_share"] == pytest.approx(0.1, abs=0.01)
    assert metrics["flops_light"] < metrics["flops_hap"] < metrics["flops_expressive_all"]
    assert metrics["recall@10"] <= metrics["recall@50"] <= metrics["recall@100"]

    # the serving path in a fresh process gives the same scores as this one
    import pyarrow.parquet as pq

    table = pq.read_table(layout.eval_set(tiny_split, DATE))
    one = table.filter(table["request_id"].to_numpy() == table["request_id"][0].as_py())
    bundle = load_bundle(folder)
    here = bundle.score_request(one)
    assert here.routed.sum() == int(np.ceil(0.1 * one.num_rows))
    # serving encodes the request side once; the batch path encodes it on every row: same scores
    enc = bundle.encode(one)
    with torch.no_grad():
        batch_light = bundle.light(
            enc["req_cat"], enc["req_dense"], enc["seq"], enc["item_cat"][:, None], enc["item_dense"][:, None]
        )[:, 0].numpy()
    assert np.allclose(batch_light, here.light, atol=1e-5)
    # the item-tower cache changes no score, whether it holds every candidate or only some
    for catalogue in (table, one.slice(0, one.num_rows // 2)):
        cached = load_bundle(folder).cache_items(catalogue).score_request(one)
        assert np.allclose(cached.light, here.light, atol=1e-5)
        assert np.allclose(cached.expressive[cached.routed], here.expressive[here.routed], atol=1e-5)
        assert (cached.routed == here.routed).all()
    assert (here.rank[here.routed] <= here.routed.sum()).all()
    code = (
        "import sys, json, pyarrow.parquet as pq; from hap.model.serving import load_bundle; "
        "t = pq.read_table(sys.argv[2]); "
        "t = t.filter(t['request_id'].to_numpy() == t['request_id'][0].as_py()); "
        "r = load_bundle(sys.argv[1]).score_request(t); print(json.dumps(r.light.tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(layout.eval_set(tiny_split, DATE) / "part-0.parquet")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert np.allclose(json.loads(out.stdout), here.light, atol=1e-6)


def crash_before_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next fit die like a killed process right after its last checkpoint."""
    from hap.model import train

    def die(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_bundle", die)


def test_deterministic_and_resume_matches_uninterrupted(
    tiny_split: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hap.model import train
    from hap.model.batches import TrainData
    from hap.model.train import fit

    cfg = tiny_split.updated({"train.epochs": 2, "train.patience": 5, "train.harmonization": "gradnorm"})
    data = TrainData.load(cfg, layout.training_set(cfg, DATE))
    straight = fit(cfg, data, tmp_path / "a", tmp_path / "ck-a", log=False)
    fit(cfg, data, tmp_path / "b", tmp_path / "ck-b", log=False)  # a second identical run, compared below
    assert straight.epochs_run == 2 and not (tmp_path / "ck-a" / train.CKPT_FILE).exists()
    crash_before_bundle(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # the process dies after epoch 1, before its bundle
        fit(cfg.updated({"train.epochs": 1}), data, tmp_path / "c", tmp_path / "ck-c", log=False)
    monkeypatch.undo()
    resumed = fit(cfg, data, tmp_path / "c", tmp_path / "ck-c", resume=True, log=False)
    assert resumed.resumed_from_epoch == 0 and straight.resumed_from_epoch is None
    assert resumed.epochs_run == 2
    sa, sb, sc = (torch.load(tmp_path / x / layout.tower_weights_file("light")) for x in "abc")
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"not deterministic: {k}"
        assert torch.equal(sa[k], sc[k]), f"resume differs: {k}"
    ea, ec = (
        torch.load(tmp_path / "a" / layout.tower_weights_file("expressive")),
        torch.load(tmp_path / "c" / layout.tower_weights_file("expressive")),
    )
    assert all(torch.equal(ea[k], ec[k]) for k in ea)


def test_resume_refuses_a_checkpoint_of_another_training_set(
    tiny_split: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint knows its data version and config: --resume against others refuses, cleanly."""
    from hap.model import train
    from hap.model.batches import TrainData

    cfg = tiny_split.updated({"train.epochs": 1})
    data = TrainData.load(cfg, layout.training_set(cfg, DATE))
    ckpt_dir = layout.checkpoint_dir(cfg, DATE)
    crash_before_bundle(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.fit(cfg, data, tmp_path / "b", ckpt_dir, meta={"data_version": "old-split"}, log=False)
    monkeypatch.undo()
    state = torch.load(ckpt_dir / train.CKPT_FILE, weights_only=True)
    assert state["data_version"] == "old-split" and state["config_hash"] == train.config_hash(cfg)
    # the day's training set has another data version than the one the checkpoint was written for
    with pytest.raises(train.CheckpointMismatch, match="data_version old-split"):
        train.train_day(cfg, DATE, resume=True)
    other = cfg.updated({"train.lr": 0.01})
    with pytest.raises(train.CheckpointMismatch, match="config_hash"):
        train.fit(other, data, tmp_path / "b", ckpt_dir, True, {"data_version": "old-split"}, log=False)
    assert not (tmp_path / "b").exists()


def test_ddp_two_processes_agree_with_single(tiny_split: Config, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes with gloo, vs one process on the same data and seed."""
    from hap.model.batches import TrainData
    from hap.model.train import fit

    sets = {
        "train.epochs": 1,
        "train.loss": "mixed_infonce",
        "train.expressive_groups": "none",
        "train.batch_requests": 64,
        "train.diagnostics_every": 0,
    }
    cfg = tiny_split.updated(sets)
    single = fit(cfg, TrainData.load(cfg, layout.training_set(cfg, DATE)), tmp_path / "single", log=False)
    env = {**os.environ, "HAP_HOME": str(tiny_split.home), "OMP_NUM_THREADS": "1"}
    env.update(
        {f"HAP__{k.upper().replace('.', '__')}": json.dumps(v) for k, v in {**TINY_MODEL, **sets}.items()}
    )
    env.update({"HAP__SIMULATE__START": "2026-11-01", "HAP__SPLIT__WINDOW_DAYS": "2"})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "hap.model.train",
            "--date",
            DATE.isoformat(),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2" in proc.stdout
    a = torch.load(tmp_path / "single" / layout.tower_weights_file("light"))
    b = torch.load(layout.model_dir(tiny_split, DATE) / layout.tower_weights_file("light"))
    meta = json.loads((layout.model_dir(tiny_split, DATE) / layout.BUNDLE_META_FILE).read_text())
    assert meta["result"]["world_size"] == 2
    ddp_metric = meta["result"]["val_metric"]["light"]
    assert abs(ddp_metric - single.val_metric["light"]) < 0.01
    # Adam turns float-level differences of near-zero gradients into lr-sized steps, so single
    # elements (a scalar bias) may differ by a few lr; the weights as a whole must agree to 1%
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[k].flatten() for k in a])
    flat_b = torch.cat([b[k].flatten() for k in a])
    rel = float((flat_a - flat_b).norm() / flat_a.norm())
    assert rel < 0.01, rel
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05


# ---- behaviour of the one scoring path and of evaluation ---------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir(tiny_split: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HAP bundle trained on the tiny window, in its own folder (other tests retrain the day's)."""
    from hap.model.train import train_day

    cfg = tiny_split.updated({"paths.models": str(tmp_path_factory.mktemp("behaviour") / "models")})
    train_day(cfg, DATE)
    return layout.model_dir(cfg, DATE)


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
    with torch.no_grad():
        bundle.light.out.bias.fill_(float("nan"))
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
