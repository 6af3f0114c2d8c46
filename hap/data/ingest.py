"""Ingest: join a day's raw exposure and ranking logs per request into the lake.

The exposure log carries the request side (user, context, recent clicks) and the feedback; the
ranking log carries every logged candidate with the item side and its stage positions. Ingest
attaches the request side and the click to each candidate, splits exposures into
``expose_pos``/``expose_neg``, and publishes day D of the lake tables ``samples`` and ``fullflow``.

The ranking log is streamed batch by batch, so memory grows with the exposure log only (about a
third of the rows, and only the request-side columns are kept). Each bucket's file is written into
the lake by the process that joined it; the day is then committed in one transaction per table
(``hap.data.lake``): re-running a day replaces it, never duplicates it, and a writer killed before
its commit leaves the previous day readable.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import layout, schema
from hap.core.config import Config
from hap.core.engine import Mapper, local_map
from hap.core.errors import DataContractError
from hap.core.storage import redact
from hap.data import lake, markers
from hap.data.buckets import DayBuckets, cut_day, drop_cut
from hap.data.quarantine import quarantine_day

EXPOSURE_COLUMNS = [
    "request_id",
    "timestamp",
    "user_id",
    "item_id",
    "position",
    "click",
    *schema.REQUEST_FEATURES,
]


@dataclass
class IngestReport:
    date: dt.date
    requests: int = 0
    samples: int = 0
    fullflow_rows: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    def render(self) -> str:
        sources = ", ".join(f"{k}={v}" for k, v in sorted(self.by_source.items()))
        return (
            f"ingested {self.date}: {self.requests} requests, {self.samples} samples ({sources}), "
            f"{self.fullflow_rows} full-flow rows -> {', '.join(str(p) for p in self.paths)}"
        )


# ---- reading raw logs against their contract -----------------------------------------------------
def open_raw_log(cfg: Config, date: dt.date, name: str) -> pq.ParquetFile:
    """Open one raw log, turning every way it can be unreadable into a clear contract error."""
    path = layout.raw_log(cfg, date, name)
    if not path.exists():
        raise DataContractError(f"{path}: missing; the {name} log for {date} never landed")
    if path.stat().st_size == 0:
        raise DataContractError(f"{path}: zero-byte file; the {name} log for {date} is empty")
    try:
        handle = pq.ParquetFile(path)
        handle.schema_arrow  # noqa: B018 - forces the footer to be parsed
    except (pa.ArrowInvalid, OSError) as err:
        raise DataContractError(
            f"{path}: unreadable Parquet ({err}); the file is truncated or corrupt"
        ) from None
    check_contract(path, handle.schema_arrow, schema.RAW_LOGS[name])
    return handle


def check_contract(path: Path, actual: pa.Schema, contract: pa.Schema) -> None:
    """Every contract column must be present with a type that casts safely. Extra columns are
    tolerated here (they are dropped); validation decides whether they fail the day."""
    missing = [f.name for f in contract if f.name not in actual.names]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing} required by the contract")
    wrong = []
    for f in contract:
        got = actual.field(f.name).type
        if got != f.type and not _safely_castable(got, f.type):
            wrong.append(f"{f.name}: {got} (expected {f.type})")
    if wrong:
        raise DataContractError(f"{path}: wrong column type(s): {'; '.join(wrong)}")


def _safely_castable(src: pa.DataType, dst: pa.DataType) -> bool:
    integer = pa.types.is_integer
    if integer(src) and integer(dst):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    if pa.types.is_timestamp(src) and pa.types.is_timestamp(dst):
        return True
    if (pa.types.is_string(src) or pa.types.is_large_string(src) or pa.types.is_dictionary(src)) and (
        pa.types.is_string(dst)
    ):
        return True
    if pa.types.is_list(src) and pa.types.is_list(dst):
        return _safely_castable(src.value_type, dst.value_type)
    return False


def read_conformed(
    handle: pq.ParquetFile, contract: pa.Schema, columns: list[str] | None = None, path: Path | None = None
) -> pa.Table:
    """Read the contract columns and cast them to the contract types."""
    names = columns or contract.names
    try:
        table = handle.read(columns=names)
        target = pa.schema([contract.field(n) for n in names])
        return table.cast(target)
    except (pa.ArrowInvalid, OSError, ValueError) as err:  # ValueError: nulls in a required column
        raise DataContractError(f"{path or 'raw log'}: cannot be read against its contract ({err})") from None


# ---- the join --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RequestSide:
    """The request-side columns, one row per request sorted by id, and the exposure lookup."""

    table: pa.Table  # REQUEST_KEYS + REQUEST_FEATURES, sorted by request_id
    request_ids: np.ndarray  # sorted unique request ids
    exp_keys: np.ndarray  # sorted composite keys of the exposures (request_id, item_id)
    exp_label: np.ndarray  # click, aligned with exp_keys
    exp_position: np.ndarray  # display position, aligned with exp_keys


def _composite(request_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """One sortable key per (request, item): a structured array compares lexicographically."""
    out = np.empty(len(request_ids), dtype=[("r", "<i8"), ("i", "<i8")])
    out["r"], out["i"] = request_ids, item_ids
    return out


def _request_side(exposure: pa.Table) -> _RequestSide:
    req = exposure["request_id"].to_numpy()
    order = np.argsort(req, kind="stable")
    ids, first = np.unique(req[order], return_index=True)
    keep = ["request_id", "timestamp", "user_id", *schema.REQUEST_FEATURES]
    table = exposure.select(keep).take(pa.array(order[first]))
    keys = _composite(req, exposure["item_id"].to_numpy())
    korder = np.argsort(keys, kind="stable")
    return _RequestSide(
        table=table,
        request_ids=ids,
        exp_keys=keys[korder],
        exp_label=exposure["click"].to_numpy()[korder],
        exp_position=exposure["position"].to_numpy()[korder],
    )


def _lookup_requests(side: _RequestSide, request_ids: np.ndarray, path: Path) -> np.ndarray:
    idx = np.searchsorted(side.request_ids, request_ids)
    idx_clipped = np.minimum(idx, len(side.request_ids) - 1)
    orphan = (
        side.request_ids[idx_clipped] != request_ids
        if len(side.request_ids)
        else np.ones(len(request_ids), bool)
    )
    if orphan.any():
        examples = np.unique(request_ids[orphan])[:5].tolist()
        raise DataContractError(
            f"{path}: {int(orphan.sum())} row(s) belong to requests with no exposure (e.g. {examples})"
        )
    return idx_clipped


def _join_samples(side: _RequestSide, ranking: pa.Table, path: Path) -> pa.Table:
    req = ranking["request_id"].to_numpy()
    items = ranking["item_id"].to_numpy()
    src = ranking["source"].to_numpy(zero_copy_only=False).astype(object)
    req_side = side.table.take(pa.array(_lookup_requests(side, req, path)))

    exposed = src == schema.RankingSource.EXPOSED.value
    label = np.zeros(len(req), np.int8)
    position = np.zeros(len(req), np.int32)
    if exposed.any():
        keys = _composite(req[exposed], items[exposed])
        at = np.minimum(np.searchsorted(side.exp_keys, keys), len(side.exp_keys) - 1)
        found = side.exp_keys[at] == keys
        if not found.all():
            raise DataContractError(
                f"{path}: {int((~found).sum())} 'exposed' ranking row(s) have no exposure-log row"
            )
        label[exposed] = side.exp_label[at]
        position[exposed] = side.exp_position[at]
    source = np.where(
        exposed, np.where(label == 1, schema.Source.EXPOSE_POS.value, schema.Source.EXPOSE_NEG.value), src
    )
    columns = {
        "request_id": ranking["request_id"],
        "timestamp": req_side["timestamp"],
        "user_id": req_side["user_id"],
        "item_id": ranking["item_id"],
        "source": pa.array(source, pa.string()),
        "label": pa.array(label),
        "position": pa.array(position, mask=~exposed),
        **{
            c: ranking[c]
            for c in ("retrieval_pos", "prerank_pos", "rank_pos", "content_type", "true_affinity")
        },
        **{c: req_side[c] for c in schema.REQUEST_FEATURES},
        **{c: ranking[c] for c in schema.ITEM_FEATURES},
    }
    return pa.table(columns).select(schema.LAKE_SAMPLES.names).cast(schema.LAKE_SAMPLES)


def _join_fullflow(side: _RequestSide, fullflow: pa.Table, path: Path) -> pa.Table:
    req_side = side.table.take(pa.array(_lookup_requests(side, fullflow["request_id"].to_numpy(), path)))
    columns = {
        "request_id": fullflow["request_id"],
        "timestamp": req_side["timestamp"],
        "user_id": req_side["user_id"],
        "item_id": fullflow["item_id"],
        "label": fullflow["click"],
        **{
            c: fullflow[c]
            for c in ("exposed", "retrieval_pos", "prerank_pos", "rank_pos", "content_type", "true_affinity")
        },
        **{c: req_side[c] for c in schema.REQUEST_FEATURES},
        **{c: fullflow[c] for c in schema.ITEM_FEATURES},
    }
    return pa.table(columns).select(schema.LAKE_FULLFLOW.names).cast(schema.LAKE_FULLFLOW)


LAKE_TARGETS = {  # lake table -> (raw log, its contract, the lake schema, the join)
    "samples": ("ranking", schema.RANKING_LOG, schema.LAKE_SAMPLES, _join_samples),
    "fullflow": ("fullflow", schema.FULLFLOW_LOG, schema.LAKE_FULLFLOW, _join_fullflow),
}


def _conformed(table: pa.Table, contract: pa.Schema, columns: list[str], path: str) -> pa.Table:
    try:
        return table.select(columns).cast(pa.schema([contract.field(n) for n in columns]))
    except (pa.ArrowInvalid, OSError, ValueError, KeyError) as err:  # ValueError: nulls in a required column
        raise DataContractError(f"{path}: cannot be read against its contract ({err})") from None


@dataclass
class BucketIngest:
    """What one bucket added to the lake."""

    requests: int = 0
    samples: int = 0
    fullflow_rows: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    files: dict[str, lake.PartFile] = field(default_factory=dict)  # lake table -> its uncommitted file


def ingest_bucket(cfg: Config, cut: DayBuckets, bucket: int) -> BucketIngest:
    """Join one bucket: its request side (from the exposure log) onto its ranking and full-flow rows,
    written as the bucket's file of each lake table (``lake.PartWriter``, in row groups of
    ``split.batch_rows``), not yet committed. Every row of a request is in its bucket, so the join
    is exact; the raw rows are read one staging file at a time."""
    exposure = _conformed(
        cut.read("exposure", bucket), schema.EXPOSURE_LOG, EXPOSURE_COLUMNS, cut.raw["exposure"]
    )
    side = _request_side(exposure)
    del exposure
    out = BucketIngest(requests=len(side.request_ids))
    by_source: Counter = Counter()
    for table, (raw, contract, out_schema, join) in LAKE_TARGETS.items():
        files = cut.bucket_files(raw, bucket)
        if not files:
            continue
        writer = lake.PartWriter(cfg, table, cut.date, bucket, out_schema)
        for path in files:
            part = _conformed(cut.store.read(path), contract, contract.names, cut.raw[raw])
            joined = join(side, part, Path(cut.raw[raw]))
            writer.write(joined)
            if "source" in joined.column_names:
                counts = pc.value_counts(joined["source"]).to_pylist()
                by_source.update({c["values"]: c["counts"] for c in counts})
        written = writer.close()
        if written is None:
            continue
        out.files[table] = written
        if table == "samples":
            out.samples = written.rows
        else:
            out.fullflow_rows = written.rows
    out.by_source = dict(by_source)
    return out


def ingest_day(
    cfg: Config, date: dt.date, require_validated: bool = True, mapper: Mapper = local_map
) -> IngestReport:
    """Validated landing logs of ``date`` → day D of the lake tables ``samples`` and ``fullflow``.

    Ingest publishes only a day whose landing files passed validation unchanged (the validated lake
    never holds anything else); ``require_validated=False`` is for fixtures and benchmarks that build
    a lake from trusted simulated logs. A contract error quarantines the day and raises. ``mapper``
    runs the buckets (``hap.core.engine``)."""
    date = layout.day(date)
    if require_validated:
        markers.require_fresh_validation(cfg, date, "ingest")
    try:
        return _ingest(cfg, date, mapper)
    except (DataContractError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as err:
        message = str(err) if isinstance(err, DataContractError) else f"ingest of {date}: {err}"
        qdir = quarantine_day(
            cfg, date, {"step": "ingest", "status": "failed", "check": "contract", "error": message}
        )
        raise DataContractError(
            f"{message}\n  the day was moved to {qdir}; fix the data, then "
            f"`hap release-quarantine --date {date}`"
        ) from None


def _ingest(cfg: Config, date: dt.date, mapper: Mapper) -> IngestReport:
    for name in schema.RAW_LOGS:  # the footers against the contract, before any row is read
        open_raw_log(cfg, date, name)
    cut = cut_day(cfg, date, schema.RAW_LOGS, mapper)  # validation's cut, when the files are unchanged
    problems = [f"{cut.raw[n]}: {stats.problem}" for n, stats in cut.files.items() if stats.problem]
    if problems:
        raise DataContractError("; ".join(problems))
    report = IngestReport(date=date)
    by_source: Counter = Counter()
    written: dict[str, list[lake.PartFile]] = {table: [] for table in LAKE_TARGETS}
    for part in mapper(functools.partial(ingest_bucket, cfg, cut), cut.ids):
        report.requests += part.requests
        report.samples += part.samples
        report.fullflow_rows += part.fullflow_rows
        by_source.update(part.by_source)
        for table, file in part.files.items():
            written[table].append(file)
    # one commit per table; fullflow first, so a day whose samples are visible has its full flow
    for table in ("fullflow", "samples"):
        lake.commit_day(cfg, table, date, LAKE_TARGETS[table][2], written[table])
        report.paths.append(f"{redact(lake.table_url(cfg, table))}/{layout.partition(date)}")
    report.by_source = dict(by_source)
    drop_cut(cfg, date)  # the lake now holds the day; the buckets were a scratch copy
    return report
