"""A training table as tensors, and its stratified request-grouped batches.

Why this shape: GHCL contrasts each positive against *its own request's* negatives, group by
group. So the unit of a batch is an **anchor** (one clicked item of one request) and every anchor
carries exactly ``train.group_proportions[g]`` negative slots per group ``g`` drawn from its own
request (conflict-sensitive sampling: every batch holds every group in fixed proportions).
A batch is therefore a dense ``[B, C]`` candidate grid, ``C = 1 + sum(K_g)``; column 0 is the
positive, then the groups' slots in ``schema.GROUPS`` order. A slot is invalid (masked) when the
request has fewer negatives of that group than slots. Sampling is vectorized over anchors (CSR
offsets per group, a random cyclic window per anchor): no per-row Python in the loop.

Features: categorical ids are re-hashed into one shared table of ``model.hash_buckets`` rows (the
feature index salts the hash, the click sequence shares ``i_id``'s rows, 0 stays padding); dense
features are ``sign(x)·log1p(|x|)`` then standardized with statistics fitted on the training set and
saved in the bundle (``FeatureSpec.to_dict``), so serving encodes exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hap.core import hashing, schema
from hap.core.config import Config
from hap.core.errors import HapError, NonFiniteData
from hap.model.cross import CrossFeatures, profile_folder, sequence_matrix

REQUEST_CATEGORICAL: tuple[str, ...] = (*schema.USER_CATEGORICAL, *schema.CONTEXT_CATEGORICAL)
ITEM_CATEGORICAL: tuple[str, ...] = schema.ITEM_CATEGORICAL
CATEGORICAL_ORDER: tuple[str, ...] = (*REQUEST_CATEGORICAL, *ITEM_CATEGORICAL)
SEQ_FEATURE_SLOT = CATEGORICAL_ORDER.index("i_id")  # the click sequence shares i_id's hash salt
DENSE_ORDER: tuple[str, ...] = (*schema.USER_DENSE, *schema.ITEM_DENSE)
N_USER_DENSE = len(schema.USER_DENSE)
GROUPS: tuple[str, ...] = schema.GROUPS
HARD_GROUP_IDS: tuple[int, ...] = tuple(GROUPS.index(g) for g in schema.HARD_SOURCES)
EASY_GROUP_IDS: tuple[int, ...] = tuple(GROUPS.index(g) for g in schema.EASY_SOURCES)


# ---- feature encoding (shared by training and serving) -------------------------------------------
def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class FeatureSpec:
    """How raw feature columns become model inputs. Saved in ``bundle.json``."""

    hash_buckets: int
    seq_len: int
    dense_mean: list[float] = field(default_factory=lambda: [0.0] * len(DENSE_ORDER))
    dense_std: list[float] = field(default_factory=lambda: [1.0] * len(DENSE_ORDER))
    cross: CrossFeatures = field(default_factory=lambda: CrossFeatures(()))  # user x item (hap.model.cross)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hash_buckets": self.hash_buckets,
            "seq_len": self.seq_len,
            "dense_mean": self.dense_mean,
            "dense_std": self.dense_std,
            "categorical": list(CATEGORICAL_ORDER),
            "dense": list(DENSE_ORDER),
            "sequence": schema.USER_SEQUENCE,
            "dense_transform": "standardize(sign(x)*log1p(|x|))",
            "cross": list(self.cross.names),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(int(d["hash_buckets"]), int(d["seq_len"]), list(d["dense_mean"]), list(d["dense_std"]))

    def fit(self, table: pa.Table) -> FeatureSpec:
        dense = _signed_log(_dense_matrix(table))
        std = dense.std(axis=0)
        self.dense_mean = [float(v) for v in dense.mean(axis=0)]
        self.dense_std = [float(v) if v > 1e-6 else 1.0 for v in std]
        return self

    # -- encoders ---------------------------------------------------------------------------------
    def rehash(self, ids: np.ndarray, slot: np.ndarray | int) -> np.ndarray:
        """Raw hashed ids -> rows of the shared table; 0 (padding) stays 0."""
        x = np.asarray(ids).astype(np.uint64)
        out = hashing.bucket(x, np.asarray(slot), 1, self.hash_buckets)
        return np.where(x == 0, 0, out)

    def encode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """``{req_cat [N,10], req_dense [N,2], seq [N,L], item_cat [N,8], item_dense [N,8],
        cross [N,F]}`` (numpy)."""
        return {**self.encode_request(table), **self.encode_items(table), "cross": self.encode_cross(table)}

    def encode_cross(
        self, table: pa.Table, requests: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """The user x item cross features of each row ``[N, F]`` (``F = 0`` without any);
        ``requests``: each row's request and the requests' ``clicks`` (``CrossFeatures.encode``)."""
        return self.cross.encode(table, self.seq_len, requests)

    def clicks(self, table: pa.Table) -> np.ndarray:
        """The rows' raw click sequences ``[N, seq_len]``, which the request side and the cross
        features both read: a caller of both reads them once."""
        return sequence_matrix(table[schema.USER_SEQUENCE], self.seq_len)

    def encode_request(self, table: pa.Table, clicks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The user and context side of each row: ``req_cat``, ``req_dense``, ``seq`` (``clicks``:
        the rows' ``self.clicks``, read here when not given). The ids and the clicks are re-hashed
        in one pass."""
        cat = np.stack([table[c].to_numpy(zero_copy_only=False) for c in REQUEST_CATEGORICAL], axis=1)
        clicks = self.clicks(table) if clicks is None else clicks
        slots = np.array([*range(len(REQUEST_CATEGORICAL)), *[SEQ_FEATURE_SLOT] * clicks.shape[1]])
        ids = self.rehash(np.concatenate([cat.astype(np.int64), clicks], axis=1), slots[None, :])
        dense = _dense_matrix(table, schema.USER_DENSE)
        return {  # each its own contiguous array: tensors of them are shared between processes
            "req_cat": np.ascontiguousarray(ids[:, : len(REQUEST_CATEGORICAL)]),
            "req_dense": self._standardize(dense, slice(0, N_USER_DENSE)),
            "seq": np.ascontiguousarray(ids[:, len(REQUEST_CATEGORICAL) :]),
        }

    def encode_items(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The candidate side of each row: ``item_cat``, ``item_dense``."""
        n_req = len(REQUEST_CATEGORICAL)
        cat = np.stack([table[c].to_numpy(zero_copy_only=False) for c in ITEM_CATEGORICAL], axis=1)
        dense = _dense_matrix(table, schema.ITEM_DENSE)
        return {
            "item_cat": self.rehash(cat, np.arange(n_req, len(CATEGORICAL_ORDER))[None, :]),
            "item_dense": self._standardize(dense, slice(N_USER_DENSE, len(DENSE_ORDER))),
        }

    def _standardize(self, dense: np.ndarray, columns: slice) -> np.ndarray:
        """``(sign(x) log1p|x| - mean) / std`` as float32, computed in float64 in one buffer (the
        same numbers as ``_signed_log``: a scoring call standardizes every candidate's features)."""
        mean, std = np.asarray(self.dense_mean)[columns], np.asarray(self.dense_std)[columns]
        out = np.abs(dense)
        np.log1p(out, out=out)
        np.copysign(out, dense, out=out)
        out -= mean
        out /= std
        return out.astype(np.float32)


def _dense_matrix(table: pa.Table, columns: tuple[str, ...] = DENSE_ORDER) -> np.ndarray:
    return np.stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in columns], axis=1)


# ---- the training tensors -------------------------------------------------------------------------
@dataclass
class Batch:
    """One stratified batch: ``B`` anchors x ``C`` candidate slots (column 0 = the positive)."""

    req_cat: torch.Tensor  # [B, 10]
    req_dense: torch.Tensor  # [B, 2]
    seq: torch.Tensor  # [B, L]
    item_cat: torch.Tensor  # [B, C, 8]
    item_dense: torch.Tensor  # [B, C, 8]
    valid: torch.Tensor  # [B, C] bool
    col_group: torch.Tensor  # [C] long: -1 for the positive, else index into GROUPS
    cross: torch.Tensor | None = None  # [B, C, F] user x item cross features (None: the model has none)
    fullflow: Any = None  # the step's full-flow requests (hap.model.distill.FullflowBatch), or None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                None if getattr(self, f) is None else getattr(self, f).to(device, non_blocking=True)
                for f in self.__dataclass_fields__
            )
        )

    def columns(self, keep: torch.Tensor) -> Batch:
        """Keep only the candidate columns where ``keep`` ([C] bool) is true (the hard-only view)."""
        idx = keep.nonzero().squeeze(1)
        return Batch(
            self.req_cat,
            self.req_dense,
            self.seq,
            self.item_cat[:, idx],
            self.item_dense[:, idx],
            self.valid[:, idx],
            self.col_group[idx],
            None if self.cross is None else self.cross[:, idx],
        )

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's anchors (DDP): every rank sees the same global batch and takes a slice."""
        sl = slice(rank, None, world)
        return Batch(
            self.req_cat[sl],
            self.req_dense[sl],
            self.seq[sl],
            self.item_cat[sl],
            self.item_dense[sl],
            self.valid[sl],
            self.col_group,
            None if self.cross is None else self.cross[sl],
        )

    @property
    def size(self) -> int:
        return int(self.req_cat.shape[0])


def column_layout(proportions: dict[str, int]) -> torch.Tensor:
    """``col_group`` of the candidate grid: -1 then ``K_g`` copies of each group index."""
    unknown = set(proportions) - set(GROUPS)
    if unknown:
        raise HapError(f"train.group_proportions: unknown group(s) {sorted(unknown)}; known: {list(GROUPS)}")
    cols = [-1]
    for gi, g in enumerate(GROUPS):
        cols += [gi] * int(proportions.get(g, 0))
    return torch.tensor(cols, dtype=torch.long)


def refuse_non_finite(table: pa.Table, where: str = "the training set") -> None:
    """Raise ``NonFiniteData`` naming the feature, the day and example requests when any dense
    feature holds NaN or infinity: one such value turns every loss and score into NaN."""
    for name in schema.DENSE_FEATURES:
        if name not in table.column_names:
            continue
        values = table[name].combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        days = table["dt"].to_numpy(zero_copy_only=False)[bad] if "dt" in table.column_names else []
        day = str(min(days)) if len(days) else ""
        examples = (
            table["request_id"].to_numpy()[bad][:5].tolist() if "request_id" in table.column_names else []
        )
        raise NonFiniteData(
            f"train: {where} has {int(bad.sum())} non-finite value(s) of the dense feature {name} "
            f"(day {day or 'unknown'}, e.g. request_id {examples}); no model is trained on it",
            date=day,
            step="train",
            check=f"finite:{name}",
            file=where,
            examples=examples,
        )


def is_validation_request(cfg: Config, request_ids: np.ndarray) -> np.ndarray:
    """Which requests are held out for validation: a salted hash, the same in every shard."""
    return hashing.unit_hash(request_ids, 0, cfg.train.seed + 0xA11) < cfg.train.val_fraction


class TrainData:
    """A training table in memory as tensors, split by request into train and validation: the
    whole training set (``load``), or one shard of it (``hap.model.stream``, ``salt`` = the shard's
    index, so shards draw different negatives; ``require_both=False`` lets a small shard hold no
    validation request)."""

    rank_local = False  # every DDP rank builds the same global batch and trains on its slice
    fullflow = None  # no full-flow supervision in memory (hap.model.distill; the streamed set loads it)

    def __init__(
        self,
        cfg: Config,
        table: pa.Table,
        spec: FeatureSpec | None = None,
        salt: int = 0,
        require_both: bool = True,
    ) -> None:

        if table.num_rows == 0:
            raise HapError("the training set is empty")
        refuse_non_finite(table)
        self.cfg = cfg
        if spec is None:
            spec = FeatureSpec(cfg.model.hash_buckets, cfg.model.seq_len).fit(table)
            spec.cross = CrossFeatures.from_table(cfg.model.cross_features, table)
        self.spec = spec
        self.col_group = column_layout(cfg.train.group_proportions)
        rid = table["request_id"].to_numpy()
        # one dense request index, rows grouped by request (stable: keeps the file order inside a request)
        uniq, req_index = np.unique(rid, return_inverse=True)
        first = np.full(len(uniq), -1, dtype=np.int64)
        first[req_index[::-1]] = np.arange(len(rid))[::-1]
        # the request side (user, context, clicks) once per request, from its first row, as serving
        # encodes it: every row of a request carries the same, and the clicks are most of the bytes
        requests = table.take(first)
        clicks = self.spec.clicks(requests)
        request = self.spec.encode_request(requests, clicks)
        items = self.spec.encode_items(table)
        self.req_cat = torch.from_numpy(request["req_cat"])
        self.req_dense = torch.from_numpy(request["req_dense"])
        self.seq = torch.from_numpy(request["seq"])
        self.item_cat = torch.from_numpy(items["item_cat"])
        self.item_dense = torch.from_numpy(items["item_dense"])
        cross = self.spec.encode_cross(table, (req_index, clicks))
        self.cross = torch.from_numpy(cross) if self.spec.cross.width else None
        source = table["source"].to_numpy(zero_copy_only=False)
        # per group: rows in a fixed shuffled order inside each request, as CSR offsets by request
        self.salt = salt
        rng = np.random.default_rng([cfg.train.seed, salt] if salt else cfg.train.seed)
        shuffle = rng.permutation(len(rid))
        self.group_rows, self.group_start, self.group_count = [], [], []
        for g in GROUPS:
            rows = shuffle[source[shuffle] == g]
            rows = rows[np.argsort(req_index[rows], kind="stable")]
            counts = np.bincount(req_index[rows], minlength=len(uniq))
            self.group_rows.append(torch.from_numpy(rows))
            self.group_start.append(torch.from_numpy(np.cumsum(counts) - counts))
            self.group_count.append(torch.from_numpy(counts))
        pos_rows = np.nonzero(source == schema.Source.EXPOSE_POS.value)[0]
        if pos_rows.size == 0:
            raise HapError("the training set has no positives (expose_pos)")
        is_val = is_validation_request(cfg, uniq)
        anchor_req = req_index[pos_rows]
        val_mask = is_val[anchor_req]
        self.train_anchors = torch.from_numpy(pos_rows[~val_mask])
        self.val_anchors = torch.from_numpy(pos_rows[val_mask])
        self.row_req = torch.from_numpy(req_index)
        self.n_requests = len(uniq)
        if require_both and (len(self.train_anchors) == 0 or len(self.val_anchors) == 0):
            raise HapError(
                f"train/val split left an empty side ({len(self.train_anchors)} train, "
                f"{len(self.val_anchors)} val anchors); adjust train.val_fraction"
            )

    @classmethod
    def load(cls, cfg: Config, path: Path, spec: FeatureSpec | None = None) -> TrainData:
        from hap.data.split import open_training_set

        if not Path(path).exists():
            raise HapError(f"no training set at {path}; run `hap split` first")
        table = open_training_set(Path(path)).to_table()
        if spec is None:
            spec = FeatureSpec(cfg.model.hash_buckets, cfg.model.seq_len).fit(table)
            spec.cross = CrossFeatures.load(cfg.model.cross_features, profile_folder(Path(path)))
        return cls(cfg, table, spec)

    @property
    def columns(self) -> int:
        return int(self.col_group.numel())

    @property
    def n_train_anchors(self) -> int:
        return len(self.train_anchors)

    @property
    def nbytes(self) -> int:
        """The memory its tensors hold."""
        tensors = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        tensors += [t for group in (self.group_rows, self.group_start, self.group_count) for t in group]
        return sum(t.numel() * t.element_size() for t in tensors)

    def item_cat_chunks(self) -> list[torch.Tensor]:
        """Every row's encoded item columns (the behaviour lookup's input), in one chunk."""
        return [self.item_cat]

    def make_batch(self, anchors: torch.Tensor, generator: torch.Generator) -> Batch:
        """Gather the grid for these anchor rows; negatives come from each anchor's own request."""
        req = self.row_req[anchors]
        rows, valid = [anchors[:, None]], [torch.ones(len(anchors), 1, dtype=torch.bool)]
        for gi in range(len(GROUPS)):
            k = int((self.col_group == gi).sum())
            if k == 0:
                continue
            start, count = self.group_start[gi][req], self.group_count[gi][req]
            offset = (torch.rand(len(anchors), generator=generator) * count.clamp(min=1)).long()
            slot = torch.arange(k)[None, :]
            pos = start[:, None] + (offset[:, None] + slot) % count.clamp(min=1)[:, None]
            ok = slot < count[:, None]
            src = self.group_rows[gi]
            picked = src[pos.clamp(max=max(len(src) - 1, 0))] if len(src) else torch.zeros_like(pos)
            rows.append(torch.where(ok, picked, anchors[:, None]))
            valid.append(ok)
        rows_t, valid_t = torch.cat(rows, 1), torch.cat(valid, 1)
        return Batch(
            self.req_cat[req],
            self.req_dense[req],
            self.seq[req],
            self.item_cat[rows_t],
            self.item_dense[rows_t],
            valid_t,
            self.col_group,
            None if self.cross is None else self.cross[rows_t],
        )

    def batches(self, epoch: int, split: str = "train", batch_size: int | None = None) -> list[Batch]:
        """The epoch's batches as a list (benchmarks reuse them); see ``iter_batches``."""
        return list(self.iter_batches(epoch, split, batch_size))

    def iter_batches(
        self, epoch: int, split: str = "train", batch_size: int | None = None
    ) -> Iterator[Batch]:
        """The epoch's batches, built one at a time; the order and the negatives depend only on
        (seed, epoch, salt), so a resumed run and a DDP run see exactly the batches of a
        single-process run."""
        anchors = self.train_anchors if split == "train" else self.val_anchors
        gen = torch.Generator().manual_seed(
            self.cfg.train.seed * 1_000_003 + (epoch if split == "train" else -1) + self.salt * 7_919
        )
        if split == "train":
            anchors = anchors[torch.randperm(len(anchors), generator=gen)]
        bs = batch_size or self.cfg.train.batch_requests
        for i in range(0, len(anchors), bs):
            yield self.make_batch(anchors[i : i + bs], gen)
