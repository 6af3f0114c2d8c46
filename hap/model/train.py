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
  reads its own shards and trains on its share of the global batch (``train.batch_requests``), every
  rank runs the same number of steps, and gradients are averaged by ``DistributedDataParallel``
  (gloo on CPU): an epoch takes as many optimizer steps as on one process. An in-memory
  ``TrainData`` (benchmarks) keeps the older scheme: every rank builds the same global batch and
  trains on its slice of anchors.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from hap.core import layout
from hap.core.atomic import atomic_dir, atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError, NonFiniteData, WriteFailed
from hap.model.batches import EASY_GROUP_IDS, GROUPS, HARD_GROUP_IDS, Batch, TrainData
from hap.model.checkpoint import (  # noqa: F401  (config_hash, CheckpointMismatch: re-exported)
    CheckpointMismatch,
    Progress,
    binding,
    config_hash,
    restore,
    save_ckpt,
)
from hap.model.member import (  # noqa: F401
    Member,
    build_members,
    dist_setup,
    pick_device,
    served_view,
    training_threads,
)
from hap.model.routing import calibrate_threshold
from hap.model.serving import calibrate_towers
from hap.model.steps import (  # noqa: F401  (time_training_steps: re-exported for bench/)
    diagnostics,
    time_training_steps,
    train_step,
    validate,
)
from hap.model.stream import StreamingTrainData
from hap.model.towers import forward, save_bundle

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
    threads: int = 0  # intra-op threads per process (train.num_threads; a model's bits depend on it)

    def render(self) -> str:
        vm = ", ".join(f"{k}={v:.4f}" for k, v in self.val_metric.items())
        return (
            f"trained {self.date} on {self.device} x{self.world_size}: {self.epochs_run} epochs, val {vm}, "
            f"{self.samples_per_second:,.0f} samples/s -> {self.bundle_dir}"
        )


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


def train_step_all(
    cfg: Config, active: list[Member], gb: Batch, p: Progress, w: _Where, light: Member | None = None
) -> dict[str, float]:
    """One global batch for every still-training member; each member's loss (diagnostics: light)."""
    b = gb.shard(w.rank, w.world).to(w.device) if w.world > 1 and not w.rank_local else gb.to(w.device)
    members0 = light if light is not None else active[0]
    losses = {m.name: train_step(cfg, m, b, w.device, w.world, p.step) for m in active}
    p.cells += sum(int(m.view(b).valid.sum()) for m in active)
    p.step += 1
    if cfg.train.diagnostics_every > 0 and p.step % cfg.train.diagnostics_every == 0 and w.rank == 0:
        p.diag.append({"step": p.step, "epoch": p.epoch, **diagnostics(cfg, members0, b, w.device)})
    return losses


def train_epoch(
    cfg: Config, data: TrainData | StreamingTrainData, members: list[Member], p: Progress, w: _Where
) -> dict[str, float]:
    """One pass over the epoch's batches; the mean loss of each member."""
    active = [m for m in members if not m.done]
    for m in active:
        m.raw.train()
    sums, n = {m.name: 0.0 for m in active}, 0
    for gb in data.batches(p.epoch, "train"):
        if data.fullflow is not None:  # the step's full-flow requests (hap.model.distill)
            gb.fullflow = data.fullflow.batch(p.step)
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


def eval_step(cfg: Config, m: Member, val: list[Batch], epoch: int, device: torch.device) -> float:
    """Validate one member and update its early-stopping state (best weights, patience)."""
    m.raw.eval()
    m.scored.eval()
    metric, _ = validate(m, val, device)
    m.last_metric, m.last_epoch = metric, epoch
    if metric > m.best_metric + 1e-6:
        m.best_metric, m.best_epoch, m.bad = metric, epoch, 0
        m.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in m.scored.state_dict().items()})
    else:
        m.bad += 1
        m.done = m.bad >= cfg.train.patience and cfg.train.keep == "best"  # last: a fixed step count
    return metric


def train_loop(
    cfg: Config,
    data: TrainData | StreamingTrainData,
    members: list[Member],
    p: Progress,
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
            save_ckpt(ckpt, state)
        p.epoch += 1


def write_bundle(
    cfg: Config,
    bundle_dir: Path,
    members: list[Member],
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
            data.spec.cross.save(tmp)  # the profile serving reads (hap.model.cross)
            atomic_write_json(tmp / layout.HISTORY_FILE, extra["history"])
            atomic_write_json(
                tmp / layout.DIAGNOSTICS_FILE, {"summary": extra["diag_summary"], "steps": extra["diag"]}
            )
            atomic_write_json(tmp / TIMING_FILE, {k: extra["result"][k] for k in TIMING_FIELDS})
    except OSError as err:
        raise WriteFailed(bundle_dir, err) from None


TIMING_FILE = layout.RUN_FILE
TIMING_FIELDS = ("train_seconds", "samples_per_second", "resumed_from_epoch", "threads")


def router_population(
    light: Member, data: TrainData | StreamingTrainData, device: torch.device, val: np.ndarray
) -> np.ndarray:
    """The light scores the routing threshold is calibrated on: those of the population the router
    scores in service, every retrieved candidate of the window's full-flow requests (the training
    set's full-flow share), so that the threshold routes ``routing.rho`` of them on an undrifted
    day and monitoring's routed share means what the router does. Without full-flow rows, the
    validation samples (exposures and cascade negatives: harder than the router's candidates)."""
    flow = getattr(data, "fullflow", None)
    if flow is None:
        return val
    with torch.inference_mode():
        scores = [
            forward(light.scored, light.view(b.to(device)), device)[b.valid.to(device)].float().cpu().numpy()
            for b in flow.all_batches()
        ]
    return np.concatenate(scores) if scores else val


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
    rank, world, local_rank = dist_setup(cfg)
    w = _Where(pick_device(cfg, local_rank), rank, world, str((meta or {}).get("date", "")), data.rank_local)
    threads = training_threads(cfg.train.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    # CPU kernels are deterministic for a fixed thread count; torch.use_deterministic_algorithms
    # would only add 3-4x slower index_put paths here, so it is not set.
    say = (lambda *a: print(*a, flush=True)) if (log and rank == 0) else (lambda *a: None)
    members = build_members(cfg, data, w.device, world)
    bound = binding(cfg, meta)
    ckpt = ckpt_dir / CKPT_FILE if ckpt_dir is not None else None
    p = _start(ckpt, resume, members, bound, w, say)
    t0 = time.perf_counter()
    train_loop(cfg, data, members, p, w, ckpt, bound, say)
    seconds = time.perf_counter() - t0
    _keep_best(members, cfg.train.keep)
    if world > 1:
        refuse_diverged_replicas(members, w)
    _, val_light = validate(members[0], data.batches(0, "val"), w.device)
    threshold = calibrate_threshold(router_population(members[0], data, w.device, val_light), cfg.routing.rho)
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
        threads=torch.get_num_threads(),
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
    ckpt: Path | None, resume: bool, members: list[Member], bound: dict[str, Any], w: _Where, say: Any
) -> Progress:
    """Resume from the checkpoint when asked; otherwise a stale checkpoint is removed (rank 0)."""
    if ckpt is not None and resume and ckpt.exists():
        p = restore(ckpt, members, bound, w.device)
        say(f"resumed from checkpoint {ckpt} after epoch {p.resumed}")
        return p
    if ckpt is not None and ckpt.exists() and w.rank == 0:
        ckpt.unlink()
    return Progress()


def _keep_best(members: list[Member], keep: str = "best") -> None:
    """Early stopping's choice: each tower goes back to its best validation epoch (its averaged
    weights when training averages them), in eval mode; ``keep="last"``: the last epoch's weights."""
    for m in members:
        if keep == "last":
            m.raw.load_state_dict(m.scored.state_dict())
            m.best_metric, m.best_epoch = m.last_metric, m.last_epoch
        elif m.best_state is not None:
            m.raw.load_state_dict(m.best_state)
        m.avg = None  # from here on the tower itself is what is validated and saved
        m.raw.eval()


def weights_digest(model: torch.nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of every floating tensor of ``model``'s state, in float64."""
    parts = [
        torch.stack([t.double().sum(), t.double().square().sum()])
        for t in model.state_dict().values()
        if t.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def refuse_diverged_replicas(members: list[Member], w: _Where) -> None:
    """Under DDP every rank ends with the same towers: their gradients were averaged at every step
    and the buffers broadcast from rank 0, which alone writes the bundle. A rank whose weights differ
    trained apart (no gradient averaging, a step taken on one rank only), and rank 0's bundle would
    hold a model trained on its shards alone: every rank refuses before anything is written."""
    mine = torch.cat([weights_digest(m.raw) for m in members]).to(w.device)
    every = [torch.empty_like(mine) for _ in range(w.world)]
    tdist.all_gather(every, mine)
    first = every[0].cpu()
    for rank, theirs in enumerate(every[1:], start=1):
        if not torch.allclose(theirs.cpu(), first, rtol=1e-6, atol=1e-9):
            raise HapError(
                f"train: DDP rank {rank}'s towers differ from rank 0's after training (their gradients "
                "were not averaged); no bundle is written"
            )


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
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train_day(load_config(overrides=args.set), args.date, resume=args.resume)
    except HapError as err:  # an expected failure: one line (from rank 0), as `hap train` prints it
        if rank0:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    if rank0:
        print(result.render())


if __name__ == "__main__":
    main()
