"""The two HAP towers and the self-describing model bundle.

- ``LightweightModel``: user tower + item tower, ``[u + v, u * v]``, an M-layer MLP, a CTR head.
- ``ExpressiveModel``: wider towers, target attention of the candidate over the user's recent
  clicks, ``[u + v, u * v, attn]``, an N-layer MLP (N > M), a CTR head.

A recent click is embedded as its item id **plus its side features** (category, sub-category), as
in DIN/DIEN/MIND: the log holds only the clicked ids, and with a few thousand clicks a window an id
appears in a handful of sequences, too few for its embedding to learn what the item is about. The
side features come from ``behaviour_lookup`` (hashed id row -> side-feature rows), a buffer fitted
from the training window's items (``fit_behaviour_lookup``) and saved with the weights, so serving
embeds a click exactly as training did. The side features share the item tower's embedding rows,
so a click and a candidate of the same category meet in one space. An item the window never saw
maps to row 0 (padding, zero): its click counts by id alone.

Both split into ``user(...)`` (once per request), ``item(...)`` (once per candidate, cacheable) and
``head(user, item)`` (once per candidate), which is how serving runs them. FLOPs are counted from
the same layer shapes (``flops()``), so cost numbers follow the params.

A bundle folder (``hap train`` output) is ``bundle.json`` + ``light.pt`` / ``expressive.pt`` state
dicts, written by ``save_bundle``; ``hap.model.serving.load_bundle`` rebuilds the scorer from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hap.core import layout
from hap.core.config import ModelConfig
from hap.core.errors import HapError
from hap.model.batches import (
    CATEGORICAL_ORDER,
    DENSE_ORDER,
    ITEM_CATEGORICAL,
    N_USER_DENSE,
    REQUEST_CATEGORICAL,
    Batch,
)
from hap.model.cross import cross_width
from hap.model.export import export_towers
from hap.model.layers import linear_flops, linear_of_parts, mlp

BUNDLE_FORMAT = "hap-bundle/1"
N_REQ_CAT, N_ITEM_CAT = len(REQUEST_CATEGORICAL), len(ITEM_CATEGORICAL)
N_ITEM_DENSE = len(DENSE_ORDER) - N_USER_DENSE


GRAD_SINK = "grad_sink"  # a table parameter's attribute: the kept buffer its rows' gradients add into


class _SinkRows(torch.autograd.Function):
    """``table[flat]`` whose backward adds the rows' gradients into the table's kept sink buffer
    (``index_put_`` with accumulate) and hands autograd no table gradient: no table-sized zero fill,
    scatter and sum per lookup (two lookups a training step: the anchors and the full-flow
    requests), the bulk of a light step's table cost on CPU. The same sums as the dense gradient."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, flat: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.sink = sink
        return table.index_select(0, flat)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        (flat,) = ctx.saved_tensors
        ctx.sink.index_put_((flat,), grad, accumulate=True)
        return None, None, None


def sunk_rows(table: torch.Tensor, ids: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each id tensor's rows of ``table`` ``[*ids.shape, E]`` through its gradient sink
    (``attach_grad_sink``), or None where it has none or autograd does not record (a plain lookup)."""
    sink = getattr(table, GRAD_SINK, None)
    if sink is None or not (torch.is_grad_enabled() and table.requires_grad):
        return None
    return [_SinkRows.apply(table, t.reshape(-1), sink).view(*t.shape, table.shape[1]) for t in ids]


def attach_grad_sink(table: nn.Parameter) -> torch.Tensor:
    """Give ``table`` a zeroed sink buffer its lookups' gradients add into (one training process:
    DDP all-reduces the autograd gradient, which the sink bypasses). The trainer zeroes it before
    each backward; ``zero_padding_grad`` hands it to the optimizer as the table's gradient."""
    sink = torch.zeros_like(table, memory_format=torch.contiguous_format)
    setattr(table, GRAD_SINK, sink)
    return sink


class _TwoTower(nn.Module):
    """Shared parts: one hashed embedding table, a user tower and an item tower."""

    ATTENDS = False  # whether ``head_rows`` reads the rows' place on the request grid

    def __init__(
        self,
        hash_buckets: int,
        embed_dim: int,
        tower_dims: list[int],
        seq_len: int,
        behaviour_features: tuple[str, ...] = (),
        cross_dim: int = 0,
    ) -> None:
        super().__init__()
        self.attends = self.ATTENDS  # an instance attribute, so a TorchScript export carries it too
        self.embed_dim, self.seq_len, self.cross_dim = embed_dim, seq_len, cross_dim
        # the cross features' direct (wide) term on the logit, beside their place in the head's MLP input
        self.wide = nn.Linear(cross_dim, 1) if cross_dim else None
        if self.wide is not None:  # starts neutral: a random sign on strong features would rank at random
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
        self.behaviour_slots = [ITEM_CATEGORICAL.index(f) for f in behaviour_features]
        lookup = torch.zeros(hash_buckets, len(self.behaviour_slots), dtype=torch.long)
        self.register_buffer("behaviour_lookup", lookup)
        self.emb = nn.Embedding(hash_buckets, embed_dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.05)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.dim = tower_dims[-1]
        self.user_tower = mlp([N_REQ_CAT * embed_dim + N_USER_DENSE + embed_dim, *tower_dims])
        self.item_tower = mlp([N_ITEM_CAT * embed_dim + N_ITEM_DENSE, *tower_dims])

    @torch.no_grad()
    def fit_behaviour_lookup(self, item_cat: torch.Tensor) -> None:
        """Record each item's side-feature rows under its id row (``item_cat``: encoded item
        columns ``[N, 8]``). An id collision in the hash keeps one of the colliding items."""
        if not self.behaviour_slots:
            return
        ids = item_cat[:, ITEM_CATEGORICAL.index("i_id")].to(self.behaviour_lookup.device)
        side = item_cat[:, self.behaviour_slots].to(self.behaviour_lookup.device)
        self.behaviour_lookup[ids] = side
        self.behaviour_lookup[0] = 0  # padding stays padding

    def behaviours(self, seq: torch.Tensor) -> torch.Tensor:
        """Click embeddings ``[B, L, E]``: the id's row plus its side features' rows."""
        seq_e, side_e = self._embed([seq, self.behaviour_lookup[seq]])
        return seq_e + side_e.sum(-2)

    def _embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each id tensor's rows of the shared table ``[*ids.shape, E]``, from one lookup: a training
        step's gradient of the table is then one dense tensor per forward, where a lookup per feature
        group (request, clicks, their side features, items) filled and summed a table-sized tensor
        each (most of a light step on CPU; ``bench/bench_model.py``)."""
        if not torch.jit.is_scripting():
            # training in one process: each id tensor's rows through the table's gradient sink, which
            # adds their gradients into a kept buffer (``sunk_rows``): no cat of the ids, and no
            # cat of the rows' gradients in the backward
            sunk = sunk_rows(self.emb.weight, ids)
            if sunk is not None:
                return sunk
        flat = ids[0].reshape(-1) if len(ids) == 1 else torch.cat([t.reshape(-1) for t in ids])
        # index_select, whose gradient is one index_add into the table where nn.Embedding's sorts the
        # ids first, and one split (its gradient one cat) where slices would each fill a rows-sized
        # zero gradient. The padding row stays zero: training zeroes its gradient (zero_padding_grad).
        rows = self.emb.weight.index_select(0, flat)
        sizes = [t.numel() for t in ids]
        out: list[torch.Tensor] = []
        for t, part in zip(ids, rows.split(sizes)):
            shape = list(t.shape)
            shape.append(self.embed_dim)
            out.append(part.view(shape))
        return out

    def zero_padding_grad(self) -> None:
        """Row 0 is padding: no gradient moves it (what ``nn.Embedding(padding_idx=0)`` does). A table
        with a gradient sink (``sunk_rows``) takes the sink as its gradient first."""
        table = self.emb.weight
        sink = getattr(table, GRAD_SINK, None)
        if table.grad is None and sink is not None:
            table.grad = sink
        if table.grad is not None:
            table.grad[0] = 0.0

    def _user_vec(
        self, req_e: torch.Tensor, req_dense: torch.Tensor, seq_emb: torch.Tensor, seq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The user vector from the request's embedded ids and clicks (``seq_emb``: ``behaviours``)."""
        mask = (seq != 0).unsqueeze(-1).to(seq_emb.dtype)
        pooled = (seq_emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = torch.cat([req_e.flatten(1), req_dense, pooled], dim=1)
        return self.user_tower(x), seq_emb, seq != 0

    @torch.jit.export
    def user(
        self, req_cat: torch.Tensor, req_dense: torch.Tensor, seq: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The user side ``{name: [B, ...]}`` the head reads, once per request."""
        req_e, seq_e, side_e = self._embed([req_cat, seq, self.behaviour_lookup[seq]])
        u, seq_emb, mask = self._user_vec(req_e, req_dense, seq_e + side_e.sum(-2), seq)
        return self._user_out(u, seq_emb, mask)

    @torch.jit.export
    def item(self, item_cat: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """Item representation ``[..., D]``; depends on item features only (cacheable)."""
        return self._item_vec(self._embed([item_cat])[0], item_dense)

    def _item_vec(self, item_e: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        first = self.item_tower[0]
        x = linear_of_parts([item_e.flatten(-2), item_dense], first.weight, first.bias)
        for i, layer in enumerate(self.item_tower):
            if i > 0:
                x = layer(x)
        return x

    def _head_mlp(
        self, parts: list[torch.Tensor], v: torch.Tensor, cross: torch.Tensor | None
    ) -> torch.Tensor:
        """The head's MLP on ``parts``, then the cross features (zeros where a caller has none),
        read as one input without concatenating them (``linear_of_parts``)."""
        if self.cross_dim > 0:
            if cross is None:
                shape = v.shape[:-1]
                shape.append(self.cross_dim)
                cross = v.new_zeros(shape)
            parts.append(cross.to(v.dtype))
        first = self.mlp[0]
        x = linear_of_parts(parts, first.weight, first.bias)
        for i, layer in enumerate(self.mlp):
            if i > 0:
                x = layer(x)
        return x

    def _user_out(
        self, u: torch.Tensor, seq_emb: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What the head reads of the user side: each tower says."""
        raise NotImplementedError

    def forward(
        self,
        req_cat: torch.Tensor,
        req_dense: torch.Tensor,
        seq: torch.Tensor,
        item_cat: torch.Tensor,
        item_dense: torch.Tensor,
        cross: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, C]`` for ``B`` requests x ``C`` candidates each (``cross``: ``[B, C, F]``):
        ``head(user(...), item(...))`` with every id of the batch embedded in one lookup."""
        req_e, seq_e, side_e, item_e = self._embed([req_cat, seq, self.behaviour_lookup[seq], item_cat])
        u, seq_emb, mask = self._user_vec(req_e, req_dense, seq_e + side_e.sum(-2), seq)
        return self.head(self._user_out(u, seq_emb, mask), self._item_vec(item_e, item_dense), cross)

    def _wide(self, logit: torch.Tensor, cross: torch.Tensor | None) -> torch.Tensor:
        if self.wide is None or cross is None:
            return logit
        return logit + self.wide(cross.to(logit.dtype)).squeeze(-1)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The dense parameters every group's loss flows through (towers, MLP, head): where
        gradient conflict is measured and PCGrad projects. The sparse embedding table is excluded."""
        return [p for n, p in self.named_parameters() if not n.startswith("emb.")]

    def flops(self) -> dict[str, int]:
        """FLOPs of one user-side pass and of one candidate (item tower + head)."""
        behaviour_adds = len(self.behaviour_slots) * self.seq_len * self.embed_dim
        user = linear_flops(self.user_tower) + 2 * self.seq_len * self.embed_dim + behaviour_adds
        # the cross features: seq_len category compares and a few lookups per candidate, and the wide term
        cross = (2 * self.seq_len + 4 * self.cross_dim + linear_flops(self.wide)) if self.cross_dim else 0
        return {
            "user": user + self._user_extra_flops(),
            "item": linear_flops(self.item_tower),
            "head": self._head_flops() + cross,
        }

    def _user_extra_flops(self) -> int:
        return 0


class LightweightModel(_TwoTower):
    """``[u + v, u * v]`` -> M-layer MLP -> CTR logit."""

    def __init__(
        self,
        hash_buckets: int,
        embed_dim: int,
        tower_dims: list[int],
        mlp_dims: list[int],
        seq_len: int,
        behaviour_features: tuple[str, ...] = (),
        cross_dim: int = 0,
    ) -> None:
        super().__init__(hash_buckets, embed_dim, tower_dims, seq_len, behaviour_features, cross_dim)
        self.mlp = mlp([2 * self.dim + cross_dim, *mlp_dims], final_activation=True)
        self.out = nn.Linear(mlp_dims[-1], 1)

    def _user_out(
        self, u: torch.Tensor, seq_emb: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"u": u}

    def head(
        self, user: dict[str, torch.Tensor], v: torch.Tensor, cross: torch.Tensor | None = None
    ) -> torch.Tensor:
        u = user["u"].unsqueeze(-2) if v.dim() == 3 else user["u"]
        u = u.expand_as(v)
        return self._wide(self.out(self._head_mlp([u + v, u * v], v, cross)).squeeze(-1), cross)

    @torch.jit.export
    def head_rows(
        self,
        user: dict[str, torch.Tensor],
        v: torch.Tensor,
        req: torch.Tensor,
        col: torch.Tensor,
        width: int,
        cross: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[N]`` of ``N`` candidate rows ``v`` of the requests ``user`` holds (``req``:
        each row's request; ``col``, ``width``: its place on the request grid, unused here)."""
        return self.head({"u": _rows_of(user["u"], req)}, v, cross)

    def _head_flops(self) -> int:
        return linear_flops(self.mlp) + linear_flops(self.out) + 3 * self.dim


class ExpressiveModel(_TwoTower):
    """Wider towers + target attention (candidate over recent clicks) -> N-layer MLP -> CTR logit."""

    ATTENDS = True

    def __init__(
        self,
        hash_buckets: int,
        embed_dim: int,
        tower_dims: list[int],
        mlp_dims: list[int],
        seq_len: int,
        heads: int,
        pooling: str = "target",
        behaviour_features: tuple[str, ...] = (),
        cross_dim: int = 0,
    ) -> None:
        super().__init__(hash_buckets, embed_dim, tower_dims, seq_len, behaviour_features, cross_dim)
        if pooling not in ("target", "mean"):
            raise HapError(f"model.expressive.pooling: unknown {pooling!r} (target | mean)")
        self.pooling = pooling  # "mean": the click sequence averaged, the same for every candidate
        self.heads = max(1, heads)
        if self.dim % self.heads:
            raise HapError(f"model.expressive: tower output {self.dim} not divisible by {self.heads} heads")
        self.q = nn.Linear(self.dim, self.dim)
        self.kv = nn.Linear(embed_dim, 2 * self.dim)  # user side: once per request
        self.mlp = mlp([3 * self.dim + cross_dim, *mlp_dims], final_activation=True)
        self.out = nn.Linear(mlp_dims[-1], 1)

    def _user_out(
        self, u: torch.Tensor, seq_emb: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        k, v = self.kv(seq_emb).chunk(2, dim=-1)  # [B, L, D] each
        return {"u": u, "k": k, "v": v, "mask": mask}

    def head(
        self, user: dict[str, torch.Tensor], cand: torch.Tensor, cross: torch.Tensor | None = None
    ) -> torch.Tensor:
        squeeze = cand.dim() == 2  # [N, D] candidates of rows already aligned
        if squeeze:
            cand = cand.unsqueeze(1)
            cross = None if cross is None else cross.unsqueeze(1)
            user = {k: t for k, t in user.items()}
        ctx = self.context(user, self.q(cand))
        u = user["u"].unsqueeze(1).expand_as(cand)
        logit = self._logit(u, cand, ctx, cross)
        return logit.squeeze(1) if squeeze else logit

    def context(self, user: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        """Target attention ``[B, C, D]`` of ``B`` requests' ``C`` candidate queries (``self.q``
        of the candidates) over each request's own clicks: one batched matmul per step."""
        b, c, d = q.shape
        h, dh = self.heads, d // self.heads
        q = q.view(b, c, h, dh).transpose(1, 2)  # [B, H, C, dh]
        k = user["k"].view(b, -1, h, dh).transpose(1, 2)  # [B, H, L, dh]
        val = user["v"].view(b, -1, h, dh).transpose(1, 2)
        att = q @ k.transpose(-1, -2)  # [B, H, C, L]
        if self.pooling == "mean":  # every candidate weighs the clicks alike
            att = torch.zeros_like(att)
        # scaled by 1/sqrt(dh), and -1e4 at the padded clicks, in one addcmul: (a masked_fill with a
        # broadcast mask, and a division, took ~2x as long on CPU, backward included)
        keep = user["mask"].to(att.dtype)[:, None, None, :]  # [B, 1, 1, L]
        att = torch.addcmul((keep - 1.0) * 1e4, att, keep, value=1.0 / math.sqrt(dh)).softmax(-1)
        return (att @ val).transpose(1, 2).reshape(b, c, d)  # [B, C, D]

    def _logit(
        self, u: torch.Tensor, cand: torch.Tensor, ctx: torch.Tensor, cross: torch.Tensor | None
    ) -> torch.Tensor:
        return self._wide(self.out(self._head_mlp([u + cand, u * cand, ctx], cand, cross)).squeeze(-1), cross)

    @torch.jit.export
    def head_rows(
        self,
        user: dict[str, torch.Tensor],
        cand: torch.Tensor,
        req: torch.Tensor,
        col: torch.Tensor,
        width: int,
        cross: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[N]`` of ``N`` candidate rows of the requests ``user`` holds, row ``i`` at
        ``(req[i], col[i])`` of a ``[requests, width]`` grid: the queries go on the grid, so the
        attention is one batched matmul against each request's keys (no per-candidate copy of
        them), and the MLP runs on the rows alone. The same numbers as ``head``."""
        q = self.q(cand)
        n_req = user["u"].shape[0]
        if len(cand) == n_req * width:  # a full grid of rows in grid order (one request served)
            ctx = self.context(user, q.view(n_req, width, -1)).reshape(len(cand), -1)
        else:
            grid = q.new_zeros(n_req, width, q.shape[-1])
            grid[req, col] = q
            ctx = self.context(user, grid)[req, col]
        return self._logit(_rows_of(user["u"], req), cand, ctx, cross)

    def _user_extra_flops(self) -> int:
        return linear_flops(self.kv) * self.seq_len

    def _head_flops(self) -> int:
        attn = 2 * 2 * self.seq_len * self.dim + 5 * self.heads * self.seq_len  # q.k, att.v, softmax
        return linear_flops(self.q) + attn + linear_flops(self.mlp) + linear_flops(self.out) + 3 * self.dim


def _rows_of(u: torch.Tensor, req: torch.Tensor) -> torch.Tensor:
    """Each row's request vector: one request's broadcasts (no copy per row), several gather."""
    return u if len(u) == 1 else u[req]


def forward(net: nn.Module, b: Batch, device: torch.device) -> torch.Tensor:
    """``net``'s logits ``[B, C]`` on a batch's candidate grid (bfloat16 autocast on CUDA)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return net(b.req_cat, b.req_dense, b.seq, b.item_cat, b.item_dense, b.cross).float()


def build_models(model_cfg: ModelConfig | dict[str, Any]) -> tuple[LightweightModel, ExpressiveModel]:
    """Both towers from the typed ``model`` params section (or its dict, as stored in bundle.json)."""
    m = ModelConfig.model_validate(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    common = dict(
        hash_buckets=m.hash_buckets,
        embed_dim=m.embed_dim,
        seq_len=m.seq_len,
        behaviour_features=tuple(m.behaviour_features),
        cross_dim=cross_width(m.cross_features),
    )
    return (
        LightweightModel(tower_dims=m.light.tower_dims, mlp_dims=m.light.mlp_dims, **common),
        ExpressiveModel(
            tower_dims=m.expressive.tower_dims,
            mlp_dims=m.expressive.mlp_dims,
            heads=m.expressive.attention_heads or 1,
            pooling=m.expressive.pooling,
            **common,
        ),
    )


def save_bundle(
    folder: Path, meta: dict[str, Any], light: nn.Module | None, expressive: nn.Module | None
) -> None:
    """Write ``bundle.json``, the state dicts and their TorchScript exports (``hap.model.export``)
    into ``folder`` (the caller makes it atomic)."""
    folder = Path(folder)
    meta = {
        **meta,
        "format": BUNDLE_FORMAT,
        "has_light": light is not None,
        "has_expressive": expressive is not None,
    }
    if light is not None:
        torch.save(
            {k: v.detach().cpu() for k, v in light.state_dict().items()},
            folder / layout.tower_weights_file("light"),
        )
    if expressive is not None:
        torch.save(
            {k: v.detach().cpu() for k, v in expressive.state_dict().items()},
            folder / layout.tower_weights_file("expressive"),
        )
    export_towers(folder, {n: m for n, m in (("light", light), ("expressive", expressive)) if m is not None})
    (folder / layout.BUNDLE_META_FILE).write_text(
        json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    )


__all__ = [
    "LightweightModel",
    "ExpressiveModel",
    "build_models",
    "save_bundle",
    "CATEGORICAL_ORDER",
]
