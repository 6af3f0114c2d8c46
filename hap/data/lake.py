"""The lake: one Delta table per lake table (``samples``, ``fullflow``), partitioned by ``dt`` and
request-hash ``bucket``, on a local folder or on object storage (``s3://``), with one code path.

Why a table format: ingest and quarantine must publish, replace or remove a day so that a reader
sees the old day or the new one, never half of either, and re-running a day leaves one copy. On a
local disk a folder rename did that; object stores have no rename. A Delta table commits a set of
files in one log entry (``_delta_log/NNNN.json``, created with a conditional put), so the commit is
the only step readers can observe (``bench/results/lake.md`` has the measurements and the choice).

How a day is written: each bucket's Parquet file is written straight into the table's folder
(``dt=D/bucket=B/part-BBBBB-<uuid>.parquet``), by whatever process ran the bucket (a Dask worker);
the driver then commits the day's files in one transaction that replaces the ``dt=D`` partition
(``commit_day``). Files written but never committed (a killed writer) are invisible: readers list
files from the log, never from the folder. Concurrent commits of one day carry the same application
id (``hap-lake/dt=D``), so delta-rs rejects the loser's commit; the loser then reloads and replaces
the day again, so the table holds exactly one copy either way.

Readers take the day's files from one snapshot of the log (``day_parts``) and read them with
pyarrow, one bucket per file: the unit split and Dask workers read in parallel.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from hap.core import layout
from hap.core.config import Config
from hap.core.errors import HapError
from hap.core.parquet import RowGroupWriter
from hap.core.storage import StorageError, is_url, redact

PARTITION_BY = ["dt", "bucket"]


class LakeUnavailable(StorageError):
    """The lake's storage cannot be reached, or refuses us (missing bucket, denied credentials).
    The lake keeps its own bounds (``lake:``): delta-rs and pyarrow take other settings than fsspec."""


# ---- storage: where a table lives and how to talk to it ---------------------------------------------
def storage_options(cfg: Config, url: str) -> dict[str, str]:
    """delta-rs (object_store) options: bounded timeouts and retries, so that an unreachable store
    fails in ``lake.timeout_seconds``-sized steps. Credentials and the endpoint come from the
    ``AWS_*`` variables, as for every other client; nothing secret is passed here."""
    if not is_url(url):
        return {}
    seconds = f"{cfg.lake.timeout_seconds}s"
    return {
        "timeout": seconds,
        "connect_timeout": seconds,
        "max_retries": str(cfg.lake.max_retries),
        "retry_timeout": f"{cfg.lake.timeout_seconds * (cfg.lake.max_retries + 1)}s",
    }


def filesystem(cfg: Config, url: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``url`` and the path inside it (same timeouts as ``storage_options``)."""
    return arrow_filesystem(url, cfg.lake.timeout_seconds, cfg.lake.max_retries)


def arrow_filesystem(url: str, timeout_seconds: float, max_retries: int) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``url`` (a path, ``file://`` or an object-store URL) and the path
    inside it, every call bounded; endpoint, region and credentials from the ``AWS_*`` variables
    of the process that calls it (a Dask worker's own, on another host)."""
    if not is_url(url):
        return pafs.LocalFileSystem(), str(Path(url.removeprefix("file://")))
    if not url.startswith("s3://"):
        return pafs.FileSystem.from_uri(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    credentials = tuple(
        os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    )
    fs = _s3_filesystem(endpoint, region, timeout_seconds, max_retries, credentials)
    return fs, url.removeprefix("s3://").rstrip("/")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(
    endpoint: str | None, region: str | None, timeout_seconds: float, max_retries: int, credentials: tuple
) -> pafs.S3FileSystem:
    """One S3 filesystem per setting, reused by every read and write of a process (a bucket task
    reads a cut's files one by one); ``credentials`` only keys the cache, the client reads the
    ``AWS_*`` variables itself."""
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    return pafs.S3FileSystem(
        region=region,
        connect_timeout=timeout_seconds,
        request_timeout=timeout_seconds,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_retries + 1),
        **kwargs,
    )


def table_url(cfg: Config, table: str) -> str:
    return f"{layout.lake_url(cfg).rstrip('/')}/{table}"


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn a storage failure into one line naming the URL, with no credential in it."""
    try:
        yield
    except HapError:
        raise
    except (OSError, pa.ArrowException, Exception) as err:  # delta-rs raises its own DeltaError tree
        if not _is_storage_error(err):
            raise
        first = redact(str(err)).strip().splitlines()
        raise LakeUnavailable(
            f"lake: cannot {action} {redact(url)} ({type(err).__name__}: {first[0] if first else ''}); "
            "check HAP_LAKE_URL, that the bucket exists, the AWS_* credentials and AWS_ENDPOINT_URL"
        ) from None


def _is_storage_error(err: BaseException) -> bool:
    from deltalake.exceptions import DeltaError

    return isinstance(err, OSError | pa.ArrowException | DeltaError)


# ---- the table -----------------------------------------------------------------------------------------
def _delta_table(cfg: Config, table: str) -> Any | None:
    """The table's latest snapshot, or ``None`` when no day was ever published."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    url = table_url(cfg, table)
    with storage_errors(url, "open the lake table"):
        try:
            return DeltaTable(url, storage_options=storage_options(cfg, url))
        except TableNotFoundError:
            return None


def _app_id(date: dt.date) -> str:
    return f"hap-lake/{layout.partition(date)}"


@dataclass(frozen=True)
class PartFile:
    """A bucket's file, written into the table's folder but not yet committed."""

    bucket: int
    path: str  # relative to the table's root: dt=D/bucket=B/part-...parquet
    size: int
    rows: int


@dataclass(frozen=True)
class Part:
    """A committed bucket file of a day: what a reader (or a Dask worker) opens."""

    date: dt.date
    bucket: int
    uri: str


class PartWriter:
    """Write one bucket of one day into a table's folder, in row groups (``RowGroupWriter``)."""

    def __init__(self, cfg: Config, table: str, date: dt.date, bucket: int, schema: pa.Schema) -> None:
        self.url = table_url(cfg, table)
        self.fs, root = filesystem(cfg, self.url)
        self.bucket = bucket
        self.rel = f"{layout.partition(date)}/bucket={bucket}/part-{bucket:05d}-{uuid.uuid4().hex}.parquet"
        self.full = f"{root}/{self.rel}"
        self.writer = RowGroupWriter(Path(self.full), schema, cfg.split.batch_rows, filesystem=self.fs)

    def write(self, table: pa.Table) -> None:
        with storage_errors(self.url, "write to"):
            self.writer.write(table)

    def close(self) -> PartFile | None:
        """Finish the file; ``None`` when no row was written (no file exists then)."""
        with storage_errors(self.url, "write to"):
            self.writer.close()
            if not self.writer.rows:
                return None
            size = self.fs.get_file_info(self.full).size
        return PartFile(self.bucket, self.rel, int(size or 0), self.writer.rows)


def commit_day(
    cfg: Config, table: str, date: dt.date | str, schema: pa.Schema, parts: Sequence[PartFile]
) -> int:
    """Replace day ``date`` of ``table`` by ``parts`` in one commit (no parts: remove the day).
    Returns the table version that holds it."""
    from deltalake import Schema as DeltaSchema
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        Transaction,
        create_table_with_add_actions,
    )

    date = layout.day(date)
    url = table_url(cfg, table)
    full_schema = schema.append(pa.field("dt", pa.string())).append(pa.field("bucket", pa.int32()))
    now = int(time.time() * 1000)
    actions = [
        AddAction(
            path=p.path,
            size=p.size,
            partition_values={"dt": date.isoformat(), "bucket": str(p.bucket)},
            modification_time=now,
            data_change=True,
            stats=json.dumps({"numRecords": p.rows}),
        )
        for p in parts
    ]
    with storage_errors(url, "commit to"):
        for attempt in range(cfg.lake.commit_retries + 1):
            delta = _delta_table(cfg, table)
            if delta is None:
                if not actions:
                    return -1  # nothing to remove from a table that does not exist
                try:
                    create_table_with_add_actions(
                        url,
                        DeltaSchema.from_arrow(full_schema),
                        actions,
                        mode="error",
                        partition_by=PARTITION_BY,
                        storage_options=storage_options(cfg, url),
                    )
                    return 0
                except Exception as err:  # another writer created the table first: commit into it
                    if attempt == cfg.lake.commit_retries or _delta_table(cfg, table) is None:
                        raise HapError(f"lake: cannot create {redact(url)}: {redact(str(err))}") from None
                    continue
            seen = delta.transaction_version(_app_id(date)) or 0
            try:
                delta.create_write_transaction(
                    actions,
                    mode="overwrite",
                    schema=full_schema,
                    partition_by=PARTITION_BY,
                    partition_filters=[("dt", "=", date.isoformat())],
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(app_id=_app_id(date), version=seen + 1)]
                    ),
                )
                return delta.version() + 1 if delta.version() is not None else 0
            except CommitFailedError:
                if attempt == cfg.lake.commit_retries:
                    raise HapError(
                        f"lake: {redact(url)} {layout.partition(date)}: {attempt + 1} commits lost to "
                        "concurrent writers of the same day; the day holds one of their versions"
                    ) from None
    return -1  # unreachable


def publish_day(cfg: Config, table: str, date: dt.date | str, buckets: dict[int, pa.Table]) -> int:
    """Write ``buckets`` (bucket -> rows) as day ``date`` of ``table`` and commit them in one go: a
    small-data convenience over ``PartWriter`` + ``commit_day`` (ingest writes on the workers)."""
    date = layout.day(date)
    parts, schema = [], None
    for bucket, rows in sorted(buckets.items()):
        schema = rows.schema
        writer = PartWriter(cfg, table, date, bucket, rows.schema)
        writer.write(rows)
        part = writer.close()
        if part is not None:
            parts.append(part)
    if schema is None:
        raise HapError(f"lake: publish_day({table}, {date}) given no buckets")
    return commit_day(cfg, table, date, schema, parts)


def unpublish_day(cfg: Config, date: dt.date | str, tables: Sequence[str] = layout.LAKE_TABLES) -> list[str]:
    """Remove day ``date`` from every table, one commit per table (``samples`` first, so a day whose
    samples are visible always has its full-flow rows). Returns the tables that held the day."""
    date = layout.day(date)
    removed = []
    for table in tables:
        delta = _delta_table(cfg, table)
        if delta is None or not has_day(cfg, table, date):
            continue
        schema = pa.schema(delta.schema().to_arrow())
        data_schema = pa.schema([f for f in schema if f.name not in PARTITION_BY])
        commit_day(cfg, table, date, data_schema, [])
        removed.append(f"{table_url(cfg, table)}/{layout.partition(date)}")
    return removed


# ---- reading -------------------------------------------------------------------------------------------
def day_parts(cfg: Config, table: str, date: dt.date | str) -> list[Part]:
    """The committed files of day ``date``, one per bucket, in bucket order (one log snapshot)."""
    date = layout.day(date)
    delta = _delta_table(cfg, table)
    if delta is None:
        return []
    with storage_errors(table_url(cfg, table), "list"):
        actions = pa.table(delta.get_add_actions(flatten=True))
    parts = []
    root = delta.table_uri.rstrip("/")
    for path, day, bucket in zip(
        actions["path"].to_pylist(),
        actions["partition.dt"].to_pylist(),
        actions["partition.bucket"].to_pylist(),
    ):
        if day == date.isoformat():
            parts.append(Part(date, int(bucket), _absolute(root, path)))
    return sorted(parts, key=lambda p: (p.bucket, p.uri))


def _absolute(root: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return f"{root}/{path}".removeprefix("file://")


def vacuum(cfg: Config, tables: Sequence[str] = layout.LAKE_TABLES) -> dict[str, int]:
    """Delete the files no recent snapshot reads: days replaced or removed by a commit, and files a
    killed writer left uncommitted (``full``), once older than ``lake.vacuum_retention_hours``.
    Without it every re-ingest or quarantine leaves its old files in the bucket for good. The
    retention keeps what a running reader or a writer still before its commit can reach.
    Returns the number of data files deleted per table (the empty folder markers some object
    stores keep are deleted too, not counted)."""
    removed: dict[str, int] = {}
    for table in tables:
        url = table_url(cfg, table)
        with storage_errors(url, "vacuum"):
            delta = _delta_table(cfg, table)
            files = (
                delta.vacuum(
                    retention_hours=cfg.lake.vacuum_retention_hours,
                    dry_run=False,
                    enforce_retention_duration=False,  # the retention is params.yaml's, not Delta's
                    full=True,
                )
                if delta is not None
                else []
            )
        removed[table] = sum(1 for f in files if f.endswith(".parquet"))
    return removed


def has_day(cfg: Config, table: str, date: dt.date | str) -> bool:
    return bool(day_parts(cfg, table, date))


def has_days(cfg: Config, date: dt.date | str) -> bool:
    """Both tables hold ``date`` (ingest commits ``fullflow`` then ``samples``)."""
    return all(has_day(cfg, table, date) for table in ("samples", "fullflow"))


def parts_dataset(cfg: Config, parts: Sequence[Part]) -> ds.Dataset:
    """A pyarrow dataset of committed files (any one table), read through the lake's filesystem."""
    if not parts:
        raise HapError("lake: no files to read")
    fs, _ = filesystem(cfg, parts[0].uri)
    paths = [filesystem(cfg, p.uri)[1] for p in parts]
    with storage_errors(parts[0].uri, "read"):
        return ds.dataset(paths, format="parquet", filesystem=fs)


def read_day(
    cfg: Config,
    table: str,
    date: dt.date | str,
    columns: Sequence[str] | None = None,
    filter: ds.Expression | None = None,
) -> pa.Table | None:
    """Day ``date`` of ``table`` (``columns``, rows matching ``filter``), or ``None`` when the lake
    does not hold the day."""
    parts = day_parts(cfg, table, date)
    if not parts:
        return None
    with storage_errors(table_url(cfg, table), "read"):
        return parts_dataset(cfg, parts).to_table(
            columns=list(columns) if columns is not None else None, filter=filter
        )


def require_day(cfg: Config, table: str, date: dt.date | str, step: str) -> list[Part]:
    """The day's parts, or a clear error saying how to get the day into the lake."""
    parts = day_parts(cfg, table, date)
    if not parts:
        raise HapError(
            f"{step}: no lake data for {layout.day(date)} in {redact(table_url(cfg, table))}; "
            f"run `hap ingest --date {layout.day(date)}` first"
        )
    return parts
