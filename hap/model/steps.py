"""One training step, its gradient-conflict diagnostics, the validation metric, and the timing of
real steps the benchmarks use."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.profiler import record_function

from hap.core.config import Config
from hap.model.batches import GROUPS, Batch, TrainData
from hap.model.distill import fullflow_term
from hap.model.losses import (
    difficulty_masks,
    group_losses,
    group_losses_grid,
    mixed_bce,
    mixed_infonce,
    pcgrad_combine,
    stage_loss,
)
from hap.model.member import Member, build_members
from hap.model.stream import StreamingTrainData
from hap.model.towers import forward


def variant_loss(
    cfg: Config,
    logits: torch.Tensor,
    b: Batch,
    valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The configured loss as one scalar (GHCL with fixed group weights; uniform if none given)."""
    valid = b.valid if valid is None else valid
    if cfg.train.loss == "mixed_bce":
        return mixed_bce(logits, valid)
    if cfg.train.loss == "mixed_infonce":
        return mixed_infonce(logits, valid, cfg.train.temperature)
    losses, present = group_losses(logits, valid, b.col_group, cfg.train.temperature, cfg.train.bce_weight)
    w = present.float() if weights is None else weights * present
    return (w * losses).sum() / w.sum().clamp(min=1e-12)


def stage_term(cfg: Config, logits: torch.Tensor, b: Batch) -> torch.Tensor | None:
    """``train.stage_weight`` x the stage-label loss (``losses.stage_loss``), or None when off."""
    if cfg.train.stage_weight <= 0 or not cfg.train.stage_levels:
        return None
    return cfg.train.stage_weight * stage_loss(logits, b.valid, b.col_group, cfg.train.stage_levels)


# the parts of a step, as ``torch.profiler`` labels: ``bench/bench_model.py`` reports each one's share
PARTS = ("forward", "harmonize", "backward", "optimizer", "averaging")


def _part(name: str) -> record_function:
    return record_function(f"train.{name}")


def train_step(cfg: Config, m: Member, b: Batch, device: torch.device, world: int, step: int) -> float:
    with _part("forward"):
        fullflow = fullflow_term(cfg, m.net, b.fullflow, device) if b.fullflow is not None else None
        b = m.view(b)
        m.zero_grad()
        logits = forward(m.net, b, device)
        aux = stage_term(cfg, logits, b)
        aux = fullflow if aux is None else aux if fullflow is None else aux + fullflow
        if cfg.train.loss == "ghcl":
            losses, present, grid = group_losses_grid(
                logits, b.valid, b.col_group, cfg.train.temperature, cfg.train.bce_weight
            )
    if cfg.train.loss != "ghcl":
        loss = variant_loss(cfg, logits, b)
        loss = loss if aux is None else loss + aux
        with _part("backward"):
            loss.backward()
    elif cfg.train.harmonization == "pcgrad":
        loss = (losses * present).sum() / present.sum().clamp(min=1)
        loss = loss if aux is None else loss + aux
        with _part("backward"):
            loss.backward(retain_graph=True)  # embeddings (and DDP's all-reduce) from the mean loss
        with _part("harmonize"):
            shared = m.raw.shared_parameters()
            idx = [i for i in range(len(losses)) if bool(present[i])]
            grads = [list(torch.autograd.grad(losses[i], shared, retain_graph=True)) for i in idx]
            merged = pcgrad_combine(grads, torch.Generator().manual_seed(cfg.train.seed + step))
            if aux is not None:  # the stage loss is not a GHCL group: added after the projection
                extra = torch.autograd.grad(aux, shared, allow_unused=True)
                merged = [g if e is None else g + e for g, e in zip(merged, extra)]
            for p, g in zip(shared, merged):
                if world > 1:
                    tdist.all_reduce(g)
                    g /= world
                p.grad = g.to(p.dtype)
            m.last_weights = present.float() / present.sum()
    else:
        with _part("harmonize"):
            w = m.harm.weights(losses, present, logits, grid)
            m.last_weights = w
        loss = (w * losses).sum()
        loss = loss if aux is None else loss + aux
        with _part("backward"):
            loss.backward()
    with _part("optimizer"):
        m.raw.zero_padding_grad()
        m.opt.step()
    with _part("averaging"):
        m.averaged_step()
    return float(loss.detach())


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def diagnostics(cfg: Config, m: Member, b: Batch, device: torch.device) -> dict[str, float]:
    """Gradient conflict on the shared dense parameters of ``m`` for this batch: the cosine between
    the loss restricted to (positives + easy negatives) and to (positives + hard negatives), and the
    gradient norm of each group's share of the loss. Same definition for every loss variant."""
    b = m.view(b)
    logits = forward(m.raw, b, device)
    params = m.raw.shared_parameters()
    masks = difficulty_masks(b.col_group)
    out: dict[str, float] = {}
    w = m.last_weights
    parts = {}
    for name in ("easy", "hard"):
        valid = b.valid & masks[name][None]
        if bool(valid[:, 1:].any()):
            parts[name] = _flat_grad(variant_loss(cfg, logits, b, valid, w), params)
    if len(parts) == 2:
        out["cos_easy_hard"] = float(
            torch.nn.functional.cosine_similarity(parts["easy"], parts["hard"], dim=0)
        )
    for gi, g in enumerate(GROUPS):
        valid = b.valid & ((b.col_group == gi) | (b.col_group < 0))[None]
        if bool(valid[:, 1:].any()):
            out[f"grad_norm/{g}"] = float(_flat_grad(variant_loss(cfg, logits, b, valid, w), params).norm())
    if w is not None and cfg.train.loss == "ghcl":
        for gi, g in enumerate(GROUPS):
            out[f"weight/{g}"] = float(w[gi])
    return out


@torch.no_grad()
def validate(m: Member, batches: list[Batch], device: torch.device) -> tuple[float, np.ndarray]:
    """Mean over groups of P(s_pos > s_neg) on validation anchors; also every valid light score.
    Measures ``m.scored``: the averaged weights when training averages them."""
    hits = torch.zeros(len(GROUPS), dtype=torch.float64)
    tot = torch.zeros(len(GROUPS), dtype=torch.float64)
    scores = []
    for b in batches:
        b = m.view(b.to(device))
        s = forward(m.scored, b, device)
        onehot = (
            torch.nn.functional.one_hot(b.col_group.clamp(min=0), len(GROUPS)).double()
            * (b.col_group >= 0)[:, None]
        )
        win = ((s[:, :1] > s) & b.valid).double()
        hits += (win @ onehot).sum(0).cpu()
        tot += (b.valid.double() @ onehot).sum(0).cpu()
        scores.append(s[b.valid].cpu().numpy())
    present = tot > 0
    metric = float((hits[present] / tot[present]).mean()) if present.any() else 0.0
    return metric, np.concatenate(scores) if scores else np.zeros(0, np.float32)


@dataclass
class StepTiming:
    tower: str
    seconds: float  # the timed steps, batch assembly included
    steps: int
    cells: int  # candidate samples trained on (valid grid cells)
    requests: int  # anchors: one user-tower pass each
    grid_cells: int = 0  # candidate slots the towers ran on (valid or not), full-flow requests included
    user_passes: int = 0  # user-tower passes: anchors plus full-flow requests
    assembly_seconds: float = 0.0  # of ``seconds``: building the batches and their full-flow requests
    parts: dict[str, float] = field(default_factory=dict)  # share of a step in each of ``PARTS`` + assembly


def time_training_steps(
    cfg: Config,
    data: TrainData | StreamingTrainData,
    tower: str,
    steps: int,
    device: torch.device,
    warmup: int = 3,
    profiled: int = 0,
) -> StepTiming:
    """Wall time of ``steps`` real training steps of one tower as ``hap train`` runs them (its data
    class's batches, each with the step's full-flow requests when the data has them), after
    ``warmup`` untimed ones: the unit ``bench/`` turns into samples/s and achieved FLOP/s. With
    ``profiled`` > 0, that many more steps run under ``torch.profiler`` for each part's share."""
    member = next(
        m
        for m in build_members(cfg.updated({"train.expressive_groups": "all"}), data, device, 1)
        if m.name == tower
    )
    member.raw.train()
    stream = _stream(data, device)
    assembly = 0.0

    def batch(i: int) -> Batch:
        """Step ``i``'s batch as ``train_epoch`` hands it over; its building time is ``assembly``."""
        nonlocal assembly
        t = time.perf_counter()
        b = next(stream)
        if data.fullflow is not None:
            b.fullflow = data.fullflow.batch(i)
        assembly += time.perf_counter() - t
        return b

    for i in range(warmup):
        train_step(cfg, member, batch(i), device, 1, i)
    _sync(device)
    cells = requests = grid = passes = 0
    assembly = 0.0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        b = batch(i)
        cells, requests = cells + int(b.valid.sum()), requests + b.size
        grid, passes = grid + b.valid.numel(), passes + b.size
        if b.fullflow is not None and cfg.train.fullflow_weight > 0:
            grid, passes = grid + b.fullflow.batch.valid.numel(), passes + b.fullflow.batch.size
        train_step(cfg, member, b, device, 1, i)
    _sync(device)
    timing = StepTiming(tower, time.perf_counter() - t0, steps, cells, requests, grid, passes, assembly)
    if profiled:
        assembly = 0.0
        batches = [batch(i) for i in range(warmup + steps, warmup + steps + profiled)]
        timing.parts = _part_shares(cfg, member, batches, assembly, device)
    return timing


def _stream(data: TrainData | StreamingTrainData, device: torch.device) -> Iterator[Batch]:
    """The training batches epoch after epoch, built as they are asked for."""
    for epoch in itertools.count():
        for b in data.batches(epoch, "train"):
            yield b.to(device)


def _part_shares(
    cfg: Config, member: Member, batches: list[Batch], assembly: float, device: torch.device
) -> dict[str, float]:
    """Each part's share of ``batches``' steps (profiled CPU time), batch assembly included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, b in enumerate(batches):
            train_step(cfg, member, b, device, 1, i)
    seconds = {p: 0.0 for p in PARTS}
    for event in prof.key_averages():
        name = event.key.removeprefix("train.")
        if event.key.startswith("train.") and name in seconds:
            seconds[name] += event.cpu_time_total / 1e6
    seconds["assembly"] = assembly
    total = sum(seconds.values())
    return {p: s / total for p, s in seconds.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
