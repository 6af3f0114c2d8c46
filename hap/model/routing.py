"""DAMR: difficulty-aware model routing, its final order, and its cost in FLOPs.

The light model scores every candidate; the hardest go to the expressive model:
- ``topk``: the top ``ceil(rho * n)`` by light score (a fixed budget);
- ``threshold``: every candidate whose light score is above ``threshold`` (calibrated at training
  time to route a share ``rho`` of the router's own population, the full-flow candidates of the
  window: ``hap.model.train.router_population``), capped at ``ceil(cap * n)`` (adaptive budget).
Final order (``routing.merge``): the routed set first, by light + expressive logit (``sum``) or by
expressive score (``stack``), then the rest by light score; ``raw`` sorts both logits together.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hap.core.config import RoutingConfig

ROUTED_OFFSET = 1e6  # added to the routed ones' merged score (stack, sum): they sort above the rest


def budget(n: int, share: float) -> int:
    return min(n, int(math.ceil(share * n - 1e-9)))


def route(light: np.ndarray, routing: RoutingConfig) -> np.ndarray:
    """Routing decision (bool per candidate) for one request's light scores."""
    grid = torch.from_numpy(np.asarray(light, np.float32))[None, :]
    return route_grid(grid, torch.ones_like(grid, dtype=torch.bool), routing)[0].numpy()


def route_grid(light: torch.Tensor, valid: torch.Tensor, routing: RoutingConfig) -> torch.Tensor:
    """The routing mask over a padded ``[R, n_max]`` grid of requests: the one routing rule."""
    n = valid.sum(1)
    masked = light.masked_fill(~valid, float("-inf"))
    if routing.mode == "threshold" and routing.threshold is not None:
        above = ((masked > routing.threshold) & valid).sum(1)
        cap = torch.ceil(n.double() * routing.cap - 1e-9).long()
        k = torch.minimum(above, cap)
    else:
        k = torch.ceil(n.double() * routing.rho - 1e-9).long()
    return first_k(masked, k) & valid


def first_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each row's first ``k[row]`` entries in a stable descending order of ``scores`` (ties: the
    leftmost first), as a mask: the entries above the row's k-th largest score, then the leftmost
    of those equal to it. A top-k and two comparisons, where ranking every entry took a full
    sort of each row (most of the routing's time on 10,000 candidates)."""
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():  # NaN has no place in a comparison: rank every entry
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
        return rank < k[:, None]
    top = scores.topk(k_max, dim=1).values  # [R, k_max], descending
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # [R, 1]: each row's k-th largest
    above = scores > kth
    tied = scores == kth
    room = k[:, None] - above.sum(1, keepdim=True)
    return (above | (tied & (tied.cumsum(1) <= room))) & (k > 0)[:, None]


def merge_scores(
    light: np.ndarray, expressive: np.ndarray, routed: np.ndarray, merge: str = "stack"
) -> np.ndarray:
    """The score the final order sorts by, from light scores and expressive ones (NaN where not
    routed). Both heads are CTR logits, so they can be compared:

    - ``stack``: the routed set above the rest, by expressive score; the rest by light score;
    - ``raw``: routed by expressive logit, the rest by light logit, one sort (an expressive model
      that rates a routed candidate low can drop it below unrouted ones);
    - ``sum``: the routed set above the rest, ordered by the sum of both logits (a two-model
      ensemble: the expressive model refines the light order instead of replacing it).
    """
    logit = merged_logit(light, expressive, routed, merge)
    return logit if merge == "raw" else np.where(routed, logit + ROUTED_OFFSET, logit)


def merged_logit(light: np.ndarray, expressive: np.ndarray, routed: np.ndarray, merge: str) -> np.ndarray:
    """Each candidate's score on its logit scale: ``merge_scores`` without the routed set's
    offset (the offset only places the routed set first). ``hap.model.calibration`` maps it to
    the served probability."""
    e = np.nan_to_num(expressive, nan=0.0).astype(np.float64)
    lt = np.asarray(light).astype(np.float64)
    if merge in ("stack", "raw"):
        return np.where(routed, e, lt)
    if merge == "sum":
        return np.where(routed, lt + e, lt)
    raise ValueError(f"routing.merge: unknown {merge!r} (stack | raw | sum)")


def ranks(final: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis by descending final score (ties keep candidate order);
    ``[n]`` for one request or a ``[requests, candidates]`` grid padded with -inf."""
    order = np.argsort(-final, axis=-1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.broadcast_to(np.arange(1, final.shape[-1] + 1), order.shape), -1)
    return out


def damr_order(
    light: np.ndarray, expressive: np.ndarray, routed: np.ndarray, merge: str = "stack"
) -> tuple[np.ndarray, np.ndarray]:
    """(final score, 1-based rank) of one request: what the serving path computes per request."""
    final = merge_scores(light, expressive, routed, merge)
    return final, ranks(final)


def calibrate_threshold(light_scores: np.ndarray, rho: float) -> float:
    """The light-score threshold above which a share ``rho`` of ``light_scores`` lies."""
    if light_scores.size == 0:
        return float("inf")
    return float(np.quantile(light_scores.astype(np.float64), 1.0 - rho))


def flops_per_request(light: Any, expressive: Any, n: int, routing: RoutingConfig) -> dict[str, float]:
    """FLOPs for one request of ``n`` candidates, from the layer shapes:
    light-only, HAP (light on all + expressive on the routed share) and expressive on all."""
    out: dict[str, float] = {}
    lf = light.flops() if light is not None else None
    ef = expressive.flops() if expressive is not None else None
    if lf:
        out["flops_light"] = float(lf["user"] + n * (lf["item"] + lf["head"]))
    if ef:
        out["flops_expressive_all"] = float(ef["user"] + n * (ef["item"] + ef["head"]))
    if lf and ef:
        share = routing.cap if routing.mode == "threshold" else routing.rho
        k = budget(n, share)
        out["flops_hap"] = out["flops_light"] + float(ef["user"] + k * (ef["item"] + ef["head"]))
    key = {"light": "flops_light", "expressive_all": "flops_expressive_all", "hap": "flops_hap"}[
        routing.serve
    ]
    out["flops_per_request"] = out.get(key, out.get("flops_light", out.get("flops_expressive_all", 0.0)))
    return out
