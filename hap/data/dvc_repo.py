"""From a model version back to its exact training data, through DVC.

``register_day`` tags each version with DVC's own directory hash of the split stage's output
(``training/dt=D``, the ``outs`` entry of the ``split`` stage in ``dvc.yaml``), computed with
DVC's hashing code (``dvc_data``), so it equals what ``dvc commit``/``dvc push`` record in
``dvc.lock``. ``fetch_training_set`` turns that tag back into files: it writes a one-output
``.dvc`` file in a scratch DVC project that uses the same remote and runs ``dvc pull``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from hap.core import layout
from hap.core.config import REPO_ROOT, Config
from hap.core.errors import HapError
from hap.core.storage import redact
from hap.data import lake, markers

PUSH_REMOTE = "hap"  # the remote named in params (or HAP_DVC_REMOTE), kept in .dvc/config.local
DVC_TIMEOUT_SECONDS = 600.0


class DvcFailed(HapError):
    """A DVC command failed or ran past its time limit."""


def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def dvc_dir_md5(folder: Path) -> str:
    """DVC 3's ``md5`` of a directory output (``<hex>.dir``), as ``dvc add``/``dvc commit`` compute it."""
    from dvc_data.hashfile.tree import Tree

    folder = Path(folder)
    entries = [
        {"relpath": p.relative_to(folder).as_posix(), "md5": _md5(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    tree = Tree.from_list(entries, hash_name="md5")
    tree.digest()
    return tree.hash_info.value


def dvc_reason(output: str) -> str:
    """DVC's own account of a failure: its ``ERROR:`` lines (the last 600 characters of the whole
    output where it printed none), or a note that it printed nothing."""
    errors = [line.strip() for line in output.splitlines() if line.lstrip().startswith("ERROR")]
    reason = "\n".join(errors) if errors else output.strip()[-600:]
    return reason or "DVC printed no reason"


def dvc(args: list[str], cwd: Path, timeout: float = DVC_TIMEOUT_SECONDS) -> str:
    """Run ``dvc ARGS`` in ``cwd``: its stdout, or ``DvcFailed`` naming DVC's reason (a hung
    remote is killed at ``timeout``). Never pass ``--quiet``: DVC then hides its errors too."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DvcFailed(redact(f"`dvc {' '.join(args)}` ran past {timeout:g}s and was stopped")) from None
    if proc.returncode != 0:
        reason = dvc_reason(f"{proc.stdout}\n{proc.stderr}")
        raise DvcFailed(redact(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {reason}"))
    return proc.stdout


def _stages(repo: Path) -> dict[str, str]:
    """Stage name -> ``per_date`` (``foreach`` over the dates), ``window`` (a stage of params
    ``pipeline.date``: split, train, evaluate) or ``lake`` (one stage over every day: ingest),
    read from ``dvc.yaml``."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text()).get("stages", {})

    def kind(body: object) -> str:
        if isinstance(body, dict) and "foreach" in body:
            return "per_date"
        params = body.get("params", []) if isinstance(body, dict) else []
        return "window" if any(str(p).startswith("pipeline.date") for p in params) else "lake"

    return {name: kind(body) for name, body in stages.items()}


def dvc_targets(cfg: Config, date: dt.date, repo: Path = REPO_ROOT) -> list[str]:
    """The dvc.yaml stages that produce this date's outputs, when the data root is the repo's.

    Per-date stages (``foreach``) and the lake's stage (ingest: its outputs are whole Delta tables
    over every validated day) count when ``date`` is one of ``pipeline.dates``, the lake's once
    every validated day is in it; the window stages (split, train, evaluate) when ``date`` is
    ``pipeline.date`` and its model exists."""
    if not (repo / ".dvc").is_dir() or not (repo / "dvc.yaml").exists():
        return []
    try:
        cfg.home.resolve().relative_to(repo.resolve())
    except ValueError:
        return []  # outputs outside the repository cannot be DVC outputs
    stages = _stages(repo)
    targets = []
    if date in cfg.pipeline.dates:
        targets += [f"{name}@{date.isoformat()}" for name, kind in stages.items() if kind == "per_date"]
        validated = markers.validated_days(cfg)
        if date in validated and all(lake.has_days(cfg, day) for day in validated):
            targets += [name for name, kind in stages.items() if kind == "lake"]
    if date == cfg.pipeline.date and layout.model_dir(cfg, date).exists():
        targets += [name for name, kind in stages.items() if kind == "window"]
    return targets


def commit_and_push(cfg: Config, targets: list[str], repo: Path = REPO_ROOT) -> str:
    """``dvc commit`` the stages into dvc.lock and ``dvc push`` them to the configured remote."""
    remote, timeout = cfg.dvc_remote_url(), cfg.orchestration.dvc_timeout_seconds
    dvc(["commit", "--force", *targets], repo, timeout)
    dvc(["remote", "add", "--local", "--force", PUSH_REMOTE, remote], repo, timeout)
    dvc(["push", "-r", PUSH_REMOTE, *targets], repo, timeout)
    return remote


def fetch_training_set(dir_md5: str, remote: str, dest: Path) -> Path:
    """``dvc pull`` the directory with DVC hash ``dir_md5`` from ``remote`` into ``dest``; returns it."""
    dest = Path(dest)
    if dest.exists():
        raise HapError(f"{dest} exists; fetch into a new folder")
    project = dest.parent
    project.mkdir(parents=True, exist_ok=True)
    if not (project / ".dvc").is_dir():
        dvc(["init", "--no-scm"], project)
    dvc(["remote", "add", "--force", "--default", "origin", remote], project)
    (project / f"{dest.name}.dvc").write_text(f"outs:\n- md5: {dir_md5}\n  path: {dest.name}\n  hash: md5\n")
    dvc(["pull", f"{dest.name}.dvc"], project)
    return dest
