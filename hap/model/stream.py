"""Training input that streams: the training set one shard at a time, never whole in memory.

The split writes one file per unit (a day's request-hash bucket) in each difficulty partition,
and a request never spans units (``hap.data.split``). A shard is the unit's three files: its
requests with every sample they have, so a shard is trained exactly like a small training set
(``TrainData``, the GHCL batch grid of each anchor's own request). Memory follows the bucket size
(``engine.bucket_requests``) and the batch size, not the window: one shard's train (or validation)
requests are in memory at a time, and their batches are built one at a time.

- **Features**: one scan of the dense columns (no other column) fits the standardization exactly
  (streamed sums) and refuses non-finite values before any step.
- **Train / validation**: a request is validation by its salted hash (``is_validation_request``,
  ``train.val_fraction``), the same rule in every shard; a train load holds only train requests, a
  validation load only validation requests.
- **Order**: epoch ``e`` visits the shards in a permutation seeded by ``(train.seed, e)``, and a
  shard's batches depend only on ``(seed, e, shard)``: the same seed and data give the same model,
  and a run resumed at an epoch boundary sees exactly the batches of an uninterrupted one.
- **DDP**: each epoch the shards are dealt to the ranks disjointly, balanced by their batch counts
  (largest first, to the least loaded rank; ties by the epoch's permutation), and rank ``r`` reads
  only its own. Every rank runs the same number of steps (the fewest any rank has, known from the
  scan's anchor counts), so no collective waits on a rank that ran out. Validation reads every
  shard on every rank, so early stopping decides the same everywhere.
  ``train.batch_requests`` is the global batch, as in a single process: each of ``W`` ranks trains on
  ``ceil(batch_requests / W)`` anchors a step, so DDP's averaged gradient covers a batch of the
  configured size and an epoch has as many optimizer (and weight-averaging) steps as on one process.
  (A full batch per rank doubled the batch and halved the steps at 2 ranks: after the same 3 epochs
  the tiny test world's model fell 0.040-0.073 gt_recall@50 below the single-process one, whose seed
  sd is 0.006; with the shared batch the two agree to 0.001, ``tests/model/test_ddp.py``.)
- **Prefetch**: ``ShardStream`` is a ``torch.utils.data.IterableDataset``; with
  ``train.loader_workers > 0`` a ``DataLoader`` builds the batches in worker processes (worker
  ``k`` of ``n`` takes every ``n``-th of the rank's shards). The batch order depends on
  ``(seed, epoch, world size, loader_workers)``; 0 and 1 worker give the same batches.
- **Cache**: loaded in-process, a shard stays encoded for the next epochs within
  ``train.shard_cache_mb`` (least recently used out first), so a window that fits is read and
  encoded once per run, not once per epoch; a larger one streams as before.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing.context
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hap.core import schema
from hap.core.config import Config
from hap.core.errors import HapError
from hap.model.batches import (
    DENSE_ORDER,
    ITEM_CATEGORICAL,
    Batch,
    FeatureSpec,
    TrainData,
    _dense_matrix,
    _signed_log,
    column_layout,
    is_validation_request,
    refuse_non_finite,
)
from hap.model.cross import CrossFeatures, profile_folder
from hap.model.distill import FullflowData

SCAN_COLUMNS = ["dt", "request_id", "source", *DENSE_ORDER]
ITEM_COLUMNS = [*ITEM_CATEGORICAL, *schema.ITEM_DENSE]  # what ``FeatureSpec.encode_items`` reads


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
        self._cache: OrderedDict[tuple[int, str], TrainData] = OrderedDict()
        # this rank's share of the global training batch (module docstring, DDP)
        self.batch_requests = max(1, math.ceil(cfg.train.batch_requests / world))
        moments, shards = _Moments(), []
        for name, paths in files.items():
            table = Shard(name, paths, 0, 0).read(SCAN_COLUMNS)
            refuse_non_finite(table, where=f"{Path(path)} ({name})")
            moments.add(table)
            shards.append(Shard(name, paths, *_anchor_counts(cfg, table)))
        self.shards = shards
        self.spec = spec or moments.spec(cfg)
        if spec is None:
            self.spec.cross = CrossFeatures.load(cfg.model.cross_features, profile_folder(path))
        self.col_group = column_layout(cfg.train.group_proportions)
        self.fullflow = FullflowData.load(cfg, Path(path).parent / "fullflow", self.spec)
        self.n_train_anchors = sum(s.train_anchors for s in shards)
        self.n_val_anchors = sum(s.val_anchors for s in shards)
        if self.n_train_anchors == 0 or self.n_val_anchors == 0:
            raise HapError(
                f"train/val split left an empty side ({self.n_train_anchors} train, "
                f"{self.n_val_anchors} val anchors); adjust train.val_fraction"
            )
        trainable = sum(1 for s in shards if s.train_anchors)
        if trainable < world:
            raise HapError(
                f"the training set at {path} has {trainable} shard(s) with training requests for "
                f"{world} DDP ranks: a rank would have nothing to train on; use fewer ranks or a "
                "smaller engine.bucket_requests"
            )

    @property
    def columns(self) -> int:
        return int(self.col_group.numel())

    def __getstate__(self) -> dict:
        """What a loader worker needs to build batches: not the encoded-shard cache (each process
        keeps its own) nor the full-flow set (the training process draws from it)."""
        return {**self.__dict__, "_cache": OrderedDict(), "fullflow": None}

    def load(self, index: int, split: str = "train") -> TrainData:
        """One shard's ``split`` requests in memory, salted by the shard's index so shards draw
        different negatives (a request's negatives are its own rows: none is lost by the filter).
        Kept encoded for the next epoch while ``train.shard_cache_mb`` allows (least recently
        used out first): a shard's batches depend on the epoch alone, never on the load."""
        key = (index, split)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = self._read(index, split)
        budget = self.cfg.train.shard_cache_mb * 2**20
        if data.nbytes <= budget:
            self._cache[key] = data
            while sum(d.nbytes for d in self._cache.values()) > budget:
                self._cache.popitem(last=False)
        return data

    def _read(self, index: int, split: str) -> TrainData:
        table = self.shards[index].read()
        is_val = is_validation_request(self.cfg, table["request_id"].to_numpy())
        table = table.filter(pa.array(is_val if split == "val" else ~is_val))
        return TrainData(self.cfg, table, self.spec, salt=index + 1, require_both=False)

    def item_cat_chunks(self) -> Iterator[torch.Tensor]:
        """Every row's encoded item columns (the behaviour lookup's input), one shard at a time."""
        for shard in self.shards:
            items = self.spec.encode_items(shard.read(ITEM_COLUMNS))
            yield torch.from_numpy(items["item_cat"])

    def epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=gen).tolist()

    def shard_batches(self, index: int, batch_size: int | None = None) -> int:
        """Training batches of one shard (the load every rank must match)."""
        return math.ceil(self.shards[index].train_anchors / (batch_size or self.batch_requests))

    def assignment(self, epoch: int, batch_size: int | None = None) -> list[list[int]]:
        """Each rank's shards in ``epoch``, in visit order: disjoint, together every shard with
        training requests, balanced by batches (largest first to the least loaded rank)."""
        position = {shard: k for k, shard in enumerate(self.epoch_order(epoch))}
        weight = {i: self.shard_batches(i, batch_size) for i in position}
        ranks: list[list[int]] = [[] for _ in range(self.world)]
        load = [0] * self.world
        for i in sorted(position, key=lambda i: (-weight[i], position[i])):
            if self.shards[i].train_anchors:
                r = min(range(self.world), key=lambda r: (load[r], r))
                ranks[r].append(i)
                load[r] += weight[i]
        return [sorted(shards, key=position.__getitem__) for shards in ranks]

    def steps_per_epoch(self, epoch: int, batch_size: int | None = None) -> int:
        """Batches each rank trains on in ``epoch``: the fewest any rank's shards give."""
        ranks = self.assignment(epoch, batch_size)
        return min(sum(self.shard_batches(i, batch_size) for i in shards) for shards in ranks)

    def batches(self, epoch: int, split: str = "train", batch_size: int | None = None) -> EpochBatches:
        return EpochBatches(self, epoch, split, batch_size)


class ShardStream(IterableDataset):
    """Every ``split`` batch of the given shards, one shard in memory at a time; inside a
    ``DataLoader`` worker, only every ``n``-th shard (worker ``k`` of ``n`` starts at ``k``)."""

    def __init__(
        self, data: StreamingTrainData, shards: list[int], epoch: int, split: str, batch_size: int | None
    ) -> None:
        super().__init__()
        self.data, self.shards, self.split = data, shards, split
        self.epoch, self.batch_size = epoch, batch_size

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for i in shards:
            yield from self.data.load(i, self.split).iter_batches(self.epoch, self.split, self.batch_size)


@dataclass
class EpochBatches:
    """An epoch's batches for this rank, streamed shard by shard each time it is iterated: the
    rank's training shards cut to the epoch's common step count, or every validation shard."""

    data: StreamingTrainData
    epoch: int
    split: str
    batch_size: int | None = None

    def __iter__(self) -> Iterator[Batch]:
        d = self.data
        batch_size = self.batch_size
        if self.split == "train":
            batch_size = batch_size or d.batch_requests  # the rank's share of the global batch
            shards = d.assignment(self.epoch, batch_size)[d.rank]
            steps = d.steps_per_epoch(self.epoch, batch_size)
        else:
            shards, steps = [i for i, s in enumerate(d.shards) if s.val_anchors], None
        stream = ShardStream(d, shards, self.epoch, self.split, batch_size)
        yield from itertools.islice(self._prefetched(stream), steps)

    def _prefetched(self, stream: ShardStream) -> Iterator[Batch]:
        workers = self.data.cfg.train.loader_workers
        if workers == 0:
            return iter(stream)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=_worker_context(),
            worker_init_fn=_share_through_files,
        )
        return iter(loader)


@functools.cache
def _worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a fork server that has imported this module and nothing else,
    not from the training process: a fork of that process copies its threads' locks, signal
    handlers and at-fork hooks (Prefect's, MLflow's, Arrow's pools), and under load such a worker
    died at random with exit code 1 and no message."""
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _share_through_files(worker_id: int) -> None:
    """A worker hands its batches back through shared-memory files, not file descriptors passed
    over a socket per tensor: under load, a worker that had sent its last batch and exited left
    the main process unable to fetch that batch's descriptors."""
    torch.multiprocessing.set_sharing_strategy("file_system")
