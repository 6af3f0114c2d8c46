"""The data version: a content hash of a training set, so every model names its exact data.

The hash covers the bytes of every data file of ``training/dt=D/train`` (relative path + SHA-256
of the file, sorted), and skips ``_*``/``.*`` files such as the record itself. The split writes
identical bytes for an identical window and params, so the hash is stable across rebuilds and
clean clones. It does not need DVC: the Prefect path and ``dvc repro`` get the same value. DVC's
own directory md5 (in ``dvc.lock``) is a second, independent fingerprint of the same folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError

VERSION_FILE = layout.DATA_VERSION_FILE
ALGORITHM = "sha256-tree-v1"


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)
    )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_hash(folder: Path) -> tuple[str, dict[str, str]]:
    """(tree hash, {relative path: file sha256}) of the data files under ``folder``."""
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _data_files(folder)}
    tree = hashlib.sha256()
    for rel, sha in files.items():
        tree.update(f"{rel}\0{sha}\n".encode())
    return tree.hexdigest(), files


def record_data_version(folder: Path) -> str:
    """Hash ``folder`` and write ``folder/_data_version.json``; returns the hash."""
    version, files = content_hash(folder)
    atomic_write_json(
        folder / VERSION_FILE, {"data_version": version, "algorithm": ALGORITHM, "files": files}
    )
    return version


def data_version(cfg: Config, date: dt.date | str) -> str:
    """The content hash of the training set for the window ending on ``date``.

    Recomputed from the files and checked against the record the split wrote, so a training set
    modified after the split is refused instead of being silently re-labelled.
    """
    folder = layout.training_set(cfg, date)
    iso = layout.day(date).isoformat()
    if not folder.is_dir():
        raise HapError(f"no training set at {folder}; run `hap split --date {iso}` first")
    version, _ = content_hash(folder)
    record = folder / VERSION_FILE
    if record.exists():
        recorded = json.loads(record.read_text()).get("data_version")
        if recorded != version:
            raise HapError(
                f"training set {folder} changed after the split (recorded {recorded}, now {version}); "
                f"rebuild it with `hap split --date {iso}`"
            )
    return version
