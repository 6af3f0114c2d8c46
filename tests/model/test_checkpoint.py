"""``hap train --resume``: a checkpoint continues only the run it was written for.

``hap.model.checkpoint.restore`` binds a checkpoint to the training set's ``data_version`` and to the
hash of the weight-shaping config; a resume under another of either is refused with
``CheckpointMismatch`` (a ``HapError``: through the CLI its exit code and one line, no traceback),
and leaves the day's bundle and the checkpoint as they were. A resume-neutral change
(``train.epochs``, ``train.num_threads``) continues from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPLIT_DATE, TINY_TOWERS, split_window, tiny_env, tiny_sets

from hap.core import layout
from hap.core.config import REPO_ROOT, Config

DATE = TINY_SPLIT_DATE
SETS = {
    "model.hash_buckets": 4096,
    **TINY_TOWERS,
    "train.epochs": 2,
    "train.checkpoint_every": 1,
    "train.batch_requests": 32,
    "train.diagnostics_every": 0,
    "train.num_threads": 1,
}


def hap_train(cfg: Config, **sets) -> subprocess.CompletedProcess[str]:
    """``hap --set ... train --date DATE --resume`` in a fresh process: ``SETS`` plus ``sets``."""
    cmd = [sys.executable, "-m", "hap.cli", *tiny_sets({**SETS, **sets}), "train"]
    return subprocess.run(
        [*cmd, "--date", DATE.isoformat(), "--resume"],
        env=tiny_env(cfg.paths.home),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones included): its content hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _interrupted(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hap train`` of ``cfg`` killed after its epochs, before the bundle: its checkpoint stays."""
    from hap.model import train

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    threads = torch.get_num_threads()
    with monkeypatch.context() as m:
        m.setattr(train, "write_bundle", killed)
        with pytest.raises(KeyboardInterrupt):
            train.train_day(cfg, DATE)
    torch.set_num_threads(threads)  # train.num_threads is process-wide


def test_a_resume_under_other_data_or_config_is_refused_and_a_neutral_one_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hap.data.split import build_training_set
    from hap.model.checkpoint import CheckpointMismatch
    from hap.model.train import CKPT_FILE, train_day

    cfg = split_window(tmp_path / "data", SETS, by="test_checkpoint")
    bundle_dir, ckpt = layout.model_dir(cfg, DATE), layout.checkpoint_dir(cfg, DATE) / CKPT_FILE
    threads = torch.get_num_threads()
    train_day(cfg, DATE)  # the day's bundle: what a refused resume must leave alone
    torch.set_num_threads(threads)
    assert not ckpt.exists()
    # a retrain of one epoch (train.epochs is resume-neutral) dies before its bundle
    _interrupted(cfg.updated({"train.epochs": 1}), monkeypatch)
    assert ckpt.exists()
    models = _snapshot(cfg.path("models"))  # the bundle and the checkpoint

    # the weight-shaping config changed: refused through the CLI, one line, nothing touched
    refused = hap_train(cfg, **{"train.lr": 0.01})
    assert refused.returncode == CheckpointMismatch.exit_code != 0, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"error: checkpoint {ckpt} was written for config_hash ")
    assert "train without --resume to start over" in refused.stderr
    assert _snapshot(cfg.path("models")) == models
    with pytest.raises(CheckpointMismatch, match="config_hash"):  # another model size, in-process
        train_day(cfg.updated({"model.embed_dim": 16}), DATE, resume=True)
    assert _snapshot(cfg.path("models")) == models

    # another training set for the day: the split rebuilt with global negatives sampled at 1/2
    build_training_set(cfg.updated({"split.sample_ratio.global_neg": 0.5}), DATE)
    refused = hap_train(cfg)
    assert refused.returncode == CheckpointMismatch.exit_code, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"error: checkpoint {ckpt} was written for data_version ")
    assert _snapshot(cfg.path("models")) == models

    # the split rebuilt as it was (same params, same bytes); more epochs and threads: it continues
    build_training_set(cfg, DATE)
    resumed = hap_train(cfg, **{"train.num_threads": 2})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {ckpt} after epoch 0" in resumed.stdout
    run = json.loads((bundle_dir / layout.RUN_FILE).read_text())
    meta = json.loads((bundle_dir / layout.BUNDLE_META_FILE).read_text())
    assert run["resumed_from_epoch"] == 0 and meta["result"]["epochs_run"] == 2
    assert [row["epoch"] for row in json.loads((bundle_dir / layout.HISTORY_FILE).read_text())] == [0, 1]
    assert not ckpt.exists()  # the bundle is written: the checkpoint is spent
