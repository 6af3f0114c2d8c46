"""Training input that streams: shard by shard, sharded across DDP ranks, deterministic, resumable."""

from __future__ import annotations

import datetime as dt
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TOWERS, tiny_config

from hap.core import layout
from hap.core.config import Config
from hap.core.errors import HapError
from hap.data import markers
from hap.model import stream
from hap.model.batches import TrainData, is_validation_request

DATE = dt.date(2026, 11, 2)
SMALL = {
    "engine.bucket_requests": 40,  # ~6 buckets a day: a dozen shards in the two-day window
    "model.hash_buckets": 2048,
    **TINY_TOWERS,
    "train.epochs": 2,
    "train.batch_requests": 16,
    "train.patience": 5,
    "train.diagnostics_every": 0,
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Three simulated days ingested in request-hash buckets, split over the window ending DATE."""
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    home = tmp_path_factory.mktemp("stream") / "data"
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in SMALL.items()})
    for day, _ in simulate_days(cfg, cfg.simulate.start, 3, progress=False):
        ingest_day(cfg, day, require_validated=False)
        markers.mark_validated(cfg, day, {"by": "test_stream"})
    build_training_set(cfg, DATE)
    return cfg


def _path(cfg: Config) -> Path:
    return layout.training_set(cfg, DATE)


def test_shards_are_the_split_units_and_the_features_fit_exactly(sharded: Config) -> None:
    data = stream.StreamingTrainData(sharded, _path(sharded))
    units = {p.name for p in _path(sharded).glob("difficulty=*/*.parquet")}
    assert len(data.shards) == len(units) >= 8
    whole = TrainData.load(sharded, _path(sharded))
    assert data.n_train_anchors == len(whole.train_anchors)
    assert data.n_val_anchors == len(whole.val_anchors)
    np.testing.assert_allclose(data.spec.dense_mean, whole.spec.dense_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(data.spec.dense_std, whole.spec.dense_std, rtol=1e-7)
    chunks = torch.cat(list(data.item_cat_chunks()))  # the behaviour lookup sees every row once
    assert len(chunks) == len(whole.item_cat)
    assert torch.equal(torch.unique(chunks, dim=0), torch.unique(whole.item_cat, dim=0))
    # no request spans two shards
    seen: dict[int, str] = {}
    for shard in data.shards:
        for rid in np.unique(shard.read(["request_id"])["request_id"].to_numpy()):
            assert seen.setdefault(int(rid), shard.name) == shard.name


def test_only_one_shard_is_in_memory_at_a_time(sharded: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    data = stream.StreamingTrainData(sharded, _path(sharded))
    held: list[int] = []
    real = stream.Shard.read

    def tracked(self, columns=None):
        table = real(self, columns)
        if columns is None:  # a full shard load (the scan reads dense columns only)
            held.append(table.num_rows)
        return table

    monkeypatch.setattr(stream.Shard, "read", tracked)
    n = sum(1 for _ in data.batches(0, "train"))
    total = sum(p.stat().st_size for p in _path(sharded).glob("difficulty=*/*.parquet"))
    assert n == data.steps_per_epoch(0) > 0
    assert held and max(held) * 4 < sum(held)  # each load is a small part of the window...
    assert len(held) <= len(data.shards)  # ...and each shard is loaded once an epoch
    assert total > 0


def _flat(batches) -> list[torch.Tensor]:
    return [torch.cat([b.item_cat.flatten(), b.req_cat.flatten()]) for b in batches]


def test_epochs_are_deterministic_reiterable_and_differ(sharded: Config) -> None:
    data = stream.StreamingTrainData(sharded, _path(sharded))
    first, again = _flat(data.batches(0, "train")), _flat(data.batches(0, "train"))
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    other = stream.StreamingTrainData(sharded, _path(sharded))  # a fresh process's view: same batches
    assert all(torch.equal(a, b) for a, b in zip(first, _flat(other.batches(0, "train"))))
    assert data.epoch_order(0) != data.epoch_order(1)
    val = data.batches(0, "val")
    assert sum(b.size for b in val) == data.n_val_anchors == sum(b.size for b in val)


def test_ddp_ranks_read_disjoint_shards_and_run_the_same_steps(
    sharded: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: dict[int, set[int]] = {}
    steps = {}
    for rank in (0, 1):
        data = stream.StreamingTrainData(sharded, _path(sharded), rank=rank, world=2)
        real = data.load
        loaded[rank] = set()

        def record(index: int, split: str = "train", rank=rank, real=real) -> TrainData:
            loaded[rank].add(index)
            return real(index, split)

        monkeypatch.setattr(data, "load", record)
        steps[rank] = sum(1 for _ in data.batches(1, "train"))
        assert loaded[rank] <= set(data.assignment(1)[rank])
    assert not loaded[0] & loaded[1]
    assert steps[0] == steps[1] == data.steps_per_epoch(1) > 0


def _train_requests(data: stream.StreamingTrainData, shards: list[int]) -> set[int]:
    out: set[int] = set()
    for i in shards:
        ids = np.unique(data.shards[i].read(["request_id"])["request_id"].to_numpy())
        out |= set(ids[~is_validation_request(data.cfg, ids)].tolist())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_balanced_and_cover_every_training_request(
    sharded: Config, world: int
) -> None:
    data = stream.StreamingTrainData(sharded, _path(sharded), world=world)
    every = _train_requests(data, list(range(len(data.shards))))
    for epoch in (0, 1):
        ranks = data.assignment(epoch)
        assert len(ranks) == world and all(ranks)
        per_rank = [_train_requests(data, shards) for shards in ranks]
        assert sum(len(r) for r in per_rank) == len(set().union(*per_rank))  # disjoint
        assert set().union(*per_rank) == every
        load = [sum(data.shard_batches(i) for i in shards) for shards in ranks]
        assert max(load) - min(load) <= max(data.shard_batches(i) for i in range(len(data.shards)))
        order = data.epoch_order(epoch)
        assert all(shards == sorted(shards, key=order.index) for shards in ranks)  # visit order
    assert data.assignment(0) == stream.StreamingTrainData(sharded, _path(sharded), world=world).assignment(0)


def test_more_ranks_than_shards_is_refused(sharded: Config) -> None:
    shards = len(stream.shard_files(_path(sharded)))
    with pytest.raises(HapError, match="a rank would have nothing to train on"):
        stream.StreamingTrainData(sharded, _path(sharded), world=shards + 1)


def test_a_load_holds_one_shard_and_only_its_split(sharded: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the shard cache, peak memory follows the shard, not the window: at most one shard's
    tensors are alive while an epoch streams, and a train (validation) load holds train
    (validation) requests only."""
    data = stream.StreamingTrainData(sharded.updated({"train.shard_cache_mb": 0}), _path(sharded))
    alive: list[weakref.ref] = []
    real_init = TrainData.__init__

    def tracked(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        alive.append(weakref.ref(self))

    monkeypatch.setattr(TrainData, "__init__", tracked)
    most = 0
    for split in ("train", "val"):
        for _ in data.batches(0, split):
            most = max(most, sum(ref() is not None for ref in alive))
    assert len(alive) > 1 and most == 1
    for split in ("train", "val"):
        shard = next(i for i, s in enumerate(data.shards) if s.val_anchors and s.train_anchors)
        loaded = data.load(shard, split)
        ids = np.unique(data.shards[shard].read(["request_id"])["request_id"].to_numpy())
        is_val = is_validation_request(sharded, ids)
        assert loaded.n_requests == int((is_val if split == "val" else ~is_val).sum()) < len(ids)
        assert (len(loaded.val_anchors) > 0) == (split == "val") != (len(loaded.train_anchors) > 0)


def test_the_shard_cache_reads_each_shard_once_gives_the_same_batches_and_keeps_its_budget(
    sharded: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int, str]] = []
    real_read = stream.StreamingTrainData._read

    def counted(self, index: int, split: str) -> TrainData:
        reads.append((id(self), index, split))
        return real_read(self, index, split)

    monkeypatch.setattr(stream.StreamingTrainData, "_read", counted)
    uncached = stream.StreamingTrainData(sharded.updated({"train.shard_cache_mb": 0}), _path(sharded))
    cached = stream.StreamingTrainData(sharded, _path(sharded))
    for epoch in range(3):
        want, got = _flat(uncached.batches(epoch, "train")), _flat(cached.batches(epoch, "train"))
        assert len(want) > 0 and all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    by_cached = [r[1:] for r in reads if r[0] == id(cached)]
    by_uncached = [r[1:] for r in reads if r[0] == id(uncached)]
    assert len(by_cached) == len(set(by_cached)) > 1  # each shard read and encoded once
    assert len(by_uncached) == 3 * len(set(by_uncached))  # without the cache: every epoch

    # each shard counted as 0.6 MB under a 1 MB budget: one is kept, and every shard still trains
    monkeypatch.setattr(TrainData, "nbytes", property(lambda self: int(0.6 * 2**20)))
    small = stream.StreamingTrainData(sharded.updated({"train.shard_cache_mb": 1}), _path(sharded))
    want, got = _flat(uncached.batches(0, "train")), _flat(small.batches(0, "train"))
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert len(small._cache) == 1


def test_loader_workers_prefetch_the_same_batches(sharded: Config) -> None:
    data = stream.StreamingTrainData(sharded, _path(sharded))
    base = _flat(data.batches(0, "train"))
    one = stream.StreamingTrainData(sharded.updated({"train.loader_workers": 1}), _path(sharded))
    assert all(torch.equal(a, b) for a, b in zip(base, _flat(one.batches(0, "train")), strict=True))
    two = stream.StreamingTrainData(sharded.updated({"train.loader_workers": 2}), _path(sharded))
    first, again = _flat(two.batches(0, "train")), _flat(two.batches(0, "train"))
    assert len(first) == len(base) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    key = sorted(tuple(t.tolist()) for t in base)
    assert sorted(tuple(t.tolist()) for t in first) == key  # the same batches, interleaved by worker


def test_a_resumed_run_equals_an_uninterrupted_one(
    sharded: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hap.model import train

    data = stream.StreamingTrainData(sharded, _path(sharded))
    meta = {"date": DATE.isoformat(), "data_version": "test"}
    straight = train.fit(sharded, data, tmp_path / "straight", tmp_path / "ck1", meta=meta, log=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after its epochs, before the bundle

    one_epoch = sharded.updated({"train.epochs": 1})
    monkeypatch.setattr(train, "write_bundle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.fit(one_epoch, data, tmp_path / "resumed", tmp_path / "ck2", meta=meta, log=False)
    monkeypatch.undo()
    assert (tmp_path / "ck2" / train.CKPT_FILE).exists()
    resumed = train.fit(
        sharded, data, tmp_path / "resumed", tmp_path / "ck2", resume=True, meta=meta, log=False
    )
    assert resumed.resumed_from_epoch == 0 and straight.epochs_run == resumed.epochs_run == 2
    for tower in ("light", "expressive"):
        a = torch.load(tmp_path / "straight" / layout.tower_weights_file(tower), weights_only=True)
        b = torch.load(tmp_path / "resumed" / layout.tower_weights_file(tower), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
