"""A click is embedded as its id plus its item side features (the behaviour lookup).

The toy world is the production problem in miniature: every clicked item id is seen once, so an
id embedding cannot learn what the item is about, but each item's category is known from the
window's item rows. With the lookup the model matches a candidate's category to the categories of
the clicks; without it the clicks carry no usable signal.
"""

from __future__ import annotations

import torch

from hap.model.batches import ITEM_CATEGORICAL, N_USER_DENSE
from hap.model.towers import N_ITEM_CAT, N_ITEM_DENSE, N_REQ_CAT, LightweightModel

CATEGORIES, INTERESTS, CLICKS, ITEMS = 16, 2, 6, 40_000
CATEGORY_SLOT = ITEM_CATEGORICAL.index("i_category")
# rows of the shared table: ids 1..ITEMS, then one row per category
CATEGORY_ROW0 = ITEMS + 1


def _model(side: tuple[str, ...]) -> LightweightModel:
    torch.manual_seed(0)
    return LightweightModel(
        hash_buckets=CATEGORY_ROW0 + CATEGORIES,
        embed_dim=8,
        tower_dims=[16],
        mlp_dims=[16],
        seq_len=CLICKS,
        behaviour_features=side,
    )


def _item_rows(ids: torch.Tensor) -> torch.Tensor:
    """Encoded item columns ``[N, 8]``: the id and its category, the rest padding."""
    cat = torch.zeros(len(ids), N_ITEM_CAT, dtype=torch.long)
    cat[:, 0] = ids
    cat[:, CATEGORY_SLOT] = CATEGORY_ROW0 + (ids - 1) % CATEGORIES
    return cat


def _world(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(click ids [n, L], candidate ids [n], labels [n]): fresh random ids, category = (id-1) % C."""
    interests = torch.stack([torch.randperm(CATEGORIES, generator=g)[:INTERESTS] for _ in range(n)])
    click_cat = interests.gather(1, torch.randint(0, INTERESTS, (n, CLICKS), generator=g))

    def item_of(category: torch.Tensor) -> torch.Tensor:
        block = torch.randint(0, ITEMS // CATEGORIES, category.shape, generator=g)
        return 1 + block * CATEGORIES + category

    label = torch.rand(n, generator=g) < 0.5
    liked = interests.gather(1, torch.randint(0, INTERESTS, (n, 1), generator=g)).squeeze(1)
    other = torch.randint(0, CATEGORIES, (n,), generator=g)
    while (clash := (other[:, None] == interests).any(1)).any():
        other[clash] = torch.randint(0, CATEGORIES, (int(clash.sum()),), generator=g)
    return item_of(click_cat), item_of(torch.where(label, liked, other)), label.float()


def _forward(model: LightweightModel, seq: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    n = len(seq)
    return model(
        torch.zeros(n, N_REQ_CAT, dtype=torch.long),
        torch.zeros(n, N_USER_DENSE),
        seq,
        _item_rows(item)[:, None, :],
        torch.zeros(n, 1, N_ITEM_DENSE),
    )[:, 0]


def _auc_after_training(side: tuple[str, ...], steps: int = 300) -> float:
    model = _model(side)
    model.fit_behaviour_lookup(_item_rows(torch.arange(1, ITEMS + 1)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        seq, item, y = _world(128, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(_forward(model, seq, item), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, item, y = _world(2000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = _forward(model, seq, item)
    return float((s[y == 1][:, None] > s[y == 0][None]).float().mean())


def test_side_features_let_sparse_click_ids_reveal_interests():
    torch.set_num_threads(1)
    with_side, ids_only = _auc_after_training(("i_category",)), _auc_after_training(())
    assert with_side > 0.75, with_side
    assert with_side > ids_only + 0.15, (with_side, ids_only)


def test_lookup_maps_ids_to_their_side_rows_and_keeps_padding():
    model = _model(("i_category",))
    model.fit_behaviour_lookup(_item_rows(torch.tensor([5, 21])))
    seq = torch.tensor([[0, 5, 21, 7]])  # padding, two known ids, one the window never saw
    got = model.behaviours(seq)
    emb = model.emb.weight
    category = CATEGORY_ROW0 + 4  # ids 5 and 21 are both category 4
    assert torch.equal(got[0, 0], torch.zeros(8))
    assert torch.allclose(got[0, 1], emb[5] + emb[category])
    assert torch.allclose(got[0, 2], emb[21] + emb[category])
    assert torch.allclose(got[0, 3], emb[7])  # unknown item: its id alone


def test_lookup_travels_with_the_weights():
    trained = _model(("i_category",))
    trained.fit_behaviour_lookup(_item_rows(torch.arange(1, 100)))
    fresh = _model(("i_category",))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.behaviour_lookup, trained.behaviour_lookup)
    assert int((fresh.behaviour_lookup[1:100, 0] > 0).sum()) == 99
