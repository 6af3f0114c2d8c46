"""The ``retrieval`` cross feature: the pre-ranker reads what the stage before it said.

- its encoding: ``-log(retrieval_pos)`` and a missing indicator (global negatives carry no
  position), and one clear error when the input has no ``retrieval_pos`` column;
- learnability on a toy world where the candidates' ids are fresh (nothing to learn from them) and
  the only signal is the retrieval position, a noisy rank of the truth: with the feature the light
  model reaches at least 90% of the retrieval order's ``gt_recall@50``; without it, it cannot.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from hap.core.errors import HapError
from hap.model.cross import CrossFeatures, cross_width
from hap.model.evaluate import CLICKS_K
from hap.model.metrics import order_of, truth_vectors
from hap.model.towers import N_ITEM_CAT, N_ITEM_DENSE, N_REQ_CAT, LightweightModel

ITEMS, CANDIDATES, NOISE = 50_000, 200, 0.5


def test_encoding_and_missing_indicator() -> None:
    rows = pa.table(
        {
            "i_id": [1, 2, 3, 4],
            "i_category": [5, 5, 6, 6],
            "retrieval_pos": pa.array([1, 10, None, 0], pa.int32()),
        }
    )
    cross = CrossFeatures.from_table(("retrieval",), rows)
    assert cross.width == cross_width(("retrieval",)) == 2
    out = cross.encode(rows, 4)
    np.testing.assert_allclose(out[:, 0], [0.0, -np.log(10.0), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], [0.0, 0.0, 1.0, 1.0])


def test_input_without_positions_is_refused() -> None:
    rows = pa.table({"i_id": [1], "i_category": [5]})
    with pytest.raises(HapError, match="retrieval_pos"):
        CrossFeatures.from_table(("retrieval",), rows).encode(rows, 4)


def _world(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate ids [n, c], truth [n, c], retrieval positions [n, c]): the position is the rank of
    the truth plus noise, the ids are fresh."""
    cand = rng.integers(1, ITEMS, (n, CANDIDATES))
    truth = rng.normal(size=(n, CANDIDATES))
    noisy = truth + NOISE * rng.normal(size=truth.shape)
    pos = np.empty_like(cand)
    np.put_along_axis(pos, np.argsort(-noisy, 1), np.arange(1, CANDIDATES + 1)[None, :], 1)
    return cand, truth, pos


def _score(
    model: LightweightModel, names: tuple[str, ...], cand: np.ndarray, pos: np.ndarray
) -> torch.Tensor:
    n, c = cand.shape
    item_cat = torch.zeros(n, c, N_ITEM_CAT, dtype=torch.long)
    item_cat[..., 0] = torch.from_numpy(cand)
    rows = pa.table(
        {
            "i_id": cand.reshape(-1),
            "i_category": np.zeros(cand.size, np.int64),
            "retrieval_pos": pos.reshape(-1),
        }
    )
    cross = CrossFeatures.from_table(names, rows)
    feats = torch.from_numpy(cross.encode(rows, 4)).view(n, c, cross.width) if names else None
    return model(
        torch.zeros(n, N_REQ_CAT, dtype=torch.long),
        torch.zeros(n, 2),
        torch.zeros(n, 4, dtype=torch.long),
        item_cat,
        torch.zeros(n, c, N_ITEM_DENSE),
        feats,
    )


def _gt_recall50(key: np.ndarray, truth: np.ndarray) -> float:
    valid = np.ones(key.shape, bool)
    out = truth_vectors(order_of(key, valid), truth, valid, [50], (0.0, 0.0), CLICKS_K)
    return float(out["gt_recall@50"].mean())


def _train(names: tuple[str, ...], steps: int = 40) -> tuple[float, float]:
    """(model's gt_recall@50, the retrieval order's) on held-out requests, after pairwise steps."""
    torch.manual_seed(0)
    model = LightweightModel(ITEMS, 8, [16], [16], 4, cross_dim=cross_width(names))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        cand, truth, pos = _world(16, rng)
        s = _score(model, names, cand, pos)
        better = torch.from_numpy(truth[:, :, None] > truth[:, None, :]).float()
        loss = (torch.nn.functional.softplus(s[:, None, :] - s[:, :, None]) * better).sum() / better.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cand, truth, pos = _world(50, np.random.default_rng(2))
    with torch.no_grad():
        key = _score(model, names, cand, pos).numpy().astype(np.float64)
    return _gt_recall50(key, truth), _gt_recall50(-pos.astype(np.float64), truth)


def test_light_model_reads_the_retrieval_position() -> None:
    model, rule = _train(("retrieval",))
    assert rule > 0.6
    assert model >= 0.9 * rule, (model, rule)


def test_without_the_feature_it_cannot() -> None:
    model, rule = _train(())
    assert model < 0.5 * rule, (model, rule)
