"""Learnability: can the light model learn that a user likes the categories of their recent clicks?

The toy world (issue 29): a request's recent clicks are fresh item ids from the user's interest
categories, and a candidate is good exactly when its category is among those clicks' categories
(plus a small unlearnable jitter). The rule "count the recent clicks that share the candidate's
category" ranks it almost perfectly. A model has to cross the user side (the clicks) with the item
side (the candidate's category) to learn it:

- with the cross features (``hap.model.cross``: the click categories come from the window's item
  table, as in serving), the light model reaches at least 90% of the rule's ``gt_recall@50``;
- today's towers without them (ids only, ``[u + v, u * v]``) cannot: the ids are fresh, and the
  towers meet only through two learned vectors. The test shows they fail.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from hap.core import schema
from hap.model.batches import ITEM_CATEGORICAL, N_USER_DENSE
from hap.model.cross import CrossFeatures
from hap.model.evaluate import CLICKS_K
from hap.model.metrics import order_of, truth_vectors
from hap.model.towers import N_ITEM_CAT, N_ITEM_DENSE, N_REQ_CAT, LightweightModel

CATEGORIES, INTERESTS, CLICKS, ITEMS, CANDIDATES = 16, 2, 6, 40_000, 200
CATEGORY_SLOT = ITEM_CATEGORICAL.index("i_category")
CATEGORY_ROW0 = ITEMS + 1  # rows of the shared table: ids 1..ITEMS, then one row per category


def _category(ids: np.ndarray) -> np.ndarray:
    return CATEGORY_ROW0 + (ids - 1) % CATEGORIES


def _world(n: int, c: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(click ids [n, L], candidate ids [n, c], truth [n, c]): fresh ids, category = (id-1) % C."""
    interests = np.stack([rng.permutation(CATEGORIES)[:INTERESTS] for _ in range(n)])
    click_cat = np.take_along_axis(interests, rng.integers(0, INTERESTS, (n, CLICKS)), 1)
    cand_cat = rng.integers(0, CATEGORIES, (n, c))

    def item_of(category: np.ndarray) -> np.ndarray:
        return 1 + rng.integers(0, ITEMS // CATEGORIES, category.shape) * CATEGORIES + category

    liked = (cand_cat[:, :, None] == click_cat[:, None, :]).any(2)
    truth = liked + 0.01 * rng.random((n, c))
    return item_of(click_cat), item_of(cand_cat), truth


def _cross(names: tuple[str, ...], seq: np.ndarray, cand: np.ndarray) -> torch.Tensor:
    """The serving path's cross features of every (request, candidate), from a rows table."""
    n, c = cand.shape
    catalogue = pa.table({"i_id": np.arange(1, ITEMS + 1), "i_category": _category(np.arange(1, ITEMS + 1))})
    cross = CrossFeatures.from_table(names, catalogue)
    rows = pa.table(
        {
            "i_id": cand.reshape(-1),
            "i_category": _category(cand.reshape(-1)),
            schema.USER_SEQUENCE: pa.ListArray.from_arrays(
                np.arange(0, n * c * CLICKS + 1, CLICKS, dtype=np.int32),
                np.repeat(seq, c, axis=0).reshape(-1),
            ),
        }
    )
    return torch.from_numpy(cross.encode(rows, CLICKS)).view(n, c, cross.width)


def _score(
    model: LightweightModel, names: tuple[str, ...], seq: np.ndarray, cand: np.ndarray
) -> torch.Tensor:
    n, c = cand.shape
    item_cat = torch.zeros(n, c, N_ITEM_CAT, dtype=torch.long)
    item_cat[..., 0] = torch.from_numpy(cand)
    item_cat[..., CATEGORY_SLOT] = torch.from_numpy(_category(cand))
    return model(
        torch.zeros(n, N_REQ_CAT, dtype=torch.long),
        torch.zeros(n, N_USER_DENSE),
        torch.from_numpy(seq),
        item_cat,
        torch.zeros(n, c, N_ITEM_DENSE),
        _cross(names, seq, cand) if names else None,
    )


def _gt_recall50(key: np.ndarray, truth: np.ndarray) -> float:
    valid = np.ones(key.shape, bool)
    out = truth_vectors(order_of(key, valid), truth, valid, [50], (0.0, 0.0), CLICKS_K)
    return float(out["gt_recall@50"].mean())


def _train_light(names: tuple[str, ...], steps: int = 60) -> tuple[float, float]:
    """(model's gt_recall@50, the rule's) on held-out requests after ``steps`` BCE steps."""
    torch.manual_seed(0)
    model = LightweightModel(
        hash_buckets=CATEGORY_ROW0 + CATEGORIES,
        embed_dim=8,
        tower_dims=[16],
        mlp_dims=[16],
        seq_len=CLICKS,
        cross_dim=len(names),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        seq, cand, truth = _world(64, 16, rng)
        y = torch.from_numpy((truth >= 1).astype(np.float32))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(_score(model, names, seq, cand), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, cand, truth = _world(100, CANDIDATES, np.random.default_rng(2))
    with torch.no_grad():
        key = _score(model, names, seq, cand).numpy().astype(np.float64)
    match = _cross(("seq_match",), seq, cand)[..., 0].numpy().astype(np.float64)
    rule = match + 1e-6 * np.random.default_rng(3).random(match.shape)  # ties at random
    return _gt_recall50(key, truth), _gt_recall50(rule, truth)


def test_light_model_learns_the_click_category_cross() -> None:
    model, rule = _train_light(("seq_match", "user_logged"))
    assert rule > 0.5
    assert model >= 0.9 * rule, (model, rule)


@pytest.mark.parametrize("names", [()], ids=["no_cross"])
def test_towers_that_cannot_cross_fail(names: tuple[str, ...]) -> None:
    model, rule = _train_light(names)
    assert model < 0.7 * rule, (model, rule)
