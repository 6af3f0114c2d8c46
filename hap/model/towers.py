"""The two HAP towers and the self-describing model bundle.

- ``LightweightModel``: user tower + item tower, ``[u + v, u * v]``, an M-layer MLP, a CTR head.
- ``ExpressiveModel``: wider towers, target attention of the candidate over the user's recent
  clicks, ``[u + v, u * v, attn]``, an N-layer MLP (N > M), a CTR head.

Both split into ``user(...)`` (once per request), ``item(...)`` (once per candidate, cacheable) and
``head(user, item)`` (once per candidate), which is how serving runs them. FLOPs are counted from
the same layer shapes (``flops()``), so cost numbers follow the params.

A bundle folder (``hap train`` output) is ``bundle.json`` + ``light.pt`` / ``expressive.pt`` state
dicts; ``load_bundle(path)`` rebuilds everything from that folder alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hap.core.errors import HapError
from hap.model.batches import (
    CATEGORICAL_ORDER,
    DENSE_ORDER,
    ITEM_CATEGORICAL,
    N_USER_DENSE,
    REQUEST_CATEGORICAL,
)

if TYPE_CHECKING:
    import pyarrow as pa

BUNDLE_FORMAT = "hap-bundle/1"
N_REQ_CAT, N_ITEM_CAT = len(REQUEST_CATEGORICAL), len(ITEM_CATEGORICAL)
N_ITEM_DENSE = len(DENSE_ORDER) - N_USER_DENSE


def mlp(dims: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def linear_flops(module: nn.Module) -> int:
    """2 * in * out per Linear (multiply-adds counted as 2 FLOPs)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class _TwoTower(nn.Module):
    """Shared parts: one hashed embedding table, a user tower and an item tower."""

    def __init__(self, hash_buckets: int, embed_dim: int, tower_dims: list[int], seq_len: int) -> None:
        super().__init__()
        self.embed_dim, self.seq_len = embed_dim, seq_len
        self.emb = nn.Embedding(hash_buckets, embed_dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.05)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.dim = tower_dims[-1]
        self.user_tower = mlp([N_REQ_CAT * embed_dim + N_USER_DENSE + embed_dim, *tower_dims])
        self.item_tower = mlp([N_ITEM_CAT * embed_dim + N_ITEM_DENSE, *tower_dims])

    def _user_vec(
        self, req_cat: torch.Tensor, req_dense: torch.Tensor, seq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq_emb = self.emb(seq)  # [B, L, E]
        mask = (seq != 0).unsqueeze(-1).to(seq_emb.dtype)
        pooled = (seq_emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = torch.cat([self.emb(req_cat).flatten(1), req_dense, pooled], dim=1)
        return self.user_tower(x), seq_emb, seq != 0

    def item(self, item_cat: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """Item representation ``[..., D]``; depends on item features only (cacheable)."""
        x = torch.cat([self.emb(item_cat).flatten(-2), item_dense], dim=-1)
        return self.item_tower(x)

    def forward(
        self,
        req_cat: torch.Tensor,
        req_dense: torch.Tensor,
        seq: torch.Tensor,
        item_cat: torch.Tensor,
        item_dense: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B, C]`` for ``B`` requests x ``C`` candidates each."""
        return self.head(self.user(req_cat, req_dense, seq), self.item(item_cat, item_dense))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The dense parameters every group's loss flows through (towers, MLP, head): where
        gradient conflict is measured and PCGrad projects. The sparse embedding table is excluded."""
        return [p for n, p in self.named_parameters() if not n.startswith("emb.")]

    def flops(self) -> dict[str, int]:
        """FLOPs of one user-side pass and of one candidate (item tower + head)."""
        user = linear_flops(self.user_tower) + 2 * self.seq_len * self.embed_dim
        return {
            "user": user + self._user_extra_flops(),
            "item": linear_flops(self.item_tower),
            "head": self._head_flops(),
        }

    def _user_extra_flops(self) -> int:
        return 0


class LightweightModel(_TwoTower):
    """``[u + v, u * v]`` -> M-layer MLP -> CTR logit."""

    def __init__(
        self, hash_buckets: int, embed_dim: int, tower_dims: list[int], mlp_dims: list[int], seq_len: int
    ) -> None:
        super().__init__(hash_buckets, embed_dim, tower_dims, seq_len)
        self.mlp = mlp([2 * self.dim, *mlp_dims], final_activation=True)
        self.out = nn.Linear(mlp_dims[-1] if mlp_dims else 2 * self.dim, 1)

    def user(
        self, req_cat: torch.Tensor, req_dense: torch.Tensor, seq: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        u, _, _ = self._user_vec(req_cat, req_dense, seq)
        return {"u": u}

    def head(self, user: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        u = user["u"].unsqueeze(-2) if v.dim() == 3 else user["u"]
        u = u.expand_as(v)
        return self.out(self.mlp(torch.cat([u + v, u * v], dim=-1))).squeeze(-1)

    def _head_flops(self) -> int:
        return linear_flops(self.mlp) + linear_flops(self.out) + 3 * self.dim


class ExpressiveModel(_TwoTower):
    """Wider towers + target attention (candidate over recent clicks) -> N-layer MLP -> CTR logit."""

    def __init__(
        self,
        hash_buckets: int,
        embed_dim: int,
        tower_dims: list[int],
        mlp_dims: list[int],
        seq_len: int,
        heads: int,
        pooling: str = "target",
    ) -> None:
        super().__init__(hash_buckets, embed_dim, tower_dims, seq_len)
        if pooling not in ("target", "mean"):
            raise HapError(f"model.expressive.pooling: unknown {pooling!r} (target | mean)")
        self.pooling = pooling  # "mean": the click sequence averaged, the same for every candidate
        self.heads = max(1, heads)
        if self.dim % self.heads:
            raise HapError(f"model.expressive: tower output {self.dim} not divisible by {self.heads} heads")
        self.q = nn.Linear(self.dim, self.dim)
        self.kv = nn.Linear(embed_dim, 2 * self.dim)  # user side: once per request
        self.mlp = mlp([3 * self.dim, *mlp_dims], final_activation=True)
        self.out = nn.Linear(mlp_dims[-1], 1)

    def user(
        self, req_cat: torch.Tensor, req_dense: torch.Tensor, seq: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        u, seq_emb, mask = self._user_vec(req_cat, req_dense, seq)
        k, v = self.kv(seq_emb).chunk(2, dim=-1)  # [B, L, D] each
        return {"u": u, "k": k, "v": v, "mask": mask}

    def head(self, user: dict[str, torch.Tensor], cand: torch.Tensor) -> torch.Tensor:
        squeeze = cand.dim() == 2  # [N, D] candidates of rows already aligned
        if squeeze:
            cand = cand.unsqueeze(1)
            user = {k: t for k, t in user.items()}
        b, c, d = cand.shape
        h, dh = self.heads, d // self.heads
        q = self.q(cand).view(b, c, h, dh).transpose(1, 2)  # [B, H, C, dh]
        k = user["k"].view(b, -1, h, dh).transpose(1, 2)  # [B, H, L, dh]
        val = user["v"].view(b, -1, h, dh).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # [B, H, C, L]
        if self.pooling == "mean":  # every candidate weighs the clicks alike
            att = torch.zeros_like(att)
        att = att.masked_fill(~user["mask"][:, None, None, :], -1e4).softmax(-1)
        ctx = (att @ val).transpose(1, 2).reshape(b, c, d)  # [B, C, D]
        u = user["u"].unsqueeze(1).expand_as(cand)
        logit = self.out(self.mlp(torch.cat([u + cand, u * cand, ctx], dim=-1))).squeeze(-1)
        return logit.squeeze(1) if squeeze else logit

    def _user_extra_flops(self) -> int:
        return linear_flops(self.kv) * self.seq_len

    def _head_flops(self) -> int:
        attn = 2 * 2 * self.seq_len * self.dim + 5 * self.heads * self.seq_len  # q.k, att.v, softmax
        return linear_flops(self.q) + attn + linear_flops(self.mlp) + linear_flops(self.out) + 3 * self.dim


def build_models(model_cfg: dict[str, Any]) -> tuple[LightweightModel, ExpressiveModel]:
    """Both towers from the ``model`` params section (a plain dict, as stored in bundle.json)."""
    light, expr = model_cfg["light"], model_cfg["expressive"]
    common = dict(
        hash_buckets=model_cfg["hash_buckets"], embed_dim=model_cfg["embed_dim"], seq_len=model_cfg["seq_len"]
    )
    return (
        LightweightModel(tower_dims=light["tower_dims"], mlp_dims=light["mlp_dims"], **common),
        ExpressiveModel(
            tower_dims=expr["tower_dims"],
            mlp_dims=expr["mlp_dims"],
            heads=expr.get("attention_heads", 1),
            pooling=expr.get("pooling", "target"),
            **common,
        ),
    )


# ---- the bundle ------------------------------------------------------------------------------------
@dataclass
class RequestScores:
    """One request's DAMR result, in input order."""

    final: np.ndarray  # the score the final order sorts by (routed ones above the rest)
    light: np.ndarray
    expressive: np.ndarray  # NaN where not routed
    routed: np.ndarray  # bool
    rank: np.ndarray  # 1-based final position


@dataclass(frozen=True)
class ItemCache:
    """Item-tower outputs of a catalogue snapshot, by ``item_id`` (sorted, for a binary search)."""

    ids: np.ndarray  # [N] int64, sorted, unique
    vectors: dict[str, torch.Tensor]  # tower name -> [N, D]

    def lookup(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in ``vectors`` (0 where absent) and whether it is present."""
        pos = np.searchsorted(self.ids, item_ids).clip(max=len(self.ids) - 1)
        hit = self.ids[pos] == item_ids
        return np.where(hit, pos, 0), hit


class HapBundle:
    """Both towers, the feature spec and the routing config: the DAMR scorer, from a folder."""

    def __init__(
        self,
        meta: dict[str, Any],
        light: LightweightModel | None,
        expressive: ExpressiveModel | None,
        device: str = "cpu",
    ) -> None:
        from hap.model.batches import FeatureSpec

        self.meta, self.light, self.expressive = meta, light, expressive
        self.spec = FeatureSpec.from_dict(meta["features"])
        self.routing: dict[str, Any] = dict(meta["routing"])
        self.device = torch.device(device)
        self.item_cache: ItemCache | None = None
        for m in (light, expressive):
            if m is not None:
                m.to(self.device).eval()

    @property
    def serve(self) -> str:
        """``light`` | ``hap`` | ``expressive_all``: which scorer ``score_request`` runs."""
        return self.routing.get("serve", "hap")

    def with_routing(self, **changes: Any) -> HapBundle:
        """The same weights with other routing settings (rho sweeps, serve mode) — no copy of weights."""
        meta = {**self.meta, "routing": {**self.routing, **changes}}
        out = HapBundle.__new__(HapBundle)
        out.meta, out.light, out.expressive, out.spec, out.device = (
            meta,
            self.light,
            self.expressive,
            self.spec,
            self.device,
        )
        out.routing, out.item_cache = meta["routing"], self.item_cache
        return out

    @torch.no_grad()
    def cache_items(self, catalogue: Any) -> HapBundle:
        """The same weights with both item towers precomputed for a catalogue snapshot (rows with
        ``item_id`` and the item features; the last row of an id wins). Serving then skips the
        item side for cached ids. Item features drift (age, CTR, popularity), so rebuild it when
        they refresh: daily here."""
        table = _as_table(catalogue)
        ids = table["item_id"].to_numpy()
        unique_ids, last_from_end = np.unique(ids[::-1], return_index=True)  # sorted ids, last rows
        enc = self._tensors(self.spec.encode_items(table.take(len(ids) - 1 - last_from_end)))
        out = self.with_routing()
        out.item_cache = ItemCache(
            unique_ids,
            {
                name: model.item(enc["item_cat"], enc["item_dense"])
                for name, model in (("light", self.light), ("expressive", self.expressive))
                if model is not None
            },
        )
        return out

    def encode(self, frame: Any) -> dict[str, torch.Tensor]:
        """A pyarrow Table or pandas DataFrame of candidate rows -> model input tensors."""
        return self._tensors(self.spec.encode(_as_table(frame)))

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}

    @torch.no_grad()
    def score_request(self, frame: Any) -> RequestScores:
        """The serving path for one request's candidates: the request side encoded and run once
        (every row of a request carries the same user and context), the item side per candidate,
        light scores for all, the expressive model on the routed ones."""
        from hap.model.routing import damr_order

        table = _as_table(frame)
        user = self._tensors(self.spec.encode_request(table.slice(0, 1)))
        n = table.num_rows
        light = (
            self._scores(self.light, user, self._item_vectors("light", table))
            if self.light is not None
            else None
        )
        expr = np.full(n, np.nan, np.float32)
        if self.serve == "light" or self.expressive is None:
            routed = np.zeros(n, bool)
        elif self.serve == "expressive_all" or light is None:
            routed = np.ones(n, bool)
        else:
            from hap.model.routing import route

            routed = route(light, self.routing)
        if routed.all():
            expr[:] = self._scores(self.expressive, user, self._item_vectors("expressive", table))
        elif routed.any():
            expr[routed] = self._scores(
                self.expressive, user, self._item_vectors("expressive", table, np.nonzero(routed)[0])
            )
        if light is None:
            light = np.where(routed, expr, np.nan).astype(np.float32)
        final, rank = damr_order(light, expr, routed, self.routing.get("merge", "stack"))
        return RequestScores(final, light, expr, routed, rank)

    def _item_vectors(self, tower: str, table: pa.Table, rows: np.ndarray | None = None) -> torch.Tensor:
        """``[n, D]`` item-tower outputs of ``tower`` for ``rows`` of ``table`` (all by default):
        cached ids from the cache, the others (or all, without a cache) through the tower."""
        model = getattr(self, tower)
        cache = self.item_cache
        if cache is None or tower not in cache.vectors:
            enc = self._tensors(self.spec.encode_items(table if rows is None else table.take(rows)))
            return model.item(enc["item_cat"], enc["item_dense"])
        ids = table["item_id"].to_numpy()
        pos, hit = cache.lookup(ids if rows is None else ids[rows])
        out = cache.vectors[tower][torch.from_numpy(pos).to(self.device)]
        if not hit.all():
            miss = np.nonzero(~hit)[0]
            enc = self._tensors(self.spec.encode_items(table.take(miss if rows is None else rows[miss])))
            out[torch.from_numpy(miss).to(self.device)] = model.item(enc["item_cat"], enc["item_dense"])
        return out

    @staticmethod
    def _scores(
        model: nn.Module, user_enc: dict[str, torch.Tensor], item_vectors: torch.Tensor
    ) -> np.ndarray:
        user = model.user(user_enc["req_cat"][:1], user_enc["req_dense"][:1], user_enc["seq"][:1])
        return model.head(user, item_vectors.unsqueeze(0))[0].float().cpu().numpy()  # [1, n, D] -> [n]

    def flops_per_request(self, n: int) -> dict[str, float]:
        from hap.model.routing import flops_per_request

        return flops_per_request(self.light, self.expressive, n, self.routing)


def save_bundle(
    folder: Path, meta: dict[str, Any], light: nn.Module | None, expressive: nn.Module | None
) -> None:
    """Write ``bundle.json`` and the state dicts into ``folder`` (the caller makes it atomic)."""
    folder = Path(folder)
    meta = {
        **meta,
        "format": BUNDLE_FORMAT,
        "has_light": light is not None,
        "has_expressive": expressive is not None,
    }
    if light is not None:
        torch.save({k: v.detach().cpu() for k, v in light.state_dict().items()}, folder / "light.pt")
    if expressive is not None:
        torch.save(
            {k: v.detach().cpu() for k, v in expressive.state_dict().items()}, folder / "expressive.pt"
        )
    (folder / "bundle.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def _as_table(frame: Any) -> pa.Table:
    import pyarrow as pa

    return frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)


def load_bundle(path: Path | str, device: str = "cpu") -> HapBundle:
    """Rebuild the scorer from a bundle folder alone (works in a fresh process)."""
    folder = Path(path)
    meta_file = folder / "bundle.json"
    if not meta_file.exists():
        raise HapError(f"no model bundle at {folder} (bundle.json missing); run `hap train` first")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise HapError(f"{meta_file}: unknown bundle format {meta.get('format')!r}")
    light, expressive = build_models(meta["model"])
    loaded: list[nn.Module | None] = []
    for name, model in (("light", light), ("expressive", expressive)):
        if meta.get(f"has_{name}"):
            model.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
            loaded.append(model)
        else:
            loaded.append(None)
    return HapBundle(meta, loaded[0], loaded[1], device)


__all__ = [
    "LightweightModel",
    "ExpressiveModel",
    "HapBundle",
    "RequestScores",
    "build_models",
    "load_bundle",
    "save_bundle",
    "CATEGORICAL_ORDER",
]
