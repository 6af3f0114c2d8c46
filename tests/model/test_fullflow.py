"""The window's full-flow requests as supervision (``hap.data.fullflow_set``, ``hap.model.distill``).

Tiny data (3 simulated days); the split keeps a hashed share of the window days' full-flow rows,
never the eval day's, and training reads them as a pairwise loss in the logged ranking order.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import tiny_config

from hap.core import layout
from hap.core.config import Config
from hap.data import markers

DATE = dt.date(2026, 11, 2)


def test_stage_key_puts_the_ranking_stage_above_and_in_its_order() -> None:
    from hap.data.fullflow_set import stage_key

    table = pa.table(
        {
            "rank_pos": pa.array([None, 3, 1, None], pa.int32()),
            "prerank_pos": pa.array([500, 10, 40, 201], pa.int32()),
        }
    )
    assert np.argsort(-stage_key(table)).tolist() == [2, 1, 3, 0]


def test_order_loss_is_low_for_the_logged_order_and_ignores_invalid_rows() -> None:
    from hap.model.distill import order_loss

    key = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    agree = order_loss(torch.tensor([[3.0, 2.0, 1.0, 99.0]]), key, valid)
    disagree = order_loss(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), key, valid)
    assert float(agree) < 0.35 < float(disagree)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Config:
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.sources.simulator import simulate_days

    cfg = tiny_config(
        tmp_path_factory.mktemp("fullflow") / "data",
        split__fullflow_share=0.1,
        train__fullflow_weight=4.0,
        model__hash_buckets=4096,
        model__embed_dim=8,
    )
    for day, _ in simulate_days(cfg, cfg.simulate.start, 3):
        ingest_day(cfg, day, require_validated=False)
        markers.mark_validated(cfg, day, {"by": "test_fullflow"})
    build_training_set(cfg, DATE)
    return cfg


def test_split_keeps_a_share_of_the_window_full_flow_rows(split: Config) -> None:
    import pyarrow.parquet as pq

    from hap.data.fullflow_set import read_fullflow_set
    from hap.data.split import build_training_set

    table = read_fullflow_set(layout.fullflow_set(split, DATE))
    assert table is not None
    # the window's days; the eval requests (here every full-flow request of the last day, D) are held out
    eval_ids = set(pq.read_table(layout.eval_set(split, DATE))["request_id"].to_pylist())
    assert eval_ids and not eval_ids & set(table["request_id"].to_pylist())
    assert set(table["dt"].to_pylist()) <= {"2026-11-01", "2026-11-02"}
    nxt = split.updated({"split.eval_day": "next", "paths.training": "training-next"})
    build_training_set(nxt, DATE)  # eval on the held-out day after: every window day supervises
    table = read_fullflow_set(layout.fullflow_set(nxt, DATE))
    assert set(table["dt"].to_pylist()) == {"2026-11-01", "2026-11-02"}  # the window, not the eval day
    per_request = np.unique(table["request_id"].to_numpy(), return_counts=True)[1]
    assert 60 < per_request.mean() < 140  # ~10% of 1,000 retrieved candidates
    assert table["retrieval_pos"].null_count == 0


def test_training_reads_them_and_the_term_moves_the_model(split: Config) -> None:
    from hap.model.distill import fullflow_term
    from hap.model.stream import StreamingTrainData
    from hap.model.towers import build_models

    data = StreamingTrainData(split, layout.training_set(split, DATE))
    assert data.fullflow is not None and data.fullflow.n_requests > 0
    fb = data.fullflow.batch(0)
    assert torch.equal(fb.key, data.fullflow.batch(0).key)  # the draw depends on (seed, step) only
    light, _ = build_models(split.model)
    loss = fullflow_term(split, light, fb, torch.device("cpu"))
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert light.wide.weight.grad.abs().sum() > 0
    off = split.updated({"train.fullflow_weight": 0.0})
    assert StreamingTrainData(off, layout.training_set(off, DATE)).fullflow is None


def test_without_a_share_the_split_writes_none(tmp_path: Path, split: Config) -> None:
    from hap.data.fullflow_set import write_fullflow_set

    off = split.updated({"split.fullflow_share": 0.0})
    assert write_fullflow_set(off, [DATE], {}, None, tmp_path / "part-0.parquet") == 0
    assert not (tmp_path / "part-0.parquet").exists()
