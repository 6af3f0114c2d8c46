"""Where a cut day's bucket files live, and the one way the data path reads and writes them.

Normally the cut is a folder of the data root (``staging/dt=D``, ``hap.data.buckets``). When the
Dask workers run on other hosts and the data root is on object storage
(``engine.remote_object_root``), no worker can see the flow runner's working copy. The cut then
lives in the root's bucket instead, under ``paths.shared_staging`` (never synced into a working
copy): every worker reads the landing files from the bucket and writes and reads the buckets
there, with its own credentials (its ``AWS_*`` variables), and the flow runner keeps only the
cut's record (``_cut.json``) in its copy. A location is therefore a folder or an object-store URL,
and every read and write goes through pyarrow's filesystem of that location, bounded by ``lake:``
(``hap.data.lake.arrow_filesystem``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hap.core.config import Config
from hap.core.storage import is_url
from hap.data.lake import arrow_filesystem

STAGING_FORMAT = ds.IpcFileFormat()
STAGING_OPTIONS = STAGING_FORMAT.make_write_options(compression="lz4")  # scratch: fast over small
STAGING_SUFFIX = ".arrow"


@dataclass(frozen=True)
class StagingStore:
    """A cut's root (a folder or an object-store prefix) and the bounds of every call on it.
    Picklable: it travels to the Dask workers with the cut."""

    root: str
    timeout_seconds: float = 10.0
    max_retries: int = 1

    @classmethod
    def of(cls, cfg: Config, root: str) -> StagingStore:
        return cls(str(root), cfg.lake.timeout_seconds, cfg.lake.max_retries)

    @property
    def remote(self) -> bool:
        """Whether the cut is on object storage (read and written by every host on its own)."""
        return is_url(self.root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def filesystem(self, location: str) -> tuple[pafs.FileSystem, str]:
        """pyarrow's filesystem of ``location`` (this root's or a landing file's) and its path there."""
        return arrow_filesystem(location, self.timeout_seconds, self.max_retries)

    def files(self, folder: str, suffix: str = STAGING_SUFFIX) -> list[str]:
        """The files directly in ``folder`` whose names end with ``suffix``, sorted; none when the
        folder does not exist (an empty bucket)."""
        fs, path = self.filesystem(folder)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
        scheme = self.root.split("://", 1)[0] + "://" if self.remote else ""
        return sorted(scheme + p for p in found)

    def read(self, location: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One staging file (``write_partitioned``), all columns or ``columns``."""
        fs, path = self.filesystem(location)
        with fs.open_input_file(path) as f:
            return feather.read_table(f, columns=list(columns) if columns is not None else None)

    def write_partitioned(self, table: pa.Table, column: str, part: object, folder: str, stem: str) -> None:
        """Write ``table``'s rows as Hive partitions ``column=K/{stem}-0.arrow`` of ``folder`` by
        ``part``, keeping their order (pyarrow's partitioned write: the shuffle is the filesystem)."""
        fs, path = self.filesystem(folder)
        ds.write_dataset(
            table.append_column(column, pa.array(part, pa.int32())),
            base_dir=path,
            filesystem=fs,
            format=STAGING_FORMAT,
            file_options=STAGING_OPTIONS,
            partitioning=ds.partitioning(pa.schema([(column, pa.int32())]), flavor="hive"),
            basename_template=f"{stem}-{{i}}{STAGING_SUFFIX}",
            existing_data_behavior="overwrite_or_ignore",
            use_threads=False,
            preserve_order=True,
        )

    def remove(self, folder: str) -> None:
        """Delete ``folder`` and everything below it; nothing when it does not exist."""
        fs, path = self.filesystem(folder)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def parquet(self, location: str) -> pq.ParquetFile:
        """A landing file, opened where this host reaches it."""
        fs, path = self.filesystem(location)
        return pq.ParquetFile(fs.open_input_file(path))
