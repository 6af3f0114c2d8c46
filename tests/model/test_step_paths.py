"""The training step's faster paths compute what the plain ones do: the embedding table's gradient
through its sink, GradNorm's group norms from one backward, the weight average's update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TOWERS, tiny_config

from hap.model.batches import GROUPS, N_USER_DENSE, column_layout
from hap.model.losses import Harmonizer, group_losses, group_losses_grid
from hap.model.towers import N_ITEM_CAT, N_ITEM_DENSE, N_REQ_CAT, attach_grad_sink, build_models


def _inputs(model: torch.nn.Module, b: int, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    buckets = model.emb.num_embeddings
    return (
        torch.randint(0, buckets, (b, N_REQ_CAT), generator=g),
        torch.randn(b, N_USER_DENSE, generator=g),
        torch.randint(0, 50, (b, model.seq_len), generator=g),  # repeated ids: rows summed
        torch.randint(0, 50, (b, c, N_ITEM_CAT), generator=g),
        torch.randn(b, c, N_ITEM_DENSE, generator=g),
        torch.randn(b, c, model.cross_dim, generator=g),
    )


@pytest.mark.parametrize("tower", [0, 1])
def test_table_grad_sink_matches_dense_gradient(tmp_path: Path, tower: int) -> None:
    cfg = tiny_config(tmp_path, **{k.replace(".", "__"): v for k, v in TINY_TOWERS.items()})
    grads = []
    for sink in (False, True):
        torch.manual_seed(0)
        model = build_models(cfg.model.model_dump(mode="json"))[tower]
        if sink:
            attach_grad_sink(model.emb.weight)
        # two lookups into one backward, as a step's anchors and full-flow requests
        loss = model(*_inputs(model, 6, 5, 1)).sum() + model(*_inputs(model, 3, 7, 2)).pow(2).sum()
        loss.backward()
        model.zero_padding_grad()
        grads.append((model.emb.weight.grad.clone(), [p.grad for p in model.shared_parameters()]))
    (dense, dense_shared), (sunk, sunk_shared) = grads
    assert dense.abs().sum() > 0 and float(dense[0].abs().sum()) == 0.0
    assert torch.allclose(sunk, dense, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(dense_shared, sunk_shared))


def test_table_rows_plain_without_grad(tmp_path: Path) -> None:
    """Scoring (no autograd) reads the table as before and leaves the sink alone."""
    cfg = tiny_config(tmp_path, **{k.replace(".", "__"): v for k, v in TINY_TOWERS.items()})
    model = build_models(cfg.model.model_dump(mode="json"))[0]
    sink = attach_grad_sink(model.emb.weight)
    with torch.no_grad():
        model(*_inputs(model, 4, 3, 0))
    assert float(sink.abs().sum()) == 0.0


def test_gradnorm_one_backward_matches_per_group() -> None:
    cols = column_layout({"expose_neg": 3, "rank_neg": 2, "prerank_neg": 4, "global_neg": 1})
    torch.manual_seed(0)
    for drop_last_group in (False, True):
        logits = torch.randn(32, len(cols), requires_grad=True)
        valid = torch.rand(32, len(cols)) > 0.3
        valid[:, 0] = True
        if drop_last_group:
            valid[:, cols == 3] = False
        losses, present, grid = group_losses_grid(logits, valid, cols, 0.2, 1.0)
        assert torch.equal(losses, group_losses(logits, valid, cols, 0.2, 1.0)[0])
        per_group, batched = Harmonizer("gradnorm"), Harmonizer("gradnorm")
        for _ in range(2):  # the second call goes through the EMA
            w_loop = per_group.weights(losses, present, logits)
            w_grid = batched.weights(losses, present, logits, grid)
            assert torch.allclose(w_loop, w_grid, atol=1e-6)
            assert torch.allclose(per_group.ema, batched.ema, atol=1e-6)


def test_averaged_step_matches_averaged_model(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    from hap.model.member import Member, warmed_ema

    cfg = tiny_config(tmp_path, **{k.replace(".", "__"): v for k, v in TINY_TOWERS.items()})
    model = build_models(cfg.model.model_dump(mode="json"))[0]
    member = Member("light", model, cfg, None, torch.device("cpu"), 1)
    reference = AveragedModel(model, multi_avg_fn=warmed_ema(cfg.train.ema_decay))
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        member.averaged_step()
        reference.update_parameters(model)
        assert int(member.avg.n_averaged) == int(reference.n_averaged) == step + 1
        for a, b in zip(member.avg.module.parameters(), reference.module.parameters()):
            assert torch.allclose(a, b, atol=1e-7)


def test_pair_losses_match_their_masked_definitions() -> None:
    """The stage and order losses, written with +-inf logits for invalid cells instead of validity
    masks, give the masked definitions' values and gradients."""
    import torch.nn.functional as F

    from hap.model.distill import order_loss, order_pairs
    from hap.model.losses import stage_loss

    torch.manual_seed(0)
    cols = column_layout({"expose_neg": 3, "rank_neg": 2, "prerank_neg": 4, "global_neg": 1})
    levels = {"expose_pos": 4, "expose_neg": 3, "rank_neg": 2, "prerank_neg": 1, "global_neg": 0}
    logits = torch.randn(16, len(cols), requires_grad=True)
    valid = torch.rand(16, len(cols)) > 0.3
    key = torch.randn(16, len(cols)).masked_fill(~valid, float("-inf"))
    key[:, 1] = key[:, 2]  # ties: no pair either way

    def masked(mask: torch.Tensor) -> torch.Tensor:
        pairs = mask & valid[:, :, None] & valid[:, None, :]
        return (F.softplus(logits[:, None, :] - logits[:, :, None]) * pairs).sum() / pairs.sum()

    table = torch.tensor([float(levels.get(g, 0)) for g in GROUPS])
    level = torch.cat([table, torch.tensor([4.0])])[cols]
    cases = [
        (stage_loss(logits, valid, cols, levels), masked((level[:, None] > level[None, :])[None])),
        (order_loss(logits, key, valid), masked(key[:, :, None] > key[:, None, :])),
        (
            order_loss(logits, key, valid, order_pairs(key, valid).sum()),
            masked(key[:, :, None] > key[:, None, :]),
        ),
    ]
    for fast, reference in cases:
        (g_fast,) = torch.autograd.grad(fast, logits)
        (g_ref,) = torch.autograd.grad(reference, logits)
        assert torch.isfinite(g_fast).all()
        assert torch.allclose(fast, reference, atol=1e-6) and torch.allclose(g_fast, g_ref, atol=1e-7)
