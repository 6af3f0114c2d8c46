"""Target attention against mean pooling on a multi-interest toy world, where attention must win.

Each user clicked items from 3 of 32 item clusters (their interests). A candidate is clicked when it
belongs to one of them. Averaging the clicks blurs three interests into one point in an 8-dim space
that cannot hold 32 clusters apart; attention lets the candidate find the clicks of its own cluster.
"""

from __future__ import annotations

import torch

from hap.model.batches import N_USER_DENSE
from hap.model.towers import N_ITEM_CAT, N_ITEM_DENSE, N_REQ_CAT, ExpressiveModel

CLUSTERS, PER_CLUSTER, INTERESTS, CLICKS = 32, 8, 3, 9


def _world(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(click sequences [n, L], candidate item ids [n], labels [n]); item ids start at 1 (0 = pad)."""
    interests = torch.stack([torch.randperm(CLUSTERS, generator=g)[:INTERESTS] for _ in range(n)])
    seq_cluster = interests.gather(1, torch.randint(0, INTERESTS, (n, CLICKS), generator=g))
    seq = 1 + seq_cluster * PER_CLUSTER + torch.randint(0, PER_CLUSTER, (n, CLICKS), generator=g)
    label = torch.rand(n, generator=g) < 0.5
    liked = interests.gather(1, torch.randint(0, INTERESTS, (n, 1), generator=g)).squeeze(1)
    other = torch.randint(0, CLUSTERS, (n,), generator=g)
    while (clash := (other[:, None] == interests).any(1)).any():
        other[clash] = torch.randint(0, CLUSTERS, (int(clash.sum()),), generator=g)
    item = (
        1 + torch.where(label, liked, other) * PER_CLUSTER + torch.randint(0, PER_CLUSTER, (n,), generator=g)
    )
    return seq, item, label.float()


def _inputs(seq: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Model inputs where only the clicks and the candidate's id carry information."""
    n = len(seq)
    item_cat = torch.zeros(n, 1, N_ITEM_CAT, dtype=torch.long)
    item_cat[:, 0, 0] = item  # shares the embedding table with the click sequence
    return (
        torch.zeros(n, N_REQ_CAT, dtype=torch.long),
        torch.zeros(n, N_USER_DENSE),
        seq,
        item_cat,
        torch.zeros(n, 1, N_ITEM_DENSE),
    )


def _auc_after_training(pooling: str, steps: int = 400) -> float:
    torch.manual_seed(0)
    model = ExpressiveModel(
        hash_buckets=1 + CLUSTERS * PER_CLUSTER,
        embed_dim=8,
        tower_dims=[16],
        mlp_dims=[16, 16],
        seq_len=CLICKS,
        heads=1,
        pooling=pooling,
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        seq, item, y = _world(128, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*_inputs(seq, item))[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, item, y = _world(2000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = model(*_inputs(seq, item))[:, 0]
    return float((s[y == 1][:, None] > s[y == 0][None]).float().mean())


def test_target_attention_beats_mean_pooling_on_multi_interest_users():
    torch.set_num_threads(1)
    target, mean = _auc_after_training("target"), _auc_after_training("mean")
    assert target > 0.72, target
    assert target > mean + 0.04, (target, mean)
