"""DAMR's score merges and the expressive model's served view of a batch, on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hap.model.batches import EASY_GROUP_IDS, HARD_GROUP_IDS, Batch
from hap.model.routing import damr_order
from hap.model.train import served_view


def test_merges_order_routed_and_unrouted_candidates():
    light = np.array([3.0, 2.0, 1.0, 0.0])
    routed = np.array([True, True, False, False])
    expr = np.array([-5.0, -4.0, np.nan, np.nan])  # the expressive model prefers candidate 1
    assert damr_order(light, expr, routed, "stack")[1].tolist() == [2, 1, 3, 4]
    # raw logits: the routed ones drop below the unrouted when the expressive scale is lower
    assert damr_order(light, expr, routed, "raw")[1].tolist() == [4, 3, 1, 2]
    # sum: the light order refined by the expressive one; routed stay on top
    assert damr_order(light, np.array([-5.0, -3.5, np.nan, np.nan]), routed, "sum")[1].tolist() == [
        2,
        1,
        3,
        4,
    ]
    assert damr_order(light, np.array([-5.0, -4.5, np.nan, np.nan]), routed, "sum")[1].tolist() == [
        1,
        2,
        3,
        4,
    ]
    with pytest.raises(ValueError):
        damr_order(light, expr, routed, "blend")


class _ScoreIsFirstDenseFeature(torch.nn.Module):
    def forward(self, req_cat, req_dense, seq, item_cat, item_dense, cross=None):  # noqa: ANN001
        return item_dense[..., 0]


def test_served_view_keeps_hard_groups_and_the_light_models_top_easy_negatives():
    hard, easy = HARD_GROUP_IDS[0], EASY_GROUP_IDS[0]
    col_group = torch.tensor([-1, hard, hard, easy, easy, easy])
    dense = torch.zeros(2, 6, 8)
    dense[:, :, 0] = torch.tensor([[9.0, 0, 0, 1, 5, 3], [9.0, 0, 0, 7, 2, 4]])
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 2] = False  # a missing hard slot stays missing
    b = Batch(
        torch.zeros(2, 10, dtype=torch.long),
        torch.zeros(2, 2),
        torch.zeros(2, 20, dtype=torch.long),
        torch.zeros(2, 6, 8, dtype=torch.long),
        dense,
        valid,
        col_group,
    )
    view = served_view(_ScoreIsFirstDenseFeature(), b, easy_top=2)
    assert view.valid.tolist() == [
        [True, True, True, False, True, True],
        [True, True, False, True, False, True],
    ]
