"""Training input that streams: the training set one shard at a time, never whole in memory.

The split writes one file per unit (a day's request-hash bucket) in each difficulty partition,
and a request never spans units (``hap.data.split``). A shard is the unit's three files: its
requests with every sample they have, so a shard is trained exactly like a small training set
(``TrainData``, the GHCL batch grid of each anchor's own request). Memory follows the bucket size
(``engine.bucket_requests``), not the window.

- **Features**: one scan of the dense columns (no other column) fits the standardization exactly
  (streamed sums) and refuses non-finite values before any step.
- **Order**: epoch ``e`` visits the shards in a permutation seeded by ``(train.seed, e)``, and a
  shard's batches depend only on ``(seed, e, shard)``: the same seed and data give the same model,
  and a run resumed at an epoch boundary sees exactly the batches of an uninterrupted one.
- **DDP**: rank ``r`` of ``w`` trains on shards ``r, r + w, ...`` of the epoch's order and reads no
  other; every rank runs the same number of steps (the fewest any rank has, known from the scan's
  anchor counts), so no collective waits on a rank that ran out. Validation reads every shard on
  every rank, so early stopping decides the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from hap.core import schema
from hap.core.config import Config
from hap.core.errors import HapError
from hap.model.batches import (
    DENSE_ORDER,
    Batch,
    FeatureSpec,
    TrainData,
    _dense_matrix,
    _signed_log,
    column_layout,
    is_validation_request,
    refuse_non_finite,
)

SCAN_COLUMNS = ["dt", "request_id", "source", *DENSE_ORDER]


@dataclass(frozen=True)
class Shard:
    """One unit of the training set: its file in each difficulty partition, and its anchors."""

    name: str
    files: tuple[str, ...]
    train_anchors: int
    val_anchors: int

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(f, columns=columns) for f in self.files]
        return pa.concat_tables(tables, promote_options="none")


def shard_files(path: Path) -> dict[str, tuple[str, ...]]:
    """Shard name -> its files, in difficulty order (``difficulty=*`` folders, ``_*`` files skipped)."""
    out: dict[str, list[str]] = {}
    for f in sorted(Path(path).glob("difficulty=*/*.parquet")):
        if not f.name.startswith(("_", ".")):
            out.setdefault(f.name, []).append(str(f))
    return {name: tuple(files) for name, files in sorted(out.items())}


class _Moments:
    """Streamed mean and standard deviation of the transformed dense features (exact, float64)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq = 0, np.zeros(len(DENSE_ORDER)), np.zeros(len(DENSE_ORDER))

    def add(self, table: pa.Table) -> None:
        dense = _signed_log(_dense_matrix(table))
        self.n += len(dense)
        self.sum += dense.sum(axis=0)
        self.sumsq += (dense * dense).sum(axis=0)

    def spec(self, cfg: Config) -> FeatureSpec:
        mean = self.sum / max(self.n, 1)
        std = np.sqrt(np.maximum(self.sumsq / max(self.n, 1) - mean * mean, 0.0))
        return FeatureSpec(
            cfg.model.hash_buckets,
            cfg.model.seq_len,
            [float(v) for v in mean],
            [float(v) if v > 1e-6 else 1.0 for v in std],
        )


def _anchor_counts(cfg: Config, table: pa.Table) -> tuple[int, int]:
    """(train, validation) anchors of a shard: its positives, split by their request's hash."""
    positives = table.filter(pc.equal(table["source"], schema.Source.EXPOSE_POS.value))
    val = is_validation_request(cfg, positives["request_id"].to_numpy())
    return int((~val).sum()), int(val.sum())


class StreamingTrainData:
    """The training set at ``path`` as a stream of shards (see the module docstring)."""

    rank_local = True  # each DDP rank's batches are its own: the trainer does not slice them

    def __init__(
        self, cfg: Config, path: Path, rank: int = 0, world: int = 1, spec: FeatureSpec | None = None
    ) -> None:
        files = shard_files(path)
        if not files:
            raise HapError(f"no training set at {path}; run `hap split` first")
        self.cfg, self.rank, self.world = cfg, rank, world
        moments, shards = _Moments(), []
        for name, paths in files.items():
            table = Shard(name, paths, 0, 0).read(SCAN_COLUMNS)
            refuse_non_finite(table, where=f"{Path(path)} ({name})")
            moments.add(table)
            shards.append(Shard(name, paths, *_anchor_counts(cfg, table)))
        self.shards = shards
        self.spec = spec or moments.spec(cfg)
        self.col_group = column_layout(cfg.train.group_proportions)
        self.n_train_anchors = sum(s.train_anchors for s in shards)
        self.n_val_anchors = sum(s.val_anchors for s in shards)
        if self.n_train_anchors == 0 or self.n_val_anchors == 0:
            raise HapError(
                f"train/val split left an empty side ({self.n_train_anchors} train, "
                f"{self.n_val_anchors} val anchors); adjust train.val_fraction"
            )

    @property
    def columns(self) -> int:
        return int(self.col_group.numel())

    def load(self, index: int) -> TrainData:
        """One shard in memory, salted by its index so shards draw different negatives."""
        return TrainData(self.cfg, self.shards[index].read(), self.spec, salt=index + 1, require_both=False)

    def item_cat_chunks(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.shards)):
            yield self.load(i).item_cat

    def epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=gen).tolist()

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches each rank trains on in ``epoch``: the fewest any rank's shards give."""
        bs, order = self.cfg.train.batch_requests, self.epoch_order(epoch)
        per_rank = [
            sum(math.ceil(self.shards[i].train_anchors / bs) for i in order[r :: self.world])
            for r in range(self.world)
        ]
        return min(per_rank)

    def batches(self, epoch: int, split: str = "train", batch_size: int | None = None) -> EpochBatches:
        return EpochBatches(self, epoch, split, batch_size)


@dataclass
class EpochBatches:
    """An epoch's batches, streamed shard by shard each time it is iterated."""

    data: StreamingTrainData
    epoch: int
    split: str
    batch_size: int | None = None

    def __iter__(self) -> Iterator[Batch]:
        d = self.data
        if self.split != "train":  # validation: every shard, on every rank, in file order
            for i, shard in enumerate(d.shards):
                if shard.val_anchors:
                    yield from d.load(i).batches(self.epoch, self.split, self.batch_size)
            return
        left = d.steps_per_epoch(self.epoch)
        for i in d.epoch_order(self.epoch)[d.rank :: d.world]:
            if left <= 0:
                return
            if not d.shards[i].train_anchors:
                continue
            for batch in d.load(i).batches(self.epoch, "train", self.batch_size):
                if left <= 0:
                    return
                left -= 1
                yield batch
