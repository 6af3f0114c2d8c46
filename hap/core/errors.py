"""Expected failures. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations


class HapError(Exception):
    """An expected, user-facing failure (bad input, missing prerequisite, refused promotion)."""

    exit_code = 1


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
        import os

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
