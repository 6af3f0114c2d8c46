"""Training input that streams: shard by shard, sharded across DDP ranks, deterministic, resumable."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hap.core import layout
from hap.core.config import Config
from hap.data import markers
from hap.model import stream
from hap.model.batches import TrainData

DATE = dt.date(2026, 11, 2)
SMALL = {
    "engine.bucket_requests": 40,  # ~6 buckets a day: a dozen shards in the two-day window
    "model.embed_dim": 8,
    "model.hash_buckets": 2048,
    "model.light.tower_dims": [8],
    "model.light.mlp_dims": [8],
    "model.expressive.tower_dims": [8],
    "model.expressive.mlp_dims": [8, 8],
    "model.expressive.attention_heads": 1,
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

        def record(index: int, rank=rank, real=real) -> TrainData:
            loaded[rank].add(index)
            return real(index)

        monkeypatch.setattr(data, "load", record)
        steps[rank] = sum(1 for _ in data.batches(1, "train"))
        order = data.epoch_order(1)
        assert loaded[rank] <= set(order[rank::2])
    assert not loaded[0] & loaded[1]
    assert steps[0] == steps[1] == data.steps_per_epoch(1) > 0


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
