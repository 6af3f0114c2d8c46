"""``hap train --date D``: train the HAP towers on the day's training set and write the bundle.

- The light model trains on every group; the expressive model on the hard groups only
  (``train.expressive_groups: hard``; ``all`` gives the ``expressive_all`` baseline).
- Loss: ``train.loss`` (``ghcl`` | ``mixed_bce`` | ``mixed_infonce``) with ``train.harmonization``.
- Device: CUDA when present (bf16 autocast), else CPU, deterministic for a seed.
- Early stopping per model on a request-level validation split (mean per-group pairwise accuracy of
  the positive over its negatives), a checkpoint every ``train.checkpoint_every`` epochs, and
  ``resume=True`` continues from the last one: batches depend only on (seed, epoch), so a resumed
  run reproduces an uninterrupted one.
- Gradient-conflict diagnostics every ``train.diagnostics_every`` steps: cosine between the
  easy-group and hard-group gradients on the shared dense parameters, and per-group gradient norms.
- Input: ``hap.model.stream`` streams the training set shard by shard (a day's request-hash
  bucket), so a window larger than memory trains. Under ``torchrun`` (``WORLD_SIZE > 1``) each rank
  reads its own shards, every rank runs the same number of steps, and gradients are averaged by
  ``DistributedDataParallel`` (gloo on CPU). An in-memory ``TrainData`` (benchmarks) keeps the
  older scheme: every rank builds the same global batch and trains on its slice of anchors.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from hap.core import layout
from hap.core.atomic import atomic_dir, atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError, NonFiniteData, WriteFailed
from hap.model.batches import EASY_GROUP_IDS, GROUPS, HARD_GROUP_IDS, Batch, TrainData
from hap.model.calibration import calibrate_towers
from hap.model.losses import (
    Harmonizer,
    difficulty_masks,
    group_losses,
    mixed_bce,
    mixed_infonce,
    pcgrad_combine,
)
from hap.model.routing import calibrate_threshold
from hap.model.stream import StreamingTrainData
from hap.model.towers import build_models, save_bundle

CKPT_FILE = layout.CHECKPOINT_FILE


@dataclass
class TrainResult:
    date: str
    bundle_dir: str
    device: str
    world_size: int
    epochs_run: int
    best_epoch: dict[str, int]
    val_metric: dict[str, float]
    train_seconds: float
    samples_per_second: float  # candidate samples (valid grid cells) per second, all models
    anchors: int
    resumed_from_epoch: int | None = None
    diagnostics_summary: dict[str, float] = field(default_factory=dict)

    def render(self) -> str:
        vm = ", ".join(f"{k}={v:.4f}" for k, v in self.val_metric.items())
        return (
            f"trained {self.date} on {self.device} x{self.world_size}: {self.epochs_run} epochs, val {vm}, "
            f"{self.samples_per_second:,.0f} samples/s -> {self.bundle_dir}"
        )


# ---- device and distributed ------------------------------------------------------------------------
def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise HapError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _dist_setup(cfg: Config) -> tuple[int, int, int]:
    """(rank, world, local_rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not tdist.is_initialized():
        use_nccl = torch.cuda.is_available() and cfg.train.device != "cpu"
        tdist.init_process_group("nccl" if use_nccl else "gloo")
    return tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


# ---- one model being trained -----------------------------------------------------------------------
class _Member:
    def __init__(
        self,
        name: str,
        model: nn.Module,
        cfg: Config,
        keep: torch.Tensor | None,
        device: torch.device,
        world: int,
    ) -> None:
        self.name, self.raw, self.keep = name, model.to(device), keep
        self.net: nn.Module = self.raw
        # fused: one kernel per step instead of a pass per Adam op over the hashed embedding table,
        # which every step touches in full (its gradient is table-sized): ~1.2x light steps on CPU
        self.opt = torch.optim.Adam(
            self.raw.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
        )
        if world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.raw, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.harm = Harmonizer(cfg.train.harmonization)
        self.last_weights: torch.Tensor | None = None
        self.best_metric, self.best_epoch, self.bad, self.done = -1.0, -1, 0, False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.scout: nn.Module | None = None  # "served": the light model that picks the easy negatives
        self.easy_top = cfg.train.expressive_easy_top

    def view(self, b: Batch) -> Batch:
        if self.scout is not None:
            return served_view(self.scout, b, self.easy_top)
        return b.columns(self.keep.to(b.col_group.device)) if self.keep is not None else b

    def state(self) -> dict[str, Any]:
        return {
            "model": self.raw.state_dict(),
            "opt": self.opt.state_dict(),
            "harm": self.harm.state_dict(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad": self.bad,
            "done": self.done,
            "best_state": self.best_state,
        }

    def load(self, s: dict[str, Any]) -> None:
        self.raw.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.harm.load_state_dict(s["harm"])
        self.best_metric, self.best_epoch, self.bad, self.done = (
            s["best_metric"],
            s["best_epoch"],
            s["bad"],
            s["done"],
        )
        self.best_state = s["best_state"]


@torch.no_grad()
def served_view(light: nn.Module, b: Batch, easy_top: int) -> Batch:
    """The batch as the expressive model meets it when served: every hard negative, plus per anchor
    the ``easy_top`` easy negatives the light model scores highest (the ones it would route)."""
    easy = torch.isin(b.col_group, torch.tensor(EASY_GROUP_IDS, device=b.col_group.device))
    s = light(b.req_cat, b.req_dense, b.seq, b.item_cat, b.item_dense).float()
    s = s.masked_fill(~(b.valid & easy[None]), float("-inf"))
    top = s.topk(min(easy_top, int(easy.sum())), dim=1).indices
    picked = torch.zeros_like(b.valid).scatter_(1, top, True) & b.valid & easy[None]
    return dataclasses.replace(b, valid=(b.valid & ~easy[None]) | picked)


def _forward(net: nn.Module, b: Batch, device: torch.device) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return net(b.req_cat, b.req_dense, b.seq, b.item_cat, b.item_dense).float()


def _variant_loss(
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


def _train_step(cfg: Config, m: _Member, b: Batch, device: torch.device, world: int, step: int) -> float:
    b = m.view(b)
    m.opt.zero_grad(set_to_none=True)
    logits = _forward(m.net, b, device)
    if cfg.train.loss != "ghcl":
        loss = _variant_loss(cfg, logits, b)
        loss.backward()
    else:
        losses, present = group_losses(
            logits, b.valid, b.col_group, cfg.train.temperature, cfg.train.bce_weight
        )
        if cfg.train.harmonization == "pcgrad":
            loss = (losses * present).sum() / present.sum().clamp(min=1)
            loss.backward(retain_graph=True)  # embeddings (and DDP's all-reduce) from the mean loss
            shared = m.raw.shared_parameters()
            idx = [i for i in range(len(losses)) if bool(present[i])]
            grads = [
                list(torch.autograd.grad(losses[i], shared, retain_graph=k < len(idx) - 1))
                for k, i in enumerate(idx)
            ]
            merged = pcgrad_combine(grads, torch.Generator().manual_seed(cfg.train.seed + step))
            for p, g in zip(shared, merged):
                if world > 1:
                    tdist.all_reduce(g)
                    g /= world
                p.grad = g.to(p.dtype)
            m.last_weights = present.float() / present.sum()
        else:
            w = m.harm.weights(losses, present, logits)
            m.last_weights = w
            loss = (w * losses).sum()
            loss.backward()
    m.opt.step()
    return float(loss.detach())


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def diagnostics(cfg: Config, m: _Member, b: Batch, device: torch.device) -> dict[str, float]:
    """Gradient conflict on the shared dense parameters of ``m`` for this batch: the cosine between
    the loss restricted to (positives + easy negatives) and to (positives + hard negatives), and the
    gradient norm of each group's share of the loss. Same definition for every loss variant."""
    b = m.view(b)
    logits = _forward(m.raw, b, device)
    params = m.raw.shared_parameters()
    masks = difficulty_masks(b.col_group)
    out: dict[str, float] = {}
    w = m.last_weights
    parts = {}
    for name in ("easy", "hard"):
        valid = b.valid & masks[name][None]
        if bool(valid[:, 1:].any()):
            parts[name] = _flat_grad(_variant_loss(cfg, logits, b, valid, w), params)
    if len(parts) == 2:
        out["cos_easy_hard"] = float(
            torch.nn.functional.cosine_similarity(parts["easy"], parts["hard"], dim=0)
        )
    for gi, g in enumerate(GROUPS):
        valid = b.valid & ((b.col_group == gi) | (b.col_group < 0))[None]
        if bool(valid[:, 1:].any()):
            out[f"grad_norm/{g}"] = float(_flat_grad(_variant_loss(cfg, logits, b, valid, w), params).norm())
    if w is not None and cfg.train.loss == "ghcl":
        for gi, g in enumerate(GROUPS):
            out[f"weight/{g}"] = float(w[gi])
    return out


@torch.no_grad()
def validate(m: _Member, batches: list[Batch], device: torch.device) -> tuple[float, np.ndarray]:
    """Mean over groups of P(s_pos > s_neg) on validation anchors; also every valid light score."""
    hits = torch.zeros(len(GROUPS), dtype=torch.float64)
    tot = torch.zeros(len(GROUPS), dtype=torch.float64)
    scores = []
    for b in batches:
        b = m.view(b.to(device))
        s = _forward(m.raw, b, device)
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


# ---- the loop -------------------------------------------------------------------------------------
def _members(
    cfg: Config, data: TrainData | StreamingTrainData, device: torch.device, world: int
) -> list[_Member]:
    torch.manual_seed(cfg.train.seed)
    light, expressive = build_models(cfg.model.model_dump(mode="json"))
    if cfg.model.behaviour_features:  # every row: train and validation see one lookup
        for item_cat in data.item_cat_chunks():
            for tower in (light, expressive):
                tower.fit_behaviour_lookup(item_cat)
    members = [_Member("light", light, cfg, None, device, world)]
    if cfg.train.expressive_groups != "none":
        keep = None
        if cfg.train.expressive_groups == "hard":
            keep = (data.col_group < 0) | torch.isin(data.col_group, torch.tensor(HARD_GROUP_IDS))
        members.append(_Member("expressive", expressive, cfg, keep, device, world))
        if cfg.train.expressive_groups == "served":
            members[-1].scout = light
    return members


@dataclass
class StepTiming:
    tower: str
    seconds: float
    steps: int
    cells: int  # candidate samples trained on (valid grid cells)
    requests: int  # anchors: one user-tower pass each


def time_training_steps(
    cfg: Config,
    data: TrainData | StreamingTrainData,
    tower: str,
    steps: int,
    device: torch.device,
    warmup: int = 3,
) -> StepTiming:
    """Wall time of ``steps`` real training steps (``_train_step``) of one tower, after ``warmup``
    untimed ones: the unit ``bench/`` turns into samples/s and achieved FLOP/s."""
    member = next(
        m
        for m in _members(cfg.updated({"train.expressive_groups": "all"}), data, device, 1)
        if m.name == tower
    )
    member.raw.train()
    batches = [b.to(device) for b in data.batches(0, "train")]
    batches = (batches * (1 + (steps + warmup) // max(len(batches), 1)))[: steps + warmup]
    for i, b in enumerate(batches[:warmup]):
        _train_step(cfg, member, b, device, 1, i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = batches[warmup:]
    cells, requests = sum(int(b.valid.sum()) for b in timed), sum(b.size for b in timed)
    t0 = time.perf_counter()
    for i, b in enumerate(timed):
        _train_step(cfg, member, b, device, 1, warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return StepTiming(tower, time.perf_counter() - t0, steps, cells, requests)


def _save_ckpt(path: Path, payload: dict[str, Any]) -> None:
    """Write the checkpoint by rename; a full disk leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(path, err) from None


# Keys that never change the weights of the epochs already trained: a checkpoint written under
# other values of these is the same model state.
_RESUME_NEUTRAL = ("epochs", "checkpoint_every", "num_threads", "device", "diagnostics_every")


def config_hash(cfg: Config) -> str:
    """Hash of the configuration that shapes the weights (the model and train sections)."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _RESUME_NEUTRAL}
    payload = {"model": cfg.model.model_dump(mode="json"), "train": train}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(HapError):
    """``--resume`` found a checkpoint of another training set or configuration."""


@dataclass
class _Progress:
    """What the loop carries from epoch to epoch, and what a checkpoint restores."""

    epoch: int = 0  # the next epoch to run
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    diag: list[dict[str, Any]] = field(default_factory=list)
    resumed: int | None = None
    cells: int = 0


@dataclass(frozen=True)
class _Where:
    device: torch.device
    rank: int
    world: int
    date: str = ""  # the training day, named by a non-finite-loss error
    rank_local: bool = False  # each rank's batches are its own shards' (no slicing of a global batch)


def _fmt(prefix: str, row: dict[str, Any], spec: str) -> str:
    return prefix + " ".join(
        f"{k}={v:{spec}}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
    )


def binding(cfg: Config, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint belongs to: the training set's data version and the config hash."""
    return {"data_version": (meta or {}).get("data_version"), "config_hash": config_hash(cfg)}


def restore(ckpt: Path, members: list[_Member], bound: dict[str, Any], device: torch.device) -> _Progress:
    """Load the checkpoint into ``members``; refuse one written for other data or config."""
    state = torch.load(ckpt, map_location=device, weights_only=True)
    for key, want in bound.items():
        if state.get(key) != want:
            raise CheckpointMismatch(
                f"checkpoint {ckpt} was written for {key} {state.get(key)}, this run has {want}; "
                "train without --resume to start over"
            )
    for m in members:
        m.load(state["members"][m.name])
    return _Progress(
        state["epoch"] + 1, state["step"], state["history"], state["diagnostics"], state["epoch"]
    )


def train_step_all(
    cfg: Config, active: list[_Member], gb: Batch, p: _Progress, w: _Where, light: _Member | None = None
) -> dict[str, float]:
    """One global batch for every still-training member; each member's loss (diagnostics: light)."""
    b = gb.shard(w.rank, w.world).to(w.device) if w.world > 1 and not w.rank_local else gb.to(w.device)
    members0 = light if light is not None else active[0]
    losses = {m.name: _train_step(cfg, m, b, w.device, w.world, p.step) for m in active}
    p.cells += sum(int(m.view(b).valid.sum()) for m in active)
    p.step += 1
    if cfg.train.diagnostics_every > 0 and p.step % cfg.train.diagnostics_every == 0 and w.rank == 0:
        p.diag.append({"step": p.step, "epoch": p.epoch, **diagnostics(cfg, members0, b, w.device)})
    return losses


def train_epoch(
    cfg: Config, data: TrainData | StreamingTrainData, members: list[_Member], p: _Progress, w: _Where
) -> dict[str, float]:
    """One pass over the epoch's batches; the mean loss of each member."""
    active = [m for m in members if not m.done]
    for m in active:
        m.raw.train()
    sums, n = {m.name: 0.0 for m in active}, 0
    for gb in data.batches(p.epoch, "train"):
        for name, loss in train_step_all(cfg, active, gb, p, w, members[0]).items():
            if not math.isfinite(loss):  # a NaN loss poisons every weight: stop, write nothing
                raise NonFiniteData(
                    f"train: the {name} loss is not finite at epoch {p.epoch}, step {p.step}; "
                    "no bundle is written",
                    date=w.date,
                    step="train",
                    check="finite_loss",
                )
            sums[name] += loss
        n += 1
    return {name: s / max(n, 1) for name, s in sums.items()}


def eval_step(cfg: Config, m: _Member, val: list[Batch], epoch: int, device: torch.device) -> float:
    """Validate one member and update its early-stopping state (best weights, patience)."""
    m.raw.eval()
    metric, _ = validate(m, val, device)
    if metric > m.best_metric + 1e-6:
        m.best_metric, m.best_epoch, m.bad = metric, epoch, 0
        m.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in m.raw.state_dict().items()})
    else:
        m.bad += 1
        m.done = m.bad >= cfg.train.patience
    return metric


def train_loop(
    cfg: Config,
    data: TrainData | StreamingTrainData,
    members: list[_Member],
    p: _Progress,
    w: _Where,
    ckpt: Path | None,
    bound: dict[str, Any],
    say: Any,
) -> None:
    """Epochs until ``train.epochs`` or until every member stopped early; a checkpoint every N."""
    val = data.batches(0, "val")
    while p.epoch < cfg.train.epochs:
        active = [m for m in members if not m.done]
        if not active:
            break
        n_diag = len(p.diag)
        losses = train_epoch(cfg, data, members, p, w)
        for d in p.diag[n_diag:]:
            say(_fmt("diag ", d, ".4g"))
        row: dict[str, Any] = {"epoch": p.epoch}
        for m in active:
            row[f"{m.name}/train_loss"] = losses[m.name]
            row[f"{m.name}/val_pairwise_acc"] = eval_step(cfg, m, val, p.epoch, w.device)
        p.history.append(row)
        say(_fmt("epoch ", row, ".4f"))
        if ckpt is not None and w.rank == 0 and (p.epoch + 1) % cfg.train.checkpoint_every == 0:
            state = {"members": {m.name: m.state() for m in members}, **bound}
            state.update(epoch=p.epoch, step=p.step, history=p.history, diagnostics=p.diag)
            _save_ckpt(ckpt, state)
        p.epoch += 1


def write_bundle(
    cfg: Config,
    bundle_dir: Path,
    members: list[_Member],
    data: TrainData | StreamingTrainData,
    meta: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """The bundle folder, atomically: weights, ``bundle.json``, ``history.json``, ``diagnostics.json``.

    ``bundle.json`` holds no timings (they live in ``run.json``): its bytes are the model's
    identity, the same for the same data and config."""
    serve = cfg.routing.serve if cfg.train.expressive_groups != "none" else "light"
    bundle_meta = {
        **meta,
        "model": cfg.model.model_dump(mode="json"),
        "features": data.spec.to_dict(),
        "routing": {
            "mode": cfg.routing.mode,
            "rho": cfg.routing.rho,
            "cap": cfg.routing.cap,
            "threshold": extra["threshold"],
            "serve": serve,
            "merge": cfg.routing.merge,
        },
        "calibration": extra.get("calibration"),
        "train": cfg.train.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "groups": list(GROUPS),
        "hard_groups": [GROUPS[i] for i in HARD_GROUP_IDS],
        "easy_groups": [GROUPS[i] for i in EASY_GROUP_IDS],
        "result": {k: v for k, v in extra["result"].items() if k not in TIMING_FIELDS},
    }
    try:
        with atomic_dir(Path(bundle_dir)) as tmp:
            save_bundle(tmp, bundle_meta, members[0].raw, members[1].raw if len(members) > 1 else None)
            atomic_write_json(tmp / layout.HISTORY_FILE, extra["history"])
            atomic_write_json(
                tmp / layout.DIAGNOSTICS_FILE, {"summary": extra["diag_summary"], "steps": extra["diag"]}
            )
            atomic_write_json(tmp / TIMING_FILE, {k: extra["result"][k] for k in TIMING_FIELDS})
    except OSError as err:
        raise WriteFailed(bundle_dir, err) from None


TIMING_FILE = layout.RUN_FILE
TIMING_FIELDS = ("train_seconds", "samples_per_second", "resumed_from_epoch")


def fit(
    cfg: Config,
    data: TrainData | StreamingTrainData,
    bundle_dir: Path,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    log: bool = True,
) -> TrainResult:
    """Train on already-loaded ``data`` and write the bundle to ``bundle_dir`` (rank 0, atomically).

    The checkpoint is removed once the bundle is written: it only serves an interrupted run."""
    rank, world, local_rank = _dist_setup(cfg)
    w = _Where(pick_device(cfg, local_rank), rank, world, str((meta or {}).get("date", "")), data.rank_local)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    # CPU kernels are deterministic for a fixed thread count; torch.use_deterministic_algorithms
    # would only add 3-4x slower index_put paths here, so it is not set.
    say = (lambda *a: print(*a, flush=True)) if (log and rank == 0) else (lambda *a: None)
    members = _members(cfg, data, w.device, world)
    bound = binding(cfg, meta)
    ckpt = ckpt_dir / CKPT_FILE if ckpt_dir is not None else None
    p = _start(ckpt, resume, members, bound, w, say)
    t0 = time.perf_counter()
    train_loop(cfg, data, members, p, w, ckpt, bound, say)
    seconds = time.perf_counter() - t0
    _keep_best(members)
    _, val_light = validate(members[0], data.batches(0, "val"), w.device)
    threshold = calibrate_threshold(val_light, cfg.routing.rho)
    towers = [m.raw for m in members] + [None]
    calibration = calibrate_towers(cfg, towers[0], towers[1], data.spec, (meta or {}).get("date"), w.device)
    result = TrainResult(
        date=str((meta or {}).get("date", "")),
        bundle_dir=str(bundle_dir),
        device=str(w.device),
        world_size=world,
        epochs_run=len(p.history),
        best_epoch={m.name: m.best_epoch for m in members},
        val_metric={m.name: m.best_metric for m in members},
        train_seconds=seconds,
        samples_per_second=_all_ranks_sum(p.cells, world) / max(seconds, 1e-9),
        anchors=data.n_train_anchors,
        resumed_from_epoch=p.resumed,
        diagnostics_summary=summarize_diagnostics(p.diag),
    )
    if rank == 0:
        extra = {
            "threshold": threshold,
            "calibration": calibration,
            "result": asdict(result),
            "history": p.history,
            "diag": p.diag,
            "diag_summary": result.diagnostics_summary,
        }
        write_bundle(cfg, Path(bundle_dir), members, data, meta or {}, extra)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    if world > 1:
        tdist.barrier()
    return result


def _start(
    ckpt: Path | None, resume: bool, members: list[_Member], bound: dict[str, Any], w: _Where, say: Any
) -> _Progress:
    """Resume from the checkpoint when asked; otherwise a stale checkpoint is removed (rank 0)."""
    if ckpt is not None and resume and ckpt.exists():
        p = restore(ckpt, members, bound, w.device)
        say(f"resumed from checkpoint {ckpt} after epoch {p.resumed}")
        return p
    if ckpt is not None and ckpt.exists() and w.rank == 0:
        ckpt.unlink()
    return _Progress()


def _keep_best(members: list[_Member]) -> None:
    """Early stopping's choice: each tower goes back to its best validation epoch, in eval mode."""
    for m in members:
        if m.best_state is not None:
            m.raw.load_state_dict(m.best_state)
        m.raw.eval()


def _all_ranks_sum(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t)
    return float(t.item())


def summarize_diagnostics(diag: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each diagnostic over the run (what the paper-table compares across variants)."""
    keys = sorted({k for d in diag for k in d if k not in ("step", "epoch")})
    return {f"mean/{k}": float(np.mean([d[k] for d in diag if k in d])) for k in keys}


def train_day(cfg: Config, date: dt.date | str, resume: bool = False) -> TrainResult:
    """Train the day's bundle from ``layout.training_set(cfg, date)`` into ``layout.model_dir``."""
    from hap.data.versioning import data_version

    date = layout.day(date)
    path = layout.training_set(cfg, date)
    if not path.exists():
        raise HapError(f"no training set at {path}; run `hap split --date {date}` first")
    data = StreamingTrainData(
        cfg, path, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    )
    split_report = layout.split_meta(cfg, date)
    window = [d.isoformat() for d in layout.window(date, cfg.split.window_days)]
    eval_day = None
    if split_report.exists():
        rep = json.loads(split_report.read_text())
        window, eval_day = rep.get("window", window), rep.get("eval_day")
    meta = {
        "date": date.isoformat(),
        "window": window,
        "eval_day": eval_day,
        "data_version": data_version(cfg, date),
    }
    return fit(cfg, data, layout.model_dir(cfg, date), layout.checkpoint_dir(cfg, date), resume, meta)


def main() -> None:
    """``python -m hap.model.train --date D [--resume]``: the torchrun entry (same as ``hap train``)."""
    import argparse

    from hap.core.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--date", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    result = train_day(load_config(overrides=args.set), args.date, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.render())
    if tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
