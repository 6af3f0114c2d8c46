"""Object storage: one bounded fsspec filesystem per URL, clear errors, no credential in any message.

A data root on object storage (``HAP_HOME=s3://bucket/prefix``) is worked on through a local copy
(``Config.home``, under ``paths.workdir``): ``pull_root`` brings the bucket's changes into it before
a run or command, ``publish_root`` sends the copy's changes back after each step. Why a working copy
and not fsspec paths in every step: the steps use pyarrow datasets, GX, torch, MLflow's SQLite and
atomic renames on local paths; a copy keeps each of them as measured, keeps ``make run``'s local
default untouched, and needs no shared ReadWriteMany volume, since the bucket is the shared state.
The sync is incremental: a record of what each file was when last synced (``.hap-sync.json``: size,
mtime, ETag) decides what moves. One writer per data root at a time (the daily flow's date locks).

Every call is bounded by ``storage:`` in params.yaml (connect/read timeouts, attempts), so an
unreachable or denied bucket fails in bounded time with one ``StorageError`` line naming the URL.
``redact`` strips credentials from any text that leaves the process (errors, logs, tags).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hap.core import layout
from hap.core.errors import HapError, StorageError

if TYPE_CHECKING:
    from hap.core.config import Config, StorageConfig

_log = logging.getLogger(__name__)
T = TypeVar("T")
# one sync of a working copy at a time in a process: a failed run's publish left behind
# (``publish_after_failure``) must not write the sync record beside the next run's pull
_SYNCING = threading.Lock()
SYNC_RECORD = ".hap-sync.json"
# the environment variables whose values are secrets wherever they appear
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MINIO_ROOT_PASSWORD",
    "MINIO_SECRET_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")
_SIGNED = re.compile(
    r"(?i)(X-Amz-(?:Credential|Signature|Security-Token)|Signature|AWSAccessKeyId)=[^&\s'\"]+"
)
_KEY_LIKE = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# whole words: a bare "403" inside a port or an id ("127.0.0.1:44039") is not a refusal
_DENIED = re.compile(r"\b(?:AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|403)\b")


def is_url(location: str | os.PathLike[str] | None) -> bool:
    """True for an object-store URL (``s3://``, ``gs://``...); paths and ``file://`` are local."""
    text = str(location or "")
    return "://" in text and not text.startswith("file://")


def redact(text: object) -> str:
    """``text`` with credentials removed: secret env values, ``user:pass@`` in URLs, signed-URL
    parameters and anything shaped like an AWS access key id."""
    out = str(text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    out = _USERINFO.sub(r"\g<scheme>***@", out)
    out = _SIGNED.sub(r"\1=***", out)
    return _KEY_LIKE.sub("***", out)


# ---- the filesystem ------------------------------------------------------------------------------
def _options(protocol: str, bounds: StorageConfig) -> dict[str, Any]:
    """fsspec options that bound every call of ``protocol``'s filesystem."""
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": bounds.connect_timeout_seconds,
                "read_timeout": bounds.read_timeout_seconds,
                "retries": {"total_max_attempts": 1},  # s3fs retries below, with its backoff
            },
            "skip_instance_cache": True,
        }
    return {}


def filesystem(url: str, bounds: StorageConfig) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``, every call bounded by ``bounds``."""
    import fsspec

    protocol = url.split("://", 1)[0] if is_url(url) else "file"
    with guard(url):
        fs, path = fsspec.core.url_to_fs(url, **_options(protocol, bounds))
    if hasattr(fs, "retries"):
        fs.retries = bounds.attempts  # s3fs: tries per call on transient errors (class default 5)
    return fs, path


def _reason(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def describe(url: str, err: BaseException) -> str:
    """One line naming ``url`` and what went wrong (credentials redacted)."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, PermissionError) or _DENIED.search(text):
        what = "access denied"
    elif "NoSuchBucket" in text or (isinstance(err, FileNotFoundError) and "bucket" in text.lower()):
        what = "no such bucket"
    else:
        what = "unreachable"
    return redact(f"object storage {url}: {what} ({_reason(err)})")


@contextlib.contextmanager
def guard(url: str) -> Iterator[None]:
    """Turn any failure of an object-store call on ``url`` into one ``StorageError`` line."""
    try:
        yield
    except HapError:
        raise
    except Exception as err:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
        raise StorageError(describe(url, err)) from None


def check(url: str, bounds: StorageConfig) -> None:
    """Fail now, in bounded time, if ``url``'s bucket cannot be listed (unreachable, denied, absent)."""
    fs, path = filesystem(url, bounds)
    bucket = path.split("/", 1)[0]
    with guard(url):
        fs.ls(bucket, refresh=True)


# ---- the working copy ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Synced:
    """What one sync moved."""

    copied: int
    removed: int
    bytes: int


def _excluded(rel: str, exclude: list[str]) -> bool:
    parts = rel.split("/")
    if parts[0] in exclude:
        return True
    return any(p.startswith((".tmp-", ".old-")) or p.endswith(("-journal", "-wal", "-shm")) for p in parts)


def _load_record(home: Path, url: str) -> dict[str, dict[str, Any]]:
    path = home / SYNC_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record.get("files", {}) if record.get("root") == url else {}


def _save_record(home: Path, url: str, files: dict[str, dict[str, Any]]) -> None:
    from hap.core.atomic import atomic_write_json

    atomic_write_json(home / SYNC_RECORD, {"root": url, "files": files})


def _remote_files(fs: Any, root: str, exclude: list[str]) -> dict[str, dict[str, Any]]:
    found = fs.find(root, detail=True, withdirs=False)
    out = {}
    for path, info in found.items():
        rel = path[len(root) :].lstrip("/")
        if rel and not _excluded(rel, exclude):
            out[rel] = {"size": int(info.get("size") or 0), "etag": str(info.get("ETag") or "")}
    return out


def _local_files(home: Path, exclude: list[str]) -> dict[str, os.stat_result]:
    out = {}
    if not home.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(home):
        base = Path(dirpath)
        rel_dir = base.relative_to(home).as_posix()
        dirnames[:] = [d for d in dirnames if not _excluded(f"{rel_dir}/{d}".lstrip("./"), exclude)]
        for name in filenames:
            rel = (base / name).relative_to(home).as_posix()
            if not _excluded(rel, exclude):
                out[rel] = (base / name).stat()
    return out


def _same(stat: os.stat_result, known: dict[str, Any] | None) -> bool:
    return bool(known) and stat.st_size == known.get("size") and stat.st_mtime_ns == known.get("mtime_ns")


def _current(rel: str, info: dict[str, Any], local: dict[str, os.stat_result], record: dict) -> bool:
    """The working copy's file is the bucket's: same ETag as at the last sync, untouched since."""
    known = record.get(rel)
    return bool(known) and known.get("etag") == info["etag"] and rel in local and _same(local[rel], known)


def pull_root(cfg: Config) -> Synced:
    """Bring the bucket's changes into the working copy (no-op for a local data root).

    A file is fetched when the bucket's ETag differs from the one recorded at the last sync or the
    local file changed since; a file another writer removed from the bucket is removed here too."""
    with _SYNCING:
        return _pull_root(cfg)


def _pull_root(cfg: Config) -> Synced:
    url = cfg.root_url
    if not url:
        return Synced(0, 0, 0)
    home, exclude = cfg.home, layout.unsynced_folders(cfg)
    fs, root = filesystem(url, cfg.storage)
    home.mkdir(parents=True, exist_ok=True)
    record = _load_record(home, url)
    with guard(url):
        check(url, cfg.storage)
        remote = _remote_files(fs, root, exclude)
        local = _local_files(home, exclude)
        wanted = [rel for rel, info in remote.items() if not _current(rel, info, local, record)]
        scratch = home / f".tmp-pull-{uuid.uuid4().hex[:8]}"
        try:
            if wanted:
                fs.get([f"{root}/{rel}" for rel in wanted], [str(scratch / rel) for rel in wanted])
            for rel in wanted:
                target = home / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(scratch / rel, target)
                record[rel] = {**remote[rel], "mtime_ns": target.stat().st_mtime_ns}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    removed = 0
    for rel in [r for r in record if r not in remote]:
        if rel in local and _same(local[rel], record[rel]):
            (home / rel).unlink(missing_ok=True)
            removed += 1
        record.pop(rel)
    _save_record(home, url, record)
    return Synced(len(wanted), removed, sum(remote[r]["size"] for r in wanted))


def publish_root(cfg: Config) -> Synced:
    """Send the working copy's changes to the bucket (no-op for a local data root).

    New and changed files go first, records and markers (``_*`` names, e.g. ``_data_version.json``)
    after the data they describe, then files removed locally are removed from the bucket.

    Bounded as a whole, by ``storage.publish_seconds`` plus the changed bytes at
    ``storage.min_upload_mb_per_second``: the read timeout does not cut an upload to a store that
    accepts the connection and never answers (it waited for minutes in a fault probe)."""
    url = cfg.root_url
    if not url:
        return Synced(0, 0, 0)
    local, record = _local_files(cfg.home, layout.unsynced_folders(cfg)), _load_record(cfg.home, url)
    changed = _changed(local, record)
    seconds = upload_bound(cfg.storage, sum(local[rel].st_size for rel in changed))

    def send() -> Synced:
        with _SYNCING:
            return _publish_root(cfg, local, record, changed)

    finished, synced, error = _within(seconds, send, "hap-publish")
    if not finished:  # left behind: it holds the sync lock, so nothing else syncs meanwhile
        raise StorageError(
            f"object storage {redact(url)}: unreachable (publishing got no answer in {seconds:.0f} s)"
        )
    if error is not None:
        raise error
    return synced


def upload_bound(bounds: StorageConfig, nbytes: int) -> float:
    """The most seconds an upload of ``nbytes`` may take as a whole: ``storage.publish_seconds``
    plus the bytes at ``storage.min_upload_mb_per_second`` (a read timeout does not cut an upload
    to a store that accepts and never answers)."""
    return bounds.publish_seconds + nbytes / (bounds.min_upload_mb_per_second * 1e6)


def _within(seconds: float, work: Callable[[], T], name: str) -> tuple[bool, T | None, BaseException | None]:
    """``work()`` in a daemon thread, waited for at most ``seconds``: (finished, its result, its
    error). Past the time it is left behind, still running."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive(), box.get("result"), box.get("error")


def _changed(local: dict[str, os.stat_result], record: dict[str, Any]) -> list[str]:
    """The working copy's files that differ from the sync record: data first, ``_*`` records last."""
    return sorted(
        (rel for rel, stat in local.items() if not _same(stat, record.get(rel))),
        key=lambda rel: (rel.rsplit("/", 1)[-1].startswith("_"), rel),
    )


def _publish_root(
    cfg: Config, local: dict[str, os.stat_result], record: dict[str, Any], changed: list[str]
) -> Synced:
    url, home, exclude = cfg.root_url, cfg.home, layout.unsynced_folders(cfg)
    fs, root = filesystem(url, cfg.storage)
    gone = [rel for rel in record if rel not in local]
    with guard(url):
        data = [r for r in changed if not r.rsplit("/", 1)[-1].startswith("_")]
        marks = [r for r in changed if r.rsplit("/", 1)[-1].startswith("_")]
        for batch in (data, marks):
            if batch:
                fs.put([str(home / r) for r in batch], [f"{root}/{r}" for r in batch])
        if gone:
            fs.rm([f"{root}/{r}" for r in gone])
        remote = _remote_files(fs, root, exclude) if changed else {}
    for rel in gone:
        record.pop(rel, None)
    for rel in changed:
        stat = local[rel]
        record[rel] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "etag": remote.get(rel, {}).get("etag", ""),
        }
    _save_record(home, url, record)
    return Synced(len(changed), len(gone), sum(local[r].st_size for r in changed))


@contextlib.contextmanager
def synced(cfg: Config) -> Iterator[None]:
    """Pull the data root before the block and publish it after, also when the block fails (a
    quarantined day is an output too). No-op for a local data root."""
    pull_root(cfg)
    try:
        yield
    except BaseException:
        publish_after_failure(cfg)  # the block's own error is the one to report
        raise
    publish_root(cfg)


def publish_after_failure(cfg: Config) -> bool:
    """``publish_root`` for what a failed command or run wrote (its run record, a quarantined day),
    given at most ``storage.after_failure_seconds``: the store is often what failed, and a store
    that hangs would hold the failed run for every call's timeouts and retries (minutes) before
    its error reaches anyone. When the time is up the upload is left behind in a daemon thread:
    an object appears whole or not at all, and the sync record is written only once everything
    is sent, so the next run's publish sends what is missing. True when everything was sent."""
    if not cfg.root_url:
        return True
    finished, _, error = _within(
        cfg.storage.after_failure_seconds, lambda: publish_root(cfg), "hap-publish-after-failure"
    )
    sent = finished and error is None
    if not sent:
        _log.warning(
            "%s: the failed run's records were not sent to the bucket within %s s (%s); "
            "the next run sends them",
            redact(cfg.root_url),
            cfg.storage.after_failure_seconds,
            "no answer" if not finished else redact(str(error)),
        )
    return sent
