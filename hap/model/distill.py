"""The logged ranking order of the window's full-flow requests as a training signal (RecFlow).

The sampled logs teach the pre-ranker around the clicks; the full-flow rows (``hap.data.
fullflow_set``) show, for a share of every retrieved candidate, how far it got: the ranking stage's
order among the pre-ranker's top, the pre-ranker's order below it. Both stages rank by the true
preference plus noise independent of each other and of the model, so a model fitted to their order
over many requests learns the preference, not their noise, on the very candidate distribution it is
served (all retrieved candidates, not only the ones around a click).

Each training step adds ``train.fullflow_weight`` x a pairwise logistic loss over
``train.fullflow_batch_requests`` such requests: every pair of a request's rows whose logged order
differs, the one further along should score higher. GHCL's per-group losses over the anchors are
unchanged; this term sits beside them like the stage loss (``losses.stage_loss``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from hap.core.config import Config
from hap.data.fullflow_set import read_fullflow_set, stage_key
from hap.model.batches import Batch
from hap.model.serving import RequestIndex
from hap.model.towers import forward


@dataclass
class FullflowBatch:
    """``B`` full-flow requests x ``K`` of their candidates, and the logged order's key."""

    batch: object  # hap.model.batches.Batch (col_group all 0: no GHCL group)
    key: torch.Tensor  # [B, K] higher = further along the cascade
    pairs: torch.Tensor | None = None  # number of ordered valid pairs (``order_loss``), None: count them

    def to(self, device: torch.device | str, non_blocking: bool = True) -> FullflowBatch:
        return FullflowBatch(
            self.batch.to(device),
            self.key.to(device, non_blocking=non_blocking),
            None if self.pairs is None else self.pairs.to(device, non_blocking=non_blocking),
        )


class FullflowData:
    """The full-flow rows as a padded ``[requests, candidates]`` grid of encoded tensors."""

    def __init__(self, cfg: Config, table: pa.Table, spec: object) -> None:
        self.cfg = cfg
        index = RequestIndex.of(table["request_id"].to_numpy())
        ri, col, first = index.row_request, index.column, index.first_row
        n, k = len(index.counts), int(index.counts.max())
        enc = spec.encode(table)
        self.req_cat = torch.from_numpy(enc["req_cat"][first])
        self.req_dense = torch.from_numpy(enc["req_dense"][first])
        self.seq = torch.from_numpy(enc["seq"][first])

        def grid(values: np.ndarray, fill: float) -> torch.Tensor:
            out = np.full((n, k, *values.shape[1:]), fill, dtype=values.dtype)
            out[ri, col] = values
            return torch.from_numpy(out)

        self.item_cat = grid(enc["item_cat"], 0)
        self.item_dense = grid(enc["item_dense"], 0)
        self.cross = grid(enc["cross"], 0) if enc["cross"].shape[1] else None
        self.key = grid(stage_key(table), -np.inf)
        self.valid = grid(np.ones(len(ri), bool), False)
        self.n_requests = n
        self.pairs = order_pairs(self.key, self.valid)  # [n]: each request's ordered pairs

    @classmethod
    def load(cls, cfg: Config, path: Path, spec: object) -> FullflowData | None:
        """The training set's full-flow rows (``training/dt=D/fullflow``), or None when the term is
        off or the split wrote none."""
        if cfg.train.fullflow_weight <= 0:
            return None
        table = read_fullflow_set(path)
        return cls(cfg, table, spec) if table is not None else None

    def all_batches(self, requests: int = 64) -> Iterator[Batch]:
        """Every full-flow request, ``requests`` at a time, in order (the router's population)."""
        for start in range(0, self.n_requests, requests):
            idx = torch.arange(start, min(start + requests, self.n_requests))
            yield self._batch(idx)

    def _batch(self, idx: torch.Tensor) -> Batch:
        return Batch(
            self.req_cat[idx],
            self.req_dense[idx],
            self.seq[idx],
            self.item_cat[idx],
            self.item_dense[idx],
            self.valid[idx],
            torch.zeros(self.valid.shape[1], dtype=torch.long),
            None if self.cross is None else self.cross[idx],
        )

    def batch(self, step: int) -> FullflowBatch:
        """The step's requests: a draw that depends only on (seed, step)."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7_368_787 + step)
        b = min(self.cfg.train.fullflow_batch_requests, self.n_requests)
        idx = torch.randperm(self.n_requests, generator=gen)[:b]
        return FullflowBatch(self._batch(idx), self.key[idx], self.pairs[idx].sum())


def order_loss(
    logits: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, pairs: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean ``softplus(s_j - s_i)`` over the valid pairs of a request with ``key_i > key_j``
    (``pairs``: their number when the caller counted them, ``FullflowData``)."""
    if pairs is None:
        pairs = ((key[:, :, None] > key[:, None, :]) & valid[:, :, None] & valid[:, None, :]).sum()
    # an invalid row's logit is -inf where it is the lower one and +inf where it is the higher
    # one, so each of its pairs' softplus is exactly 0 with a 0 gradient: the pair mask is then
    # the key order alone (no [B, K, K] validity masks each step)
    s = logits.float()
    lower = s.masked_fill(~valid, float("-inf"))[:, None, :]  # s_j
    higher = s.masked_fill(~valid, float("inf"))[:, :, None]  # s_i
    better = (key[:, :, None] > key[:, None, :]).float()  # a float mask: torch.where is ~4x a mul on CPU
    return (F.softplus(lower - higher) * better).sum() / pairs.clamp(min=1)


def order_pairs(key: torch.Tensor, valid: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Each request's number of valid pairs with ``key_i > key_j`` ``[n]`` (``order_loss``'s
    denominator), counted once, ``chunk`` requests at a time."""
    out = [
        ((k[:, :, None] > k[:, None, :]) & v[:, :, None] & v[:, None, :]).sum((1, 2))
        for k, v in zip(key.split(chunk), valid.split(chunk))
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def fullflow_term(
    cfg: Config, net: nn.Module, fb: FullflowBatch | None, device: torch.device
) -> torch.Tensor | None:
    """``train.fullflow_weight`` x the order loss of ``net`` on the step's full-flow requests."""
    if fb is None or cfg.train.fullflow_weight <= 0:
        return None
    fb = fb.to(device)
    logits = forward(net, fb.batch, device)
    return cfg.train.fullflow_weight * order_loss(logits, fb.key, fb.batch.valid, fb.pairs)
