"""Weight averaging (``train.ema_decay``): validation, early stopping, the bundle and a resumed run
all use the exponential moving average of each tower's weights over the training steps."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOWERS, tiny_config

from hap.core import layout
from hap.core.config import Config
from hap.data import markers
from hap.model import stream

DATE = dt.date(2026, 11, 2)
DECAY = 0.8
SMALL = {
    "engine.bucket_requests": 40,
    "model.hash_buckets": 2048,
    **TINY_TOWERS,
    "train.epochs": 2,
    "train.batch_requests": 16,
    "train.patience": 5,
    "train.diagnostics_every": 0,
    "train.ema_decay": DECAY,
}


@pytest.fixture(scope="module")
def window(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Three tiny simulated days, split over the window ending DATE."""
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    home = tmp_path_factory.mktemp("averaging") / "data"
    cfg = tiny_config(home, **{k.replace(".", "__"): v for k, v in SMALL.items()})
    for day, _ in simulate_days(cfg, cfg.simulate.start, 3, progress=False):
        ingest_day(cfg, day, require_validated=False)
        markers.mark_validated(cfg, day, {"by": "test_averaging"})
    build_training_set(cfg, DATE)
    return cfg


def _data(cfg: Config) -> stream.StreamingTrainData:
    return stream.StreamingTrainData(cfg, layout.training_set(cfg, DATE))


def _weights(bundle: Path, tower: str) -> dict[str, torch.Tensor]:
    return torch.load(bundle / layout.tower_weights_file(tower), weights_only=True)


def test_the_scored_weights_are_the_moving_average_of_every_step(window: Config) -> None:
    """After step n the averaged weights are d x the previous average + (1 - d) x the new weights,
    with d = min(decay, (1 + k) / (10 + k)) warming up over the k updates averaged so far (the first step's
    weights start it); the weights being trained stay the raw ones."""
    from hap.model.member import build_members
    from hap.model.steps import train_step

    data = _data(window)
    light = build_members(window, data, torch.device("cpu"), 1)[0]
    expected: dict[str, torch.Tensor] = {}
    for step, b in enumerate(data.batches(0, "train")):
        train_step(window, light, b, torch.device("cpu"), 1, step)
        for name, p in light.raw.named_parameters():
            w = p.detach().clone()
            d = min(DECAY, (1 + step) / (10 + step))  # step updates averaged before this one
            expected[name] = w if step == 0 else d * expected[name] + (1 - d) * w
    assert step >= 3
    scored = dict(light.scored.named_parameters())
    for name, _ in light.raw.named_parameters():
        assert torch.allclose(scored[name], expected[name], atol=1e-6), name
    assert any(not torch.equal(scored[n], p) for n, p in light.raw.named_parameters())


def test_validation_and_the_bundle_use_the_averaged_weights(window: Config, tmp_path: Path) -> None:
    """The same steps with and without averaging: the raw trajectory is identical, so the bundles
    differ only by the average; the averaged bundle is what validation picked."""
    from hap.model import train

    meta = {"date": DATE.isoformat(), "data_version": "test"}
    plain_cfg = window.updated({"train.ema_decay": 0.0})
    avg = train.fit(window, _data(window), tmp_path / "avg", meta=meta, log=False)
    plain = train.fit(plain_cfg, _data(plain_cfg), tmp_path / "plain", meta=meta, log=False)
    for tower in ("light", "expressive"):
        a, p = _weights(tmp_path / "avg", tower), _weights(tmp_path / "plain", tower)
        assert a.keys() == p.keys()
        assert any(not torch.allclose(a[k], p[k]) for k in a if a[k].is_floating_point()), tower
    # the validation metric recorded is the averaged model's, not the raw one's
    assert avg.val_metric != plain.val_metric


def test_a_resumed_averaged_run_equals_an_uninterrupted_one(
    window: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint carries the average: resuming after epoch 0 gives the same bundle bytes."""
    from hap.model import train

    meta = {"date": DATE.isoformat(), "data_version": "test"}
    train.fit(window, _data(window), tmp_path / "straight", tmp_path / "ck1", meta=meta, log=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after its epochs, before the bundle

    monkeypatch.setattr(train, "write_bundle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        one = window.updated({"train.epochs": 1})
        train.fit(one, _data(one), tmp_path / "resumed", tmp_path / "ck2", meta=meta, log=False)
    monkeypatch.undo()
    resumed = tmp_path / "resumed"
    train.fit(window, _data(window), resumed, tmp_path / "ck2", resume=True, meta=meta, log=False)
    for tower in ("light", "expressive"):
        a, b = _weights(tmp_path / "straight", tower), _weights(tmp_path / "resumed", tower)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tower


def test_keep_last_trains_every_epoch_and_keeps_the_last_average(window: Config, tmp_path: Path) -> None:
    """``train.keep: last``: no early stop, no selection on validation; the bundle is the average
    after the last step, which is the ``best`` run's bundle when validation picks the last epoch."""
    from hap.model import train

    meta = {"date": DATE.isoformat(), "data_version": "test"}
    last_cfg = window.updated({"train.keep": "last", "train.patience": 1, "train.epochs": 3})
    result = train.fit(last_cfg, _data(last_cfg), tmp_path / "last", meta=meta, log=False)
    assert result.epochs_run == 3 and result.best_epoch == {"light": 2, "expressive": 2}
    two = window.updated({"train.keep": "last", "train.epochs": 2})
    train.fit(two, _data(two), tmp_path / "two", meta=meta, log=False)
    best = train.fit(window, _data(window), tmp_path / "best", meta=meta, log=False)
    if best.best_epoch["light"] == 1:  # validation picked the last epoch: the same weights
        a, b = _weights(tmp_path / "two", "light"), _weights(tmp_path / "best", "light")
        assert all(torch.equal(a[k], b[k]) for k in a)
