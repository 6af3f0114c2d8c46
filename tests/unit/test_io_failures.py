"""A file that cannot be reached is a storage failure (exit 9), never a data-contract finding: only
content that was read and is not valid quarantines a day (``hap.core.errors.is_io_failure``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hap.core import engine
from hap.core.errors import InputUnreachable, StorageError, is_io_failure
from hap.data import frames
from hap.data.buckets import Slice, cut_slice
from hap.data.staging_store import StagingStore


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """A good file and the ways its content can be broken."""
    good = tmp_path / "good.parquet"
    pq.write_table(
        pa.table({"request_id": np.arange(50_000), "x": np.random.rand(50_000)}), good, row_group_size=5_000
    )
    data = good.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "not_parquet": os.urandom(4_000),
        "corrupt_page": data[: len(data) // 3] + os.urandom(2_000) + data[len(data) // 3 + 2_000 :],
        "corrupt_footer": data[:-200] + os.urandom(192) + data[-8:],
    }
    out = {"good": good}
    for name, content in broken.items():
        out[name] = tmp_path / f"{name}.parquet"
        out[name].write_bytes(content)
    return out


def _read_whole(path: Path) -> Exception | None:
    try:
        pq.ParquetFile(path).read()
    except Exception as err:  # noqa: BLE001 - the corpus's errors, whatever their class
        return err
    return None


def test_corrupt_content_is_not_an_io_failure(corpus) -> None:
    for name, path in corpus.items():
        err = _read_whole(path)
        assert (err is None) == (name == "good"), name
        if err is not None:
            assert not is_io_failure(err), (name, err)
            table, problem = frames.read_table(path)
            assert table is None and problem.check == "parquet_readable", name


@pytest.mark.parametrize(
    "err",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        PermissionError(errno.EACCES, "Permission denied"),
        TimeoutError("timed out"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(errno.EIO, "Input/output error"),
        OSError(
            "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect to server"
        ),
        OSError("When reading information for key 'landing/x': AWS Error ACCESS_DENIED during HeadObject"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:24],
)
def test_unreachable_files_are_io_failures(err: OSError) -> None:
    assert is_io_failure(err)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_failed_write_is_not_a_file_not_reached(code: int, tmp_path) -> None:
    """A full disk or a read-only mount stays the step's ``WriteFailed``, even inside a mapped item."""
    assert not is_io_failure(OSError(code, os.strerror(code)))

    def write(_: object) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path / "out.parquet"))

    with pytest.raises(OSError) as raised:
        engine.local_map(write, [1])
    assert not isinstance(raised.value, InputUnreachable) and raised.value.errno == code


def test_a_file_not_reached_raises_a_file_not_landed_is_a_finding(corpus, tmp_path) -> None:
    beyond = corpus["good"] / "exposure.parquet"  # under a plain file: ENOTDIR from the OS itself
    try:
        beyond.open("rb")
    except OSError as err:
        os_error = err
    with pytest.raises(InputUnreachable, match="not bad data") as raised:
        frames.unreadable_or_raise(beyond, os_error)
    assert str(beyond) in str(raised.value) and raised.value.exit_code == StorageError.exit_code == 9
    missing, problem = frames.open_parquet(tmp_path / "never-landed.parquet")
    assert missing is None and problem.check == "file_exists"  # missing from the day: the data's fault


def test_a_slice_the_worker_cannot_reach_raises_a_corrupt_one_is_reported(corpus, tmp_path) -> None:
    out = StagingStore(str(tmp_path / "out"))
    gone = Slice("exposure", str(tmp_path / "moved-away.parquet"), 0, (0,))
    with pytest.raises(InputUnreachable, match="moved-away"):
        cut_slice(out, 2, gone)
    corrupt = Slice("exposure", str(corpus["corrupt_page"]), 0, tuple(range(10)))
    assert cut_slice(out, 2, corrupt).problem
    good = cut_slice(out, 2, Slice("exposure", str(corpus["good"]), 0, (0, 1)))
    assert good.rows == 10_000 and good.problem is None


def test_any_reader_in_a_mapped_item_fails_as_storage_when_its_file_is_gone(tmp_path) -> None:
    def read(path: Path) -> int:
        return pq.read_table(path).num_rows

    with pytest.raises(InputUnreachable, match="gone.parquet"):
        engine.local_map(read, [tmp_path / "gone.parquet"])

    def bad_value(_: object) -> None:
        raise ValueError("a bug, not storage")

    with pytest.raises(ValueError):
        engine.local_map(bad_value, [1])
