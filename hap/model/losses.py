"""GHCL and the mixing baselines, on the ``[B, C]`` candidate grid of ``hap.model.batches.Batch``.

- ``group_losses``: per group ``g``, an InfoNCE whose softmax sees the positive and only that
  group's negatives (temperature tau), plus ``bce_weight`` x the BCE of the positive and those
  negatives. Vectorized over groups with a padded ``[B, G, K]`` gather (no loop over groups).
- ``mixed_bce``: one BCE over every sample; ``mixed_infonce``: one softmax over all negatives.
- Harmonizers combine the group losses into what is back-propagated:
  ``uniform`` (equal weights), ``gradnorm`` (GHM/GradNorm-like: weights inversely proportional to
  an EMA of each group's gradient norm at the logits, so no group dominates the shared
  parameters), ``pcgrad`` (per-group gradients on the shared dense parameters, conflicting pairs
  projected onto each other's normal plane, Yu et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hap.model.batches import EASY_GROUP_IDS, GROUPS, HARD_GROUP_IDS


@dataclass
class GroupIndex:
    """The padded column index of each group in the grid: ``cols [G, K]``, ``pad [G, K]``."""

    cols: torch.Tensor
    pad: torch.Tensor
    present: torch.Tensor  # [G] bool: the group has columns in this grid

    @classmethod
    def of(cls, col_group: torch.Tensor) -> GroupIndex:
        g = len(GROUPS)
        counts = torch.stack([(col_group == i).sum() for i in range(g)])
        k = max(int(counts.max()), 1)
        cols = torch.zeros(g, k, dtype=torch.long, device=col_group.device)
        pad = torch.zeros(g, k, dtype=torch.bool, device=col_group.device)
        for i in range(g):  # G is 4; this runs once per grid layout, not per row
            idx = (col_group == i).nonzero().squeeze(1)
            cols[i, : len(idx)], pad[i, : len(idx)] = idx, True
        return cls(cols, pad, counts > 0)


def group_losses(
    logits: torch.Tensor, valid: torch.Tensor, col_group: torch.Tensor, temperature: float, bce_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group GHCL loss ``[G]`` and a ``[G]`` mask of groups that had any valid pair."""
    losses, present, _ = group_losses_grid(logits, valid, col_group, temperature, bce_weight)
    return losses, present


def group_losses_grid(
    logits: torch.Tensor, valid: torch.Tensor, col_group: torch.Tensor, temperature: float, bce_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``group_losses`` and the ``[B, G, 1 + K]`` grid they are computed from: each group's own copy
    of the positive, then its negatives. Group ``g``'s loss reads only slice ``[:, g]``, each entry
    of it a distinct logit, so the gradient of the sum over groups at that slice is group ``g``'s
    own gradient, with its norm at the logits (``Harmonizer``: one backward, not one per group)."""
    gi = GroupIndex.of(col_group)
    logits = logits.float()
    neg = logits[:, gi.cols]  # [B, G, K]
    ok = valid[:, gi.cols] & gi.pad[None]  # [B, G, K]
    pos = logits[:, :1].unsqueeze(1).expand(-1, len(GROUPS), 1)  # [B, G, 1]
    grid = torch.cat([pos, neg], dim=2)  # [B, G, 1 + K]
    keep = torch.cat([torch.ones_like(ok[..., :1]), ok], dim=2)
    z = grid.masked_fill(~keep, float("-inf")) / temperature
    nce = torch.logsumexp(z, dim=2) - z[..., 0]  # [B, G]
    has = ok.any(2)  # anchors with >= 1 negative in g
    n_anchor = has.sum(0).clamp(min=1)
    nce_g = (nce * has).sum(0) / n_anchor
    bce_pos = F.softplus(-grid[..., 0]) * has  # -log sigmoid(s_pos)
    bce_neg = (F.softplus(grid[..., 1:]) * ok).sum(2)  # -log(1 - sigmoid(s_neg))
    bce_g = (bce_pos + bce_neg).sum(0) / (has.sum(0) + ok.sum((0, 2))).clamp(min=1)
    return nce_g + bce_weight * bce_g, has.any(0) & gi.present, grid


def mixed_bce(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One BCE over the positive (column 0) and every valid negative, all sources mixed."""
    logits = logits.float()
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def mixed_infonce(logits: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """One softmax over the positive and all valid negatives, whatever their source."""
    z = logits.float().masked_fill(~valid, float("-inf")) / temperature
    has = valid[:, 1:].any(1)
    nce = torch.logsumexp(z, dim=1) - z[:, 0]
    return (nce * has).sum() / has.sum().clamp(min=1)


# ---- harmonization -----------------------------------------------------------------------------
class Harmonizer:
    """Turns per-group losses into group weights (``uniform`` and ``gradnorm``)."""

    def __init__(self, kind: str, momentum: float = 0.9) -> None:
        self.kind, self.momentum = kind, momentum
        self.ema: torch.Tensor | None = None

    def weights(
        self,
        losses: torch.Tensor,
        present: torch.Tensor,
        logits: torch.Tensor | None,
        grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Group weights; ``gradnorm`` measures each group's gradient norm at the logits, from one
        backward through ``grid`` (``group_losses_grid``: slice ``g`` carries group ``g``'s gradient
        alone) when given, else one backward per group."""
        w = present.float()
        if self.kind == "gradnorm" and logits is not None and logits.requires_grad:
            # each group's gradient magnitude where the groups meet the model: at the logits
            if grid is not None:
                (g,) = torch.autograd.grad(losses.sum(), grid, retain_graph=True)
                norms_t = g.float().pow(2).sum((0, 2)).sqrt() * present
            else:
                norms = []
                for i in range(len(losses)):  # G autograd calls on the tiny loss graph, not the model
                    if bool(present[i]):
                        (g,) = torch.autograd.grad(losses[i], logits, retain_graph=True)
                        norms.append(g.float().norm())
                    else:
                        norms.append(torch.zeros((), device=losses.device))
                norms_t = torch.stack(norms)
            norms_t = norms_t.detach()
            self.ema = (
                norms_t
                if self.ema is None
                else torch.where(present, self.momentum * self.ema + (1 - self.momentum) * norms_t, self.ema)
            )
            w = present.float() / self.ema.clamp(min=1e-8)
        w = w / w.sum().clamp(min=1e-12)
        return w.detach()

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state.get("ema")


def pcgrad_combine(grads: list[list[torch.Tensor]], generator: torch.Generator) -> list[torch.Tensor]:
    """PCGrad: for each group's gradient, project away its conflict with every other group's
    (in a random order), then average. ``grads[g][p]``: group g's gradient of parameter p."""
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in grads])  # [G, P]
    projected = flat.clone()
    n = flat.shape[0]
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if i == j:
                continue
            dot = projected[i] @ flat[j]
            if dot < 0:
                projected[i] -= dot / flat[j].pow(2).sum().clamp(min=1e-20) * flat[j]
    merged = projected.mean(0)
    out, offset = [], 0
    for t in grads[0]:
        out.append(merged[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def difficulty_masks(col_group: torch.Tensor) -> dict[str, torch.Tensor]:
    """Column masks ``[C]`` of the positive plus the easy (hard) negatives, for diagnostics."""
    easy = torch.isin(col_group, torch.tensor(EASY_GROUP_IDS, device=col_group.device))
    hard = torch.isin(col_group, torch.tensor(HARD_GROUP_IDS, device=col_group.device))
    pos = col_group < 0
    return {"easy": easy | pos, "hard": hard | pos}


def stage_loss(
    logits: torch.Tensor, valid: torch.Tensor, col_group: torch.Tensor, levels: dict[str, int]
) -> torch.Tensor:
    """The cascade's stage labels as supervision (RecFlow): inside each anchor's grid, every pair
    of valid candidates whose stage levels differ (``train.stage_levels``: how far each source got
    in the cascade, e.g. exposed > ``rank_neg`` > ``prerank_neg`` > ``global_neg``) adds the logistic
    loss of ordering them, the further one above. Mean over such pairs; 0 without any."""
    table = torch.tensor(
        [float(levels.get(g, 0)) for g in GROUPS] + [float(levels.get("expose_pos", 0))],
        device=logits.device,
    )
    level = table[col_group]  # col_group -1 (the positive) reads the last entry
    above = level[:, None] > level[None, :]  # [C, C]: column i got further than column j
    s = logits.float()
    # an invalid cell's logit is -inf where it is the lower one and +inf where it is the higher one:
    # each of its pairs' softplus is exactly 0 with a 0 gradient, so the pair mask is ``above``
    # alone (no [B, C, C] validity masks); the pairs are counted by a matmul
    lower = s.masked_fill(~valid, float("-inf"))[:, None, :]  # s_j
    higher = s.masked_fill(~valid, float("inf"))[:, :, None]  # s_i
    above_f = above.float()  # a float mask: torch.where is ~4x a mul on CPU
    loss = F.softplus(lower - higher) * above_f  # [B, i, j]: -log sigmoid(s_i - s_j)
    v = valid.float()
    pairs = ((v @ above_f) * v).sum()  # sum over anchors of v_i above_ij v_j
    return loss.sum() / pairs.clamp(min=1)
