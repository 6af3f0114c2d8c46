"""Which failures are worth a retry.

Transient faults (I/O errors, a tracking server that is down or times out) are retried with
exponential backoff. Expected failures (``hap.errors.HapError``: a day that fails validation, a
missing prerequisite, a refused promotion) are never retried: retrying cannot change the answer.
"""

from __future__ import annotations

from typing import Any

from hap.core.errors import HapError
from hap.registry.tracking import TrackingUnavailable

# Text of errors from HTTP clients (MLflow's REST client, httpx) that mean "the server is not there".
_TRANSIENT_TEXT = (
    "Max retries exceeded",
    "Connection refused",
    "ConnectionError",
    "timed out",
    "Temporary failure",
    "503",
    "502",
    "504",
)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures that may succeed when tried again a moment later."""
    if isinstance(exc, TrackingUnavailable):  # a server restart may end within the retry budget
        return True
    if exc is None or isinstance(exc, HapError):
        return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):  # requests' errors are OSErrors
        return True
    name = type(exc).__name__
    if name in {"ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"}:  # httpx
        return True
    if name == "MlflowException":
        return any(text in str(exc) for text in _TRANSIENT_TEXT)
    return False


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures (never a ``HapError``)."""
    exc = state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)


def backoff(base_seconds: float, retries: int) -> list[float]:
    """Exponential backoff delays: base, 2*base, 4*base, ..."""
    return [base_seconds * 2**i for i in range(retries)]
