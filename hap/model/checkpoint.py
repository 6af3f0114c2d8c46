"""Checkpoints: written by rename, bound to the training set's data version and the config hash,
and restored by ``--resume``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hap.core.config import Config
from hap.core.errors import HapError, WriteFailed
from hap.model.member import Member


def save_ckpt(path: Path, payload: dict[str, Any]) -> None:
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
_RESUME_NEUTRAL = (
    "epochs",
    "checkpoint_every",
    "num_threads",
    "device",
    "diagnostics_every",
    "shard_cache_mb",
)


def config_hash(cfg: Config) -> str:
    """Hash of the configuration that shapes the weights (the model and train sections)."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _RESUME_NEUTRAL}
    payload = {"model": cfg.model.model_dump(mode="json"), "train": train}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(HapError):
    """``--resume`` found a checkpoint of another training set or configuration."""


@dataclass
class Progress:
    """What the loop carries from epoch to epoch, and what a checkpoint restores."""

    epoch: int = 0  # the next epoch to run
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    diag: list[dict[str, Any]] = field(default_factory=list)
    resumed: int | None = None
    cells: int = 0


def binding(cfg: Config, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint belongs to: the training set's data version and the config hash."""
    return {"data_version": (meta or {}).get("data_version"), "config_hash": config_hash(cfg)}


def restore(ckpt: Path, members: list[Member], bound: dict[str, Any], device: torch.device) -> Progress:
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
    return Progress(state["epoch"] + 1, state["step"], state["history"], state["diagnostics"], state["epoch"])
