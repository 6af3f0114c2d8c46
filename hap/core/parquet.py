"""Parquet writing shared by the data steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_OPTIONS: dict[str, Any] = dict(compression="zstd", write_statistics=True)


class RowGroupWriter:
    """A Parquet file written in row groups of ``row_group_rows``, however small the tables handed
    to it: a bucket arrives as one small piece per slice of the raw log, and the number of slices
    grows with the day, so writing each piece as it comes would shrink the row groups as the day
    grows. The file is created at the first row group (a writer given no rows writes no file).
    ``filesystem`` writes through pyarrow's filesystem (object storage: the lake) instead of the
    local disk."""

    def __init__(
        self, path: Path, schema: pa.Schema, row_group_rows: int, filesystem: pafs.FileSystem | None = None
    ) -> None:
        self.path, self.schema, self.row_group_rows = Path(path), schema, row_group_rows
        self.filesystem = filesystem
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._write(whole_groups_only=True)

    def _write(self, whole_groups_only: bool) -> None:
        """Write the buffer's whole row groups (and, at close, the rest), keeping row order."""
        table = pa.concat_tables(self._buffer)
        n = table.num_rows - table.num_rows % self.row_group_rows if whole_groups_only else table.num_rows
        if n:
            if self._writer is None:
                self._writer = self._open()
            self._writer.write_table(table.slice(0, n), row_group_size=self.row_group_rows)
        rest = table.slice(n)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def _open(self) -> pq.ParquetWriter:
        if self.filesystem is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return pq.ParquetWriter(self.path, self.schema, **PARQUET_OPTIONS)
        self.filesystem.create_dir(str(self.path.parent), recursive=True)
        return pq.ParquetWriter(str(self.path), self.schema, filesystem=self.filesystem, **PARQUET_OPTIONS)

    def close(self) -> None:
        if self._buffer:
            self._write(whole_groups_only=False)
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
