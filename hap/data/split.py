"""Split: the validated lake window ``[D - w + 1, D]`` → the difficulty-split training set.

Writes, atomically as one folder ``training/dt=D/``:

- ``train/difficulty={positive,hard,easy}/part-YYYYMMDD-BBBBB.parquet``: one row per (request,
  sample) with its ``group`` (the GHCL group it is contrasted in) and ``difficulty``
  (``hap.schema``), Hive-partitioned by difficulty. One file per *unit* and difficulty: a unit is one
  day's lake file of one request-hash bucket (``BBBBB`` is the bucket; ``hap.data.lake.day_parts``),
  and the units are mapped over the workers. The layout is what the streaming trainer (``hap.model.stream``)
  reads one unit at a time:

  - a request never spans units, so a unit's three files (a difficulty with no row in the unit has
    no file) hold whole requests: a unit is a training shard that trains like a small training set;
  - inside every file the rows of a request are contiguous, in the lake file's request order
    (``request_grouping``), in row groups of ``split.batch_rows`` rows;
  - a window yields ``sum over days of ceil(requests / engine.bucket_requests)`` units, at most
    three files each, whatever ``engine.workers`` is.

  Each source is kept with probability ``split.sample_ratio[source]``,
  decided by a salted hash of ``(request_id, item_id)``: no RNG state, so a rebuild of the same
  window with the same params gives the same rows, in the same order, in the same bytes, with one
  worker or many.
- ``eval/part-0.parquet``: the full-flow eval set (every retrieved candidate of at most
  ``split.eval_max_requests`` requests, the ones with the smallest request hash).
- ``train/_data_version.json``: the content hash of the training set (``hap.versioning``).
- ``fullflow/part-0.parquet``: a hashed share (``split.fullflow_share``) of the window's full-flow
  candidates with the stages they reached, the stage-order supervision (``hap.data.fullflow_set``).
- ``profile/``: the user-history profiles, a point-in-time join of earlier days' logs
  (``hap.data.user_history``), which training, evaluation and serving read (``hap.model.cross``).

**Which day is evaluated** is a parameter, never a matter of which days have landed, so the
training set is a pure function of its window and params and ``dvc repro`` rebuilds, on any later
day, the very set a registered model was trained on. ``split.eval_day: last`` (the default, the
daily run's) evaluates on ``D``, the window's last day: the chosen eval requests are *removed from
the training rows of D* (and from the full-flow supervision), so the eval set stays held out at
request level. ``split.eval_day: next`` evaluates on the held-out day ``D + 1``, which must have
passed validation (a benchmark's choice: nothing of the eval day is trained on). ``SplitReport.eval_day``
and ``eval_held_out_day`` record which.

Memory is bounded per unit: the lake is streamed with ``pyarrow.dataset`` one row group at a time (sliced
into ``split.batch_rows`` batches), and each difficulty buffers at most one output row group. Only a
lake file that interleaves requests (ingest never writes one) is regrouped in memory, one unit (one
bucket) at a time.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from hap.core import layout, schema
from hap.core.atomic import atomic_dir, atomic_write_json
from hap.core.config import Config
from hap.core.engine import Mapper, local_map, remote_object_root
from hap.core.errors import DataContractError, HapError
from hap.core.hashing import unit_hash
from hap.core.parquet import PARQUET_OPTIONS, RowGroupWriter
from hap.core.storage import redact
from hap.data import lake, markers
from hap.data.fullflow_set import write_fullflow_set
from hap.data.user_history import build_profiles

PART_FILE = "part-0.parquet"
REPORT_FILE = layout.SPLIT_REPORT_FILE
DIFFICULTIES: tuple[str, ...] = tuple(d.value for d in schema.Difficulty)
_EVAL_SALT_OFFSET = 0x5EED  # a different hash stream for choosing eval requests


@dataclass
class SplitReport:
    date: dt.date
    window: list[dt.date]
    eval_day: dt.date
    eval_held_out_day: bool  # True: eval day is D+1; False: D, its eval requests removed from train
    rows: int = 0  # training rows written
    lake_rows: int = 0  # lake rows read from the window
    by_source: dict[str, int] = field(default_factory=dict)
    by_difficulty: dict[str, int] = field(default_factory=dict)
    eval_requests: int = 0
    eval_rows: int = 0
    fullflow_rows: int = 0  # the window's full-flow rows kept as stage-order supervision
    data_version: str = ""
    train_path: Path | None = None
    eval_path: Path | None = None

    def summary(self) -> dict:
        """Paths-free, deterministic summary (DVC tracks it as a metrics file)."""
        out = asdict(self)
        out.pop("train_path"), out.pop("eval_path")
        out["date"], out["eval_day"] = self.date.isoformat(), self.eval_day.isoformat()
        out["window"] = [d.isoformat() for d in self.window]
        out["by_source"], out["by_difficulty"] = (
            dict(sorted(self.by_source.items())),
            dict(sorted(self.by_difficulty.items())),
        )
        return out

    def render(self) -> str:
        eval_note = "held-out day D+1" if self.eval_held_out_day else "last window day, requests held out"
        diff = ", ".join(f"{k}={v}" for k, v in sorted(self.by_difficulty.items()))
        return (
            f"split {self.date} (window {self.window[0]}..{self.window[-1]}): {self.rows} training rows "
            f"of {self.lake_rows} ({diff}) -> {self.train_path}\n"
            f"eval {self.eval_day} ({eval_note}): {self.eval_requests} requests, {self.eval_rows} rows "
            f"-> {self.eval_path}\n"
            f"data version {self.data_version}"
        )


# ---- eval day and eval requests -------------------------------------------------------------------
def choose_eval_day(cfg: Config, date: dt.date) -> tuple[dt.date, bool]:
    """The eval day ``split.eval_day`` names, and whether it lies outside the window (module doc)."""
    if cfg.split.eval_day == "last":
        return date, False
    nxt = date + dt.timedelta(days=1)
    if not (markers.is_validated(cfg, nxt) and lake.has_day(cfg, "fullflow", nxt)):
        raise HapError(
            f"split: split.eval_day is 'next' but {nxt} has not been validated and ingested; run "
            f"`hap validate --date {nxt}` and `hap ingest --date {nxt}`, or use split.eval_day=last"
        )
    return nxt, True


def stream_batches(
    dataset: ds.Dataset, columns: list[str], batch_rows: int, filter: ds.Expression | None = None
) -> Iterator[pa.RecordBatch]:
    """Pull the lake one row group at a time, in file and row-group order.

    A synchronous pull keeps memory flat: peak memory is one lake row group (ingest writes them
    at a fixed size) plus the writer's buffers, whatever the window's volume. (``Dataset.to_batches``
    reads ahead asynchronously; with a slower consumer its queue grew to ~0.7 GB at 100k requests.)
    """
    for fragment in dataset.get_fragments():
        for row_group in fragment.split_by_row_group():
            yield from row_group.to_table(columns=columns, filter=filter).to_batches(max_chunksize=batch_rows)


def _lake_files(cfg: Config, table: str, date: dt.date) -> list[lake.Part]:
    """The day's committed lake files of ``table``, in bucket order (each holds whole requests)."""
    parts = lake.day_parts(cfg, table, date)
    if not parts:
        raise HapError(
            f"split: no lake data for {date} in {redact(lake.table_url(cfg, table))} although it "
            f"is marked validated; run `hap ingest --date {date}` and `hap validate --date {date}`"
        )
    return parts


def _lake_dataset(cfg: Config, table: str, date: dt.date) -> ds.Dataset:
    return lake.parts_dataset(cfg, _lake_files(cfg, table, date))


def choose_eval_requests(cfg: Config, eval_day: dt.date) -> np.ndarray:
    """The full-flow requests of ``eval_day`` with the smallest hashes, at most ``eval_max_requests``."""
    ids = _lake_dataset(cfg, "fullflow", eval_day).to_table(columns=["request_id"])["request_id"]
    ids = np.unique(ids.to_numpy())
    h = unit_hash(ids, 0, cfg.split.seed + _EVAL_SALT_OFFSET)
    order = np.lexsort((ids, h))[: cfg.split.eval_max_requests]
    return np.sort(ids[order])


def _write_eval_set(cfg: Config, eval_day: dt.date, request_ids: np.ndarray, out: Path) -> int:
    dataset = _lake_dataset(cfg, "fullflow", eval_day)
    keep = pa.array(request_ids, pa.int64())
    feature_cols = [c for c in schema.EVAL_SET.names if c != "dt"]
    rows = 0
    with pq.ParquetWriter(out, schema.EVAL_SET, **PARQUET_OPTIONS) as writer:
        for batch in stream_batches(
            dataset,
            feature_cols,
            cfg.split.batch_rows,
            filter=pc.is_in(ds.field("request_id"), value_set=keep),
        ):
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch])
            table = table.append_column("dt", pa.array([eval_day.isoformat()] * table.num_rows, pa.string()))
            writer.write_table(table.select(schema.EVAL_SET.names).cast(schema.EVAL_SET))
            rows += table.num_rows
    return rows


def _write_eval_samples(cfg: Config, eval_day: dt.date, request_ids: np.ndarray, out: Path) -> None:
    """The eval requests' lake samples, so evaluation reads the training folder only."""
    keep = pc.is_in(ds.field("request_id"), value_set=pa.array(request_ids, pa.int64()))
    with pq.ParquetWriter(out, schema.LAKE_SAMPLES, **PARQUET_OPTIONS) as writer:
        for batch in stream_batches(
            _lake_dataset(cfg, "samples", eval_day), schema.LAKE_SAMPLES.names, cfg.split.batch_rows, keep
        ):
            writer.write_table(pa.Table.from_batches([batch]).cast(schema.LAKE_SAMPLES))


# ---- the training set -----------------------------------------------------------------------------
class _PartitionWriter:
    """One Parquet file per difficulty, in whole row groups (``RowGroupWriter``)."""

    def __init__(self, root: Path, row_group_rows: int, file_name: str = PART_FILE) -> None:
        self.writers = {
            d: RowGroupWriter(root / f"difficulty={d}" / file_name, schema.TRAINING_SET, row_group_rows)
            for d in DIFFICULTIES
        }

    def add(self, difficulty: str, table: pa.Table) -> None:
        self.writers[difficulty].write(table)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _label_batch(
    batch: pa.RecordBatch, day: dt.date, cfg: Config, ratios: np.ndarray, drop_requests: pa.Array | None
) -> tuple[pa.Table, np.ndarray]:
    """Sample one lake batch and add ``dt``, ``group``, ``difficulty``; returns the rows and their
    source index (into ``schema.SOURCES``)."""
    src_idx = pc.index_in(batch["source"], value_set=pa.array(schema.SOURCES))
    if src_idx.null_count:
        bad = pc.unique(pc.filter(batch["source"], pc.is_null(src_idx))).to_pylist()[:5]
        raise DataContractError(f"split: unknown sample source(s) {bad} in the lake for {day}")
    idx = src_idx.to_numpy(zero_copy_only=False).astype(np.int64)
    keep = (
        unit_hash(batch["request_id"].to_numpy(), batch["item_id"].to_numpy(), cfg.split.seed) < ratios[idx]
    )
    if drop_requests is not None:
        keep &= ~pc.is_in(batch["request_id"], value_set=drop_requests).to_numpy(zero_copy_only=False)
    table = pa.Table.from_batches([batch]).filter(pa.array(keep))
    idx = idx[keep]
    groups = np.array([schema.GROUP_OF_SOURCE[s] for s in schema.SOURCES], dtype=object)
    diffs = np.array([schema.DIFFICULTY_OF_SOURCE[s] for s in schema.SOURCES], dtype=object)
    table = (
        table.append_column("dt", pa.array([day.isoformat()] * table.num_rows, pa.string()))
        .append_column("group", pa.array(groups[idx], pa.string()))
        .append_column("difficulty", pa.array(diffs[idx], pa.string()))
    )
    return table.select(schema.TRAINING_SET.names).cast(schema.TRAINING_SET), idx


def request_grouping(request_ids: np.ndarray) -> np.ndarray | None:
    """``None`` when every request's rows are already contiguous, else the stable permutation that
    makes them so (requests in the order they first appear, rows of a request in file order)."""
    runs = 1 + int(np.count_nonzero(request_ids[1:] != request_ids[:-1])) if len(request_ids) else 0
    _, first, inverse = np.unique(request_ids, return_index=True, return_inverse=True)
    if runs == len(first):
        return None
    first_seen_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return np.argsort(first_seen_rank[inverse], kind="stable")


def _request_contiguous_batches(
    cfg: Config, part: lake.Part, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """A unit's lake rows with each request's rows contiguous, in ``batch_rows`` batches.

    Ingest writes a bucket request by request, so the unit streams one row group at a time; a lake
    file that interleaves requests (another writer) is regrouped in memory, which the bucket bounds."""
    dataset = lake.parts_dataset(cfg, [part])
    order = request_grouping(dataset.to_table(columns=["request_id"])["request_id"].to_numpy())
    if order is None:
        yield from stream_batches(dataset, columns, batch_rows)
        return
    yield from dataset.to_table(columns=columns).take(pa.array(order)).to_batches(max_chunksize=batch_rows)


@dataclass(frozen=True)
class Unit:
    """One day's lake file of one bucket: the split's unit of work, and a training-set shard."""

    part: lake.Part

    @property
    def day(self) -> dt.date:
        return self.part.date

    @property
    def shard(self) -> str:
        """The unit's file name in every difficulty partition: ``part-YYYYMMDD-BBBBB.parquet``."""
        return f"part-{self.day:%Y%m%d}-{self.part.bucket:05d}.parquet"


def split_unit(
    cfg: Config, train_dir: str, eval_day: dt.date, drop: np.ndarray | None, unit: Unit
) -> tuple[int, Counter]:
    """Sample and label one unit into its shard of each difficulty partition; (lake rows, rows
    kept per source index). The same unit gives the same bytes wherever it runs."""
    ratios = _sample_ratios(cfg)
    drop_requests = pa.array(drop, pa.int64()) if drop is not None and unit.day == eval_day else None
    read_cols = [c for c in schema.TRAINING_SET.names if c not in ("dt", "group", "difficulty")]
    writer = _PartitionWriter(Path(train_dir), cfg.split.batch_rows, unit.shard)
    lake_rows, by_source = 0, Counter()
    try:
        for batch in _request_contiguous_batches(cfg, unit.part, read_cols, cfg.split.batch_rows):
            lake_rows += batch.num_rows
            table, idx = _label_batch(batch, unit.day, cfg, ratios, drop_requests)
            by_source.update(dict(zip(*np.unique(idx, return_counts=True))))
            for difficulty in DIFFICULTIES:
                part = table.filter(pc.equal(table["difficulty"], difficulty))
                if part.num_rows:
                    writer.add(difficulty, part)
    finally:
        writer.close()
    return lake_rows, Counter({int(k): int(v) for k, v in by_source.items()})


def _sample_ratios(cfg: Config) -> np.ndarray:
    unknown = set(cfg.split.sample_ratio) - set(schema.SOURCES)
    if unknown:
        raise HapError(
            f"split.sample_ratio: unknown source(s) {sorted(unknown)}; known: {list(schema.SOURCES)}"
        )
    ratios = np.array([float(cfg.split.sample_ratio.get(s, 1.0)) for s in schema.SOURCES])
    if ((ratios < 0) | (ratios > 1)).any():
        raise HapError(f"split.sample_ratio: every ratio must be in [0, 1], got {cfg.split.sample_ratio}")
    return ratios


def build_training_set(cfg: Config, date: dt.date, mapper: Mapper = local_map) -> SplitReport:
    """Build ``training/dt=D/{train,eval}`` from the validated lake window ending on ``date``;
    ``mapper`` runs the units (``hap.core.engine``), except on workers of other hosts over an
    object-store root (``remote_object_root``): the units write the training set into this
    process's working copy, so they run here, reading the lake from its bucket."""
    from hap.data.versioning import record_data_version  # local: versioning imports this module's constants

    date = layout.day(date)
    window = layout.window(date, cfg.split.window_days)
    markers.require_validated(cfg, window, "split")
    _sample_ratios(cfg)  # a bad ratio fails before any work
    eval_day, held_out = choose_eval_day(cfg, date)
    eval_ids = choose_eval_requests(cfg, eval_day)
    report = SplitReport(date=date, window=window, eval_day=eval_day, eval_held_out_day=held_out)
    by_source: Counter = Counter()
    target = layout.training_set(cfg, date).parent
    with atomic_dir(target) as tmp:
        train_dir, eval_dir = tmp / layout.training_set(cfg, date).name, tmp / layout.eval_set(cfg, date).name
        train_dir.mkdir()
        eval_dir.mkdir()
        drop = eval_ids if not held_out else None
        mapper = local_map if remote_object_root(cfg) else mapper
        units = [Unit(part) for day in window for part in _lake_files(cfg, "samples", day)]
        counts = mapper(functools.partial(split_unit, cfg, str(train_dir), eval_day, drop), units)
        for lake_rows, unit_sources in counts:
            report.lake_rows += lake_rows
            by_source.update(unit_sources)
        report.eval_rows = _write_eval_set(cfg, eval_day, eval_ids, eval_dir / PART_FILE)
        fullflow_days = {d: _lake_dataset(cfg, "fullflow", d) for d in window if cfg.split.fullflow_share > 0}
        fullflow_out = tmp / layout.fullflow_set(cfg, date).name / PART_FILE
        report.fullflow_rows = write_fullflow_set(cfg, window, fullflow_days, drop, fullflow_out)
        samples_dir = tmp / layout.eval_samples(cfg, date).name
        samples_dir.mkdir()
        _write_eval_samples(cfg, eval_day, eval_ids, samples_dir / PART_FILE)
        report.eval_requests = len(eval_ids)
        report.by_source = {schema.SOURCES[int(i)]: int(n) for i, n in by_source.items()}
        report.rows = sum(report.by_source.values())
        diff_counts: Counter = Counter()
        for source, n in report.by_source.items():
            diff_counts[schema.DIFFICULTY_OF_SOURCE[source]] += n
        report.by_difficulty = dict(diff_counts)
        profile_dir = tmp / layout.profile_dir(cfg, date).name
        build_profiles(cfg, window, eval_day, profile_dir)
        report.data_version = record_data_version(train_dir)
        report.train_path, report.eval_path = layout.training_set(cfg, date), layout.eval_set(cfg, date)
        # the split's metadata travels with the training set (``_`` files are outside its data version)
        atomic_write_json(train_dir / layout.SPLIT_META_FILE, report.summary())
    atomic_write_json(layout.metrics_dir(cfg, date) / REPORT_FILE, report.summary())
    return report


def open_training_set(path: Path) -> ds.Dataset:
    """The training set as a ``pyarrow.dataset`` (hive partition ``difficulty``; ``_*`` files ignored)."""
    return ds.dataset(str(path), format="parquet", partitioning="hive", schema=schema.TRAINING_SET)


def read_report(cfg: Config, date: dt.date) -> dict:
    return json.loads((layout.metrics_dir(cfg, date) / REPORT_FILE).read_text())
