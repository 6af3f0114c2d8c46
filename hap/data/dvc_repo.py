"""From a model version back to its exact training data, through DVC.

``register_day`` tags each version with DVC's own directory hash of the split stage's output
(``training/dt=D``, the ``outs`` entry of the ``split`` stage in ``dvc.yaml``), computed with
DVC's hashing code (``dvc_data``), so it equals what ``dvc commit``/``dvc push`` record in
``dvc.lock``. ``fetch_training_set`` turns that tag back into files: it writes a one-output
``.dvc`` file in a scratch DVC project that uses the same remote and runs ``dvc pull``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from hap.core.errors import HapError

_CHUNK = 1 << 20


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _dvc(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise HapError(f"`dvc {' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return proc.stdout


def fetch_training_set(dir_md5: str, remote: str, dest: Path) -> Path:
    """``dvc pull`` the directory with DVC hash ``dir_md5`` from ``remote`` into ``dest``; returns it."""
    dest = Path(dest)
    if dest.exists():
        raise HapError(f"{dest} exists; fetch into a new folder")
    project = dest.parent
    project.mkdir(parents=True, exist_ok=True)
    if not (project / ".dvc").is_dir():
        _dvc(["init", "--no-scm", "--quiet"], project)
    _dvc(["remote", "add", "--force", "--default", "origin", remote], project)
    (project / f"{dest.name}.dvc").write_text(f"outs:\n- md5: {dir_md5}\n  path: {dest.name}\n  hash: md5\n")
    _dvc(["pull", "--quiet", f"{dest.name}.dvc"], project)
    return dest
