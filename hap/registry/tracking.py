"""Where MLflow lives: the tracking URI, a safely initialized SQLite store, the experiment.

``MLFLOW_TRACKING_URI`` points at a server in production. Without it the embedded default is
``sqlite:///<data root>/mlflow.db`` with artifacts under ``<data root>/mlartifacts``. A fresh
SQLite database opened by two processes at once breaks (STACK.md), so the first process to
touch it creates the schema and the experiment under an exclusive file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hap.core import environ
from hap.core.config import Config
from hap.core.errors import HapError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def tracking_uri(cfg: Config) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{cfg.path('mlflow_db')}"


def registry_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri(cfg)


def is_embedded(cfg: Config) -> bool:
    return tracking_uri(cfg).startswith("sqlite:")


def artifact_location(cfg: Config) -> str | None:
    """Artifacts under the data root for the embedded store; a server decides its own."""
    return cfg.path("mlflow_artifacts").as_uri() if is_embedded(cfg) else None


@contextlib.contextmanager
def _init_lock(cfg: Config) -> Iterator[None]:
    if not is_embedded(cfg):
        yield
        return
    lock = Path(str(cfg.path("mlflow_db")) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def fluent(cfg: Config) -> Iterator[None]:
    """Point MLflow's fluent API (``start_run``, ``pyfunc.load_model``) at ``cfg``'s store, then undo it.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` into this process's
    environment, which ``tracking_uri`` reads as the user's choice: left in place, the first store
    a process touched would capture every later config. So the setting is scoped.
    """
    import mlflow

    bound_http(cfg)
    with environ.restored(_URI_VARS):
        mlflow.set_tracking_uri(tracking_uri(cfg))
        mlflow.set_registry_uri(registry_uri(cfg))
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


class TrackingUnavailable(HapError):
    """The MLflow tracking server does not answer within the configured bounds."""

    exit_code = 6


def http_bounds(cfg: Config) -> dict[str, str]:
    """MLflow's own HTTP knobs from ``orchestration``: its default (7 retries, 120 s timeouts)
    keeps a run waiting about 4 minutes per call on a dead server."""
    o = cfg.orchestration
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(o.mlflow_timeout_seconds)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(o.mlflow_max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(o.mlflow_backoff_factor),
    }


def bound_http(cfg: Config) -> None:
    """Apply ``http_bounds`` to this process (MLflow reads them on every request)."""
    os.environ.update(http_bounds(cfg))


def check_reachable(cfg: Config) -> None:
    """Fail at once, in one line naming the server, when a tracking server does not answer."""
    import requests

    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    timeout = cfg.orchestration.mlflow_timeout_seconds
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as err:
        reason = type(err).__name__ if not isinstance(err, requests.HTTPError) else str(err)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({reason}, timeout {timeout:g}s); "
            "no model was registered or promoted, the champion is unchanged"
        ) from None


def client(cfg: Config) -> MlflowClient:
    """An ``MlflowClient`` on ``cfg``'s store, created (schema, experiment) on first use."""
    from mlflow.tracking import MlflowClient

    bound_http(cfg)
    uri = tracking_uri(cfg)
    with _init_lock(cfg):
        c = MlflowClient(tracking_uri=uri, registry_uri=registry_uri(cfg))
        try:
            exp = c.get_experiment_by_name(cfg.gate.experiment)
        except Exception as err:  # a dead server surfaces here, in every command that needs one
            if is_embedded(cfg) or not _unreachable(err):
                raise
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({_reason(err)}, "
                f"{cfg.orchestration.mlflow_max_retries} retries of "
                f"{cfg.orchestration.mlflow_timeout_seconds:g}s); nothing was registered or promoted"
            ) from None
        if exp is None:
            c.create_experiment(cfg.gate.experiment, artifact_location=artifact_location(cfg))
    return c


_UNREACHABLE = (
    "Max retries exceeded",
    "Failed to establish",
    "Connection refused",
    "timed out",
    "Read timed",
)


def _unreachable(err: BaseException) -> bool:
    """The error of a server that is not there or does not answer (not a server-side refusal)."""
    import requests

    return isinstance(err, requests.ConnectionError | requests.Timeout) or any(
        text in str(err) for text in _UNREACHABLE
    )


def _reason(err: BaseException) -> str:
    text = str(err)
    for cause in ("ReadTimeout", "ConnectTimeout", "NewConnectionError", "Connection refused"):
        if cause in text:
            return cause
    return type(err).__name__


def experiment_id(cfg: Config) -> str:
    exp = client(cfg).get_experiment_by_name(cfg.gate.experiment)
    assert exp is not None
    return exp.experiment_id


def subprocess_env(cfg: Config) -> dict[str, str]:
    """Environment for a child process that must see the same tracking store."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(cfg)
    env["MLFLOW_REGISTRY_URI"] = registry_uri(cfg)
    env.update(http_bounds(cfg))
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "1")
    return env
