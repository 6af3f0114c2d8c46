"""Expected failures. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations

import errno
import os
import socket


class HapError(Exception):
    """An expected, user-facing failure (bad input, missing prerequisite, refused promotion)."""

    exit_code = 1


class StorageError(HapError):
    """An object store or a file could not be reached, refused access, or has no such bucket:
    the storage's failure, never the data's (``hap.core.storage``, ``InputUnreachable``)."""

    exit_code = 9


class InputUnreachable(StorageError):
    """A process could not reach a file it had to read: missing where this process looks, permission
    denied, an I/O error, a storage timeout or a refused connection. Not a verdict on the data: the
    step fails, the day stays in ``landing/``, and a re-run once the storage answers completes."""


# the OSError messages of pyarrow / fsspec / botocore that mean "not reached", where no errno says so
_IO_MARKERS = (
    "no such file",
    "permission denied",
    "timed out",
    "timeout",
    "connection",
    "couldn't connect",
    "could not connect",
    "network",
    "curlcode",
    "unreachable",
    "input/output error",
    "stale file handle",
    "access denied",
    "access_denied",
    "forbidden",
)


# errnos of a write that failed (full disk, read-only or over quota): WriteFailed's, not a file not reached
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})


def is_io_failure(err: BaseException) -> bool:
    """Whether ``err`` says a file was not reached (as opposed to read and found corrupt): the
    ``OSError`` subclasses of missing files, permissions, timeouts and connections, an ``OSError``
    with an errno, or a storage client's message saying so. Arrow's corrupt-content errors are
    ``ArrowInvalid`` or errno-less ``OSError`` without those words, and stay contract findings; a
    failed write (full disk, read-only) stays the caller's ``WriteFailed``."""
    if isinstance(err, (FileNotFoundError, PermissionError, TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError):
        if err.errno in _WRITE_ERRNOS:
            return False
        if err.errno:
            return True
        text = str(err).lower()
        return any(marker in text for marker in _IO_MARKERS)
    return False


def unreachable(path: object, err: BaseException) -> InputUnreachable:
    """The ``InputUnreachable`` of ``path``, naming the host that could not read it: on a Dask
    worker it is often the worker, not the file, that is wrong (it cannot see the client's disk)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputUnreachable(
        f"cannot read {path} on host {socket.gethostname()} (pid {os.getpid()}): {reason}. "
        "This is a storage or engine failure, not bad data: the day stays in landing/. Every Dask "
        "worker must reach the data root: at the same path, or in its bucket (docs/scaling.md)"
    )


class DataContractError(HapError):
    """A raw log cannot be read or does not match its contract in ``hap.schema``."""

    exit_code = 2


class ValidationFailed(HapError):
    """A day failed its Great Expectations suites and was quarantined."""

    exit_code = 3


class NotValidated(HapError):
    """A downstream step was asked to use a day that has not passed validation."""

    exit_code = 4


class WriteFailed(HapError):
    """An output could not be written (full disk, read-only or missing folder); nothing partial is left."""

    exit_code = 5

    def __init__(self, path: object, err: OSError) -> None:
        text = str(err).strip().splitlines()
        reason = os.strerror(err.errno) if err.errno else (text[0] if text else type(err).__name__)
        if not err.errno and "No space left on device" in str(err):
            reason = "No space left on device"
        super().__init__(
            f"cannot write {path}: {reason}; nothing was left half-written, earlier data is intact"
        )
        self.path = str(path)


class DayRejected(HapError):
    """A step found data it must not use: the day is quarantined (``reason`` says why, for the
    machine), nothing downstream is published, and the champion stays."""

    exit_code = 7

    def __init__(
        self, message: str, date: str, step: str, check: str, file: str = "", examples: list | None = None
    ):
        super().__init__(message)
        self.date, self.step, self.check, self.file = date, step, check, file
        self.examples = list(examples or [])

    def reason(self) -> dict:
        return {
            "step": self.step,
            "status": "failed",
            "check": self.check,
            "file": self.file,
            "examples": self.examples,
            "error": str(self),
        }


class NonFiniteData(DayRejected):
    """Training data or a training loss holds NaN or infinity."""

    exit_code = 8
