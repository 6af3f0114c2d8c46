"""Metric kernels and paired statistics, on padded ``[requests, candidates]`` grids.

Every ranking metric is computed per request first (a vector, NaN where the request does not
define it), so two rankers evaluated on the same requests can be compared pairwise; the reported
metric is the mean over the requests that define it. Kernels are tested against scikit-learn and
brute force.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum (ties averaged)."""
    y = np.asarray(labels).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(scores, np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def group_aucs(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group AUC over ``n_groups`` integer groups (NaN where a group lacks either class)."""
    gi = np.asarray(groups, np.int64)
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, np.float64)
    order = np.lexsort((s, gi))  # rank within group (average ties): runs of equal (group, score)
    gs, ss = gi[order], s[order]
    new_run = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
    run_id = np.cumsum(new_run) - 1
    group_start = np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1]
    first_of = np.zeros(n_groups, np.int64)
    first_of[gs[group_start]] = group_start
    pos_in_group = np.arange(len(gs)) - first_of[gs]
    run_mean = np.bincount(run_id, weights=pos_in_group + 1.0) / np.bincount(run_id)
    ranks = np.empty(len(s))
    ranks[order] = run_mean[run_id]
    n = np.bincount(gi, minlength=n_groups).astype(np.float64)
    n1 = np.bincount(gi, weights=y, minlength=n_groups)
    n0 = n - n1
    rsum = np.bincount(gi, weights=ranks * y, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = (rsum - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), per, np.nan)


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-group AUC weighted by group size, over groups holding both classes."""
    _, gi = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(gi.max(initial=-1)) + 1
    per = group_aucs(gi, labels, scores, n_groups)
    size = np.bincount(gi, minlength=n_groups).astype(np.float64)
    ok = np.isfinite(per)
    return float((per[ok] * size[ok]).sum() / size[ok].sum()) if ok.any() else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Calibration of click probabilities on exposures: log loss next to the constant predictor's
    (the observed rate), the expected calibration error over ``bins`` equal-count bins
    (scikit-learn's ``calibration_curve``, quantile strategy: the mean |observed - predicted|
    rate), and the mean predicted probability next to the observed CTR."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(labels, np.int64)
    p = np.asarray(probs, np.float64)
    nan = float("nan")
    constant = np.full(len(y), y.mean() if len(y) else 0.5)
    out = {"logloss": logloss(y, p), "logloss_constant": logloss(y, constant)}
    out |= {"ctr": float(y.mean()) if len(y) else nan, "mean_prob": float(p.mean()) if len(p) else nan}
    if len(y) < bins or y.min() == y.max() or not np.isfinite(p).all():
        return out | {"ece": nan}
    observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="quantile")
    return out | {"ece": float(np.abs(observed - predicted).mean())}


def _nanmean(values: np.ndarray) -> float:
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


# ---- per-request metric vectors on [R, n] grids ------------------------------------------------------
def order_of(key: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Column order of each request by descending key (padding last, ties in column order)."""
    return np.argsort(-np.where(valid, key, -np.inf), axis=1, kind="stable")


def click_vectors(
    order: np.ndarray, labels: np.ndarray, valid: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Recall@K and NDCG@K (binary relevance, ideal-DCG normalised) per request; NaN for a
    request without a click."""
    rel = np.take_along_axis(labels * valid, order, axis=1).astype(np.float64)
    n_rel = rel.sum(1)
    has = n_rel > 0
    disc = 1.0 / np.log2(np.arange(order.shape[1]) + 2.0)
    cum = np.cumsum(rel, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, order.shape[1])
        dcg = (rel[:, :kk] * disc[:kk]).sum(1)
        ideal = np.cumsum(disc)[np.clip(np.minimum(n_rel, kk).astype(int) - 1, 0, None)]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"recall@{k}"] = np.where(has, cum[:, kk - 1] / n_rel, np.nan)
            out[f"ndcg@{k}"] = np.where(has, dcg / ideal, np.nan)
    return out


def share_vectors(
    order: np.ndarray, members: np.ndarray, valid: np.ndarray, ks: list[int], name: str
) -> dict[str, np.ndarray]:
    """Share of each request's ``members`` inside the top K (NaN for a request without members)."""
    top = np.take_along_axis(members * valid, order, axis=1).astype(np.float64)
    n_top = top.sum(1)
    cum = np.cumsum(top, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            f"{name}@{k}": np.where(n_top > 0, cum[:, min(k, order.shape[1]) - 1] / n_top, np.nan) for k in ks
        }


def truth_vectors(
    order: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray,
    ks: list[int],
    click_logit: tuple[float, float],
    clicks_k: int,
) -> dict[str, np.ndarray]:
    """Ground-truth metrics per request, free of clicks and of exposure bias:

    - ``gt_recall@K``: share of the true top K (by ``true_affinity``) inside the ranker's top K;
    - ``exp_clicks@k``: expected clicks if the ranker's top ``k`` were shown in its order, under the
      simulator's click model ``sigmoid(affinity + offset - position_bias * (slot - 1))``.
    """
    truth = np.where(valid, truth, -np.inf)
    true_rank = np.empty_like(order)
    np.put_along_axis(true_rank, order_of(truth, valid), np.arange(order.shape[1])[None, :], 1)
    ranked_true = np.take_along_axis(true_rank, order, axis=1)  # true rank of the ranker's i-th pick
    n = valid.sum(1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = np.minimum(k, n)
        hits = (ranked_true[:, : min(k, order.shape[1])] < kk[:, None]).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"gt_recall@{k}"] = np.where(kk > 0, hits / kk, np.nan)
    offset, bias = click_logit
    kc = min(clicks_k, order.shape[1])
    aff = np.take_along_axis(truth, order[:, :kc], axis=1)
    logit = aff + offset - bias * np.arange(kc)[None, :]
    shown = np.isfinite(aff)
    out[f"exp_clicks@{clicks_k}"] = np.where(
        shown, 1.0 / (1.0 + np.exp(-np.where(shown, logit, 0.0))), 0.0
    ).sum(1)
    return out


def ranking_metrics(
    key: np.ndarray, labels: np.ndarray, valid: np.ndarray, ks: list[int], rank50: np.ndarray | None = None
) -> dict[str, float]:
    """Recall@K, NDCG@K (binary relevance) and optionally rank50_recall@K, means over requests."""
    order = order_of(key, valid)
    vectors = click_vectors(order, labels, valid, ks)
    if rank50 is not None:
        vectors.update(share_vectors(order, rank50, valid, ks, "rank50_recall"))
    return {k: _nanmean(v) for k, v in vectors.items()}


# ---- paired statistics --------------------------------------------------------------------------------
def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def paired_interval(
    a: np.ndarray, b: np.ndarray | None, confidence: float, resamples: int, seed: int
) -> tuple[float, float, float, int]:
    """(mean of a - b, lower, upper, requests): a paired bootstrap interval over the requests where
    both are finite (``b`` None: the interval of the mean of ``a``). NaN when fewer than 2."""
    from scipy.stats import bootstrap

    a = np.asarray(a, np.float64)
    b = np.zeros_like(a) if b is None else np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 2:
        return float("nan"), float("nan"), float("nan"), n
    a, b = a[ok], b[ok]
    diff = float(np.mean(a - b))
    if np.ptp(a - b) <= 1e-12:  # every request moved by the same amount: no sampling noise to bound
        return diff, diff, diff, n
    res = bootstrap(
        (a, b),
        _mean_diff,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return diff, float(res.confidence_interval.low), float(res.confidence_interval.high), n
