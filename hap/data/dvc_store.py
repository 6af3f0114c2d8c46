"""Every training set and model bundle in the DVC remote, by content hash, wherever the data root lives.

``push_day`` sends ``training/dt=D`` (the folder whose DVC hash is a model version's ``dvc_md5``
tag) and ``models/dt=D`` to the remote with ``dvc add --to-remote``: DVC hashes the folder and
uploads the objects its remote lacks, straight from the data root (no DVC cache copy, no need for
the data root to be inside a DVC project). A scratch DVC project under the data root
(``.dvc-store``, never synced) holds only the remote's settings; credentials stay in the
environment (``AWS_*``), never in a file.

Beside DVC's objects the remote gets one small record per data version,
``hap-index/<data_version>.json`` (the date and both DVC hashes), so ``hap data pull --version V``
needs nothing but the remote: a fresh machine restores any registered version's training set
and checks that its content hash is ``V``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hap.core import layout, storage
from hap.core.config import Config
from hap.core.errors import HapError, StorageError, is_io_failure
from hap.data.dvc_repo import DvcFailed, dvc, fetch_training_set

PROJECT = ".dvc-store"
REMOTE = "hap"
INDEX = "hap-index"
UNREACHABLE_EXIT = 9  # the add process's exit when the remote could not be reached (StorageError's)
# the storage clients' names for "not reached" (botocore, aiohttp), anywhere in an error's chain
_NOT_REACHED = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError")


@dataclass(frozen=True)
class Pushed:
    """What ``push_day`` sent: the data version and DVC's hash of each folder."""

    data_version: str
    remote: str
    md5: dict[str, str]


def _remote_config(cfg: Config, remote: str) -> str:
    """The scratch project's ``.dvc/config``: the remote and, for S3, the run's timeouts."""
    lines = ["[core]", "    no_scm = True", f"    remote = {REMOTE}", "    analytics = false"]
    lines += [f"['remote \"{REMOTE}\"']", f"    url = {remote}"]
    if remote.startswith(("s3://", "s3a://")):
        bounds = cfg.storage
        lines += [
            f"    connect_timeout = {max(1, round(bounds.connect_timeout_seconds))}",
            f"    read_timeout = {max(1, round(bounds.read_timeout_seconds))}",
        ]
    return "\n".join(lines) + "\n"


def _project(cfg: Config, remote: str) -> Path:
    """The scratch DVC project, created once, its remote set to ``remote``."""
    project = cfg.home / PROJECT
    if not (project / ".dvc").is_dir():
        project.mkdir(parents=True, exist_ok=True)
        dvc(["init", "--no-scm", "--force"], project, cfg.orchestration.dvc_timeout_seconds)
    (project / ".dvc" / "config").write_text(_remote_config(cfg, remote))
    return project


def _index_url(remote: str, version: str) -> str:
    return f"{remote.rstrip('/')}/{INDEX}/{version}.json"


def _write_index(cfg: Config, remote: str, version: str, record: dict) -> None:
    url = _index_url(remote, version)
    fs, path = storage.filesystem(url, cfg.storage)
    with storage.guard(url):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _read_index(cfg: Config, remote: str, version: str) -> dict:
    url = _index_url(remote, version)
    fs, path = storage.filesystem(url, cfg.storage)
    with storage.guard(url):
        if not fs.exists(path):
            raise HapError(
                f"no training set with data version {version} in the DVC remote {storage.redact(remote)}"
            )
        return json.loads(fs.cat_file(path))


def push_day(cfg: Config, date: dt.date) -> Pushed:
    """Push the day's training set and model bundle (where it exists) to the DVC remote by hash."""
    from hap.data.versioning import data_version

    remote = cfg.dvc_remote_url()
    version = data_version(cfg, date)
    folders = {"training": layout.training_set(cfg, date).parent, "model": layout.model_dir(cfg, date)}
    folders = {name: folder for name, folder in folders.items() if folder.is_dir()}
    project = _project(cfg, remote)
    iso = date.isoformat()
    args = [f"{name}-{iso}={folder}" for name, folder in folders.items()]
    _run_add(cfg, project, args)
    md5 = {name: _md5_of(project / f"{name}-{iso}.dvc") for name in folders}
    record = {
        "data_version": version,
        "date": iso,
        "training": {"md5": md5["training"], "out": str(folders["training"].relative_to(cfg.home))},
        "train_path": str(layout.training_set(cfg, date).relative_to(folders["training"])),
    }
    if "model" in md5:
        record["model"] = {"md5": md5["model"], "out": str(folders["model"].relative_to(cfg.home))}
    _write_index(cfg, remote, version, record)
    return Pushed(version, storage.redact(remote), md5)


def _md5_of(dvc_file: Path) -> str:
    import yaml

    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def _run_add(cfg: Config, project: Path, args: list[str]) -> None:
    """``dvc add --to-remote`` of each ``name=folder`` in one DVC process (one import, not one per
    folder), bounded by ``orchestration.dvc_timeout_seconds``."""
    import subprocess

    from hap.data.dvc_repo import dvc_reason

    # like a publish of the data root (storage.publish_root): a fixed allowance plus the folders'
    # bytes at the minimum upload rate, so a remote that accepts and never answers is cut there
    # (DVC's own retries of its read timeout took a minute), within dvc_timeout_seconds
    folders = [Path(arg.split("=", 1)[1]) for arg in args]
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    timeout = min(cfg.orchestration.dvc_timeout_seconds, storage.upload_bound(cfg.storage, size))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hap.data.dvc_store", str(project), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=project,
        )
    except subprocess.TimeoutExpired:
        raise StorageError(
            f"object storage {storage.redact(cfg.dvc_remote_url())}: unreachable (pushing to the DVC "
            f"remote got no answer in {timeout:.0f} s)"
        ) from None
    if proc.returncode != 0:
        reason = storage.redact(dvc_reason(f"{proc.stdout}\n{proc.stderr}"))
        remote = storage.redact(cfg.dvc_remote_url())
        if proc.returncode == UNREACHABLE_EXIT:  # the remote's failure, not DVC's nor the data's
            raise StorageError(
                f"object storage {remote}: unreachable while pushing to the DVC remote ({reason})"
            )
        raise DvcFailed(f"pushing to the DVC remote {remote} failed: {reason}")


def pull_version(cfg: Config, version: str, dest: Path) -> Path:
    """Restore the training set of data version ``version`` from the DVC remote into ``dest``
    (the split's ``training/dt=D`` folder); check that its content hash is ``version``."""
    from hap.data.versioning import content_hash

    remote = cfg.dvc_remote_url()
    record = _read_index(cfg, remote, version)
    dest = Path(dest).resolve()
    if dest.exists():
        raise HapError(f"{dest} exists; restore into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a scratch DVC project beside dest, so no surrounding project (a clone of this repo) is touched
    scratch = Path(tempfile.mkdtemp(prefix=".hap-pull-", dir=dest.parent))
    try:
        fetched = fetch_training_set(record["training"]["md5"], remote, scratch / "out")
        got, _ = content_hash(fetched / record.get("train_path", "train"))
        if got != version:
            raise HapError(f"restored training set hashes to {got}, not the data version {version}")
        os.replace(fetched, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _main(project: str, *pairs: str) -> None:
    """In-process ``dvc add --to-remote -o NAME FOLDER`` for each ``NAME=FOLDER``: the subprocess
    ``_run_add`` starts."""
    from dvc.repo import Repo

    try:
        with Repo(project) as repo, _upload_names() as uploaded:
            for pair in pairs:
                name, folder = pair.split("=", 1)
                repo.add(folder, to_remote=True, out=str(Path(project) / name), remote=REMOTE)
            _remove_upload_leftovers(repo, uploaded)
    except Exception as err:  # noqa: BLE001 - one ERROR line for the parent, never a traceback
        lines = str(err).strip().splitlines()
        print(f"ERROR: {type(err).__name__}: {lines[0] if lines else ''}".rstrip(": "), file=sys.stderr)
        sys.exit(UNREACHABLE_EXIT if _not_reached(err) else 1)


@contextlib.contextmanager
def _upload_names() -> Iterator[list[str]]:
    """The temporary names this process's DVC gives what it uploads. ``dvc add --to-remote``
    uploads each file under a temporary name beside the remote's objects, then copies it to its
    content address; on an object store the temporary object stays behind (an open DVC bug,
    treeverse/dvc#10783: one per file, 24 a day here). Recording the names this process made lets
    it remove its own leftovers, never a concurrent push's upload in flight."""
    from dvc_objects.fs import utils

    original, names = utils.tmp_fname, []

    def recording(prefix: str = "") -> str:
        name = original(prefix)
        names.append(name)
        return name

    utils.tmp_fname = recording
    try:
        yield names
    finally:
        utils.tmp_fname = original


def _remove_upload_leftovers(repo: Any, names: list[str]) -> None:
    """Remove the uploads' temporary objects that are still in the remote (``_upload_names``)."""
    odb = repo.cloud.get_remote_odb(REMOTE)
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            odb.fs.remove(odb.fs.join(odb.path, name))


def _not_reached(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it came from says the remote was not reached."""
    seen = 0
    while err is not None and seen < 20:
        if type(err).__name__ in _NOT_REACHED or is_io_failure(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


if __name__ == "__main__":
    _main(*sys.argv[1:])
