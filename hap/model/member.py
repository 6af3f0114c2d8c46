"""The towers being trained: the device, the process group, and one ``Member`` per model (its
optimizer, harmonizer and early-stopping state); ``served_view`` is the batch as the served expressive
model meets it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hap.core.config import Config
from hap.core.errors import HapError
from hap.model.batches import EASY_GROUP_IDS, HARD_GROUP_IDS, Batch, TrainData
from hap.model.losses import Harmonizer
from hap.model.stream import StreamingTrainData
from hap.model.towers import attach_grad_sink, build_models


# ---- device and distributed ------------------------------------------------------------------------
def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise HapError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def usable_cpus() -> float:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (a container's
    limit, which ``os.cpu_count`` and torch's default do not see)."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, float(quota) / float(period))
    return max(cpus, 1.0)


def training_threads(setting: int | str, local_ranks: int = 1) -> int | None:
    """The intra-op threads of one training process (None: leave torch's default).

    ``auto`` (the default, chosen by ``bench/bench_threads.py``, ``bench/results/threads.md``): the
    usable CPUs shared by this machine's DDP ranks, or 1 thread when other work already holds the
    machine (the 1-minute load average, less this process's own share, reaches half the CPUs):
    OpenMP threads that wait on cores other processes hold spin, and were measured 2-4x slower
    than one thread. A number is used as given; 0 is torch's default."""
    if setting != "auto":
        return int(setting) or None
    cpus = usable_cpus()
    others = os.getloadavg()[0] - 1.0 if hasattr(os, "getloadavg") else 0.0
    if others >= cpus / 2:
        return 1
    return max(1, int(cpus) // max(local_ranks, 1))


def dist_setup(cfg: Config) -> tuple[int, int, int]:
    """(rank, world, local_rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not tdist.is_initialized():
        use_nccl = torch.cuda.is_available() and cfg.train.device != "cpu"
        tdist.init_process_group("nccl" if use_nccl else "gloo")
    return tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def warmed_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """An EMA whose decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the n updates so far:
    a short run (a tiny world, a few dozen steps) is not left averaging its initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: Any) -> None:
        n = float(n)
        get_ema_multi_avg_fn(min(decay, (1.0 + n) / (10.0 + n)))(averaged, current, n)

    return update


# ---- one model being trained -----------------------------------------------------------------------
class Member:
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
        # Polyak/EMA weights: what validation and the bundle see when train.ema_decay > 0 (buffers,
        # e.g. the behaviour lookup fitted before training, are copied once and never averaged)
        self.avg: AveragedModel | None = None
        self.ema_decay = cfg.train.ema_decay
        self._avg_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        if cfg.train.ema_decay > 0:
            self.avg = AveragedModel(self.raw, multi_avg_fn=warmed_ema(cfg.train.ema_decay))
        # one process: the embedding table's lookups add their gradients into one kept buffer
        # (``towers.sunk_rows``), attached after the average copied the model (it trains no table)
        self.table_grad: torch.Tensor | None = None
        if world == 1 and isinstance(getattr(self.raw, "emb", None), nn.Embedding):
            self.table_grad = attach_grad_sink(self.raw.emb.weight)
        self.last_weights: torch.Tensor | None = None
        self.best_metric, self.best_epoch, self.bad, self.done = -1.0, -1, 0, False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_metric, self.last_epoch = -1.0, -1  # the last validation (train.keep: last)
        self.scout: nn.Module | None = None  # "served": the light model that picks the easy negatives
        self.easy_top = cfg.train.expressive_easy_top

    def zero_grad(self) -> None:
        """Clear the gradients before a step's backward, the table's sink included."""
        self.opt.zero_grad(set_to_none=True)
        if self.table_grad is not None:
            self.table_grad.zero_()

    @property
    def scored(self) -> nn.Module:
        """The weights validation measures and the bundle keeps: the average when there is one."""
        return self.avg.module if self.avg is not None else self.raw

    def averaged_step(self) -> None:
        """Fold the weights after an optimizer step into the average (no-op without averaging):
        ``AveragedModel.update_parameters`` with ``warmed_ema``'s arithmetic, as one foreach copy or
        lerp over parameter lists built once (its per-step regrouping of the tensors was most of
        the averaging part of a light step on CPU)."""
        if self.avg is None:
            return
        if self._avg_pairs is None:
            self._avg_pairs = (
                [p.detach() for p in self.avg.module.parameters()],
                [p.detach() for p in self.raw.parameters()],
            )
        averaged, current = self._avg_pairs
        n = int(self.avg.n_averaged)
        with torch.no_grad():
            if n == 0:
                torch._foreach_copy_(averaged, current)
            else:
                torch._foreach_lerp_(averaged, current, 1.0 - min(self.ema_decay, (1.0 + n) / (10.0 + n)))
            self.avg.n_averaged += 1

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
            "avg": self.avg.state_dict() if self.avg is not None else None,
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
        if self.avg is not None:
            self.avg.load_state_dict(s["avg"])


@torch.no_grad()
def served_view(light: nn.Module, b: Batch, easy_top: int) -> Batch:
    """The batch as the expressive model meets it when served: every hard negative, plus per anchor
    the ``easy_top`` easy negatives the light model scores highest (the ones it would route)."""
    easy = torch.isin(b.col_group, torch.tensor(EASY_GROUP_IDS, device=b.col_group.device))
    s = light(b.req_cat, b.req_dense, b.seq, b.item_cat, b.item_dense, b.cross).float()
    s = s.masked_fill(~(b.valid & easy[None]), float("-inf"))
    top = s.topk(min(easy_top, int(easy.sum())), dim=1).indices
    picked = torch.zeros_like(b.valid).scatter_(1, top, True) & b.valid & easy[None]
    return dataclasses.replace(b, valid=(b.valid & ~easy[None]) | picked)


def build_members(
    cfg: Config, data: TrainData | StreamingTrainData, device: torch.device, world: int
) -> list[Member]:
    torch.manual_seed(cfg.train.seed)
    light, expressive = build_models(cfg.model.model_dump(mode="json"))
    if cfg.model.behaviour_features:  # every row: train and validation see one lookup
        for item_cat in data.item_cat_chunks():
            for tower in (light, expressive):
                tower.fit_behaviour_lookup(item_cat)
    members = [Member("light", light, cfg, None, device, world)]
    if cfg.train.expressive_groups != "none":
        keep = None
        if cfg.train.expressive_groups == "hard":
            keep = (data.col_group < 0) | torch.isin(data.col_group, torch.tensor(HARD_GROUP_IDS))
        members.append(Member("expressive", expressive, cfg, keep, device, world))
        if cfg.train.expressive_groups == "served":
            members[-1].scout = light
    return members
