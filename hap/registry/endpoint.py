"""A registered version behind HTTP: MLflow's own scoring server, started, probed and called.

``hap serve`` runs ``mlflow models serve -m models:/hap-prerank/<v> --env-manager local`` on
``serving.host:serving.port`` in the foreground (``hap.core.procs.run_supervised``: Ctrl-C or
SIGTERM stops it and the uvicorn process it starts). The server is MLflow 3's FastAPI app under
uvicorn: ``GET /ping`` (or ``/health``) answers once the model is loaded, ``POST /invocations``
scores. The alias (``champion`` by default) is resolved to its version once, at start: the server
keeps serving that version when the alias moves; restart it to serve the new one.

The payload is one JSON object ``{"dataframe_split": {"columns": [...], "data": [[...], ...]}}``,
one row per candidate with the columns ``pyfunc.INPUT_COLUMNS`` (``request_id``, ``item_id``,
``retrieval_pos`` and the 29 features; rows of several requests may be mixed), at the widths of
``pyfunc.serving_example`` (integers as int64, floats as float64, the click sequence as a list of
ints). The reply ``{"predictions": [{...}, ...]}`` holds one record per candidate, in input order,
with the pyfunc's output columns (score, prob, light_score, expressive_score, routed, rank; NaN is
written as the bare token ``NaN``, which Python's ``json`` reads).

``start`` is the same server in the background, for tests and ``bench/bench_endpoint.py``: it
returns once ``/ping`` answers, and ``Server.stop`` ends its whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hap.core.config import Config
from hap.core.errors import HapError
from hap.core.procs import group_members, signal_group
from hap.registry import tracking

if TYPE_CHECKING:
    import pandas as pd

PING, INVOCATIONS = "/ping", "/invocations"
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """The registered version a server serves, and the alias it was asked for."""

    name: str
    version: str
    alias: str
    uri: str

    def describe(self) -> str:
        return f"{self.name} v{self.version} (@{self.alias})"


def resolve(cfg: Config, alias: str) -> Target:
    """The version ``alias`` points at now; a clear error when it points nowhere."""
    from hap.registry import registration

    found = registration.alias_version(cfg, alias)
    if found is None:
        raise HapError(
            f"'{cfg.gate.model_name}' has no version with alias '{alias}' in {tracking.tracking_uri(cfg)}: "
            "nothing to serve (`hap models` lists the versions; the gate promotes a champion)"
        )
    version = str(found.version)
    return Target(cfg.gate.model_name, version, alias, registration.model_uri(cfg, version))


def command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow models serve`` in this environment (``--env-manager local``: no virtualenv built)."""
    exe = Path(sys.executable).with_name("mlflow")
    mlflow = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *mlflow,
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def environment(cfg: Config, threads: int | None = None) -> dict[str, str]:
    """The server's environment: ``cfg``'s tracking store, this interpreter's scripts first on PATH
    (MLflow starts ``uvicorn`` by name, which an unactivated virtualenv does not provide), and
    ``threads`` (else ``serving.threads``) torch threads per worker when set."""
    env = tracking.subprocess_env(cfg)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    threads = threads or cfg.serving.threads
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when something already listens on ``host:port``."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise HapError(
                f"cannot serve on {host}:{port}: {err.strerror or err} (another server holds the port? "
                "choose another with --port or serving.port)"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def url_of(host: str, port: int) -> str:
    return f"http://{host}:{port}"


# ---- the payload ---------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON for what ``to_dict`` leaves as numpy: the click sequences (arrays) and stray scalars."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def payload(frame: pd.DataFrame) -> bytes:
    """The ``/invocations`` body of ``frame``'s candidates: ``dataframe_split`` of its input columns
    at ``serving_example``'s widths (floats written with ``repr``, so they decode exactly)."""
    from hap.registry.pyfunc import INPUT_COLUMNS, serving_example

    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise HapError(f"cannot build a scoring request: columns {missing} are missing")
    split = serving_example(frame[list(INPUT_COLUMNS)]).to_dict(orient="split", index=False)
    return json.dumps({"dataframe_split": split}, default=_plain).encode()


def predictions(body: bytes | str) -> pd.DataFrame:
    """The reply of ``/invocations``: one row per candidate, in input order."""
    import pandas as pd

    return pd.DataFrame(json.loads(body)["predictions"])


def score(
    url: str, request: pd.DataFrame | bytes, session: Any = None, timeout: float = 60.0
) -> pd.DataFrame:
    """POST a frame (or a ready ``payload``) to ``url``'s ``/invocations``; the scored rows."""
    import requests

    body = request if isinstance(request, bytes) else payload(request)
    reply = (session or requests).post(
        url + INVOCATIONS, data=body, headers={"Content-Type": "application/json"}, timeout=timeout
    )
    if reply.status_code != 200:
        raise HapError(f"{url}{INVOCATIONS} answered {reply.status_code}: {reply.text[:1000]}")
    return predictions(reply.content)


def ping(url: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(url + PING, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


# ---- the server in the background ----------------------------------------------------------------
@dataclass
class Server:
    """A scoring server started by ``start``: the ``mlflow models serve`` process leads its own
    process group, which holds the uvicorn server (and its workers) too."""

    proc: subprocess.Popen
    url: str
    target: Target
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/ping`` answers; a ``HapError`` with the log's tail if the server exits
        or stays silent for ``timeout`` seconds."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            code = self.proc.poll()
            if code is not None:
                raise HapError(
                    f"the scoring server of {self.target.describe()} exited with {code} before "
                    f"answering {PING} (log {self.log}):\n{self.log_tail()}"
                )
            if ping(self.url, timeout=1.0):
                return time.monotonic() - start
            time.sleep(0.25)
        raise HapError(
            f"the scoring server of {self.target.describe()} did not answer {self.url}{PING} within "
            f"{timeout:g}s (serving.startup_timeout_seconds; log {self.log}):\n{self.log_tail()}"
        )

    def alive(self) -> list[int]:
        """The processes of the server's group still running."""
        return group_members(self.proc.pid)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the whole group (uvicorn shuts down cleanly), SIGKILL after ``grace``."""
        pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_members(pgid):
            signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    cfg: Config,
    log: Path,
    alias: str = "champion",
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Server:
    """Start the scoring server of ``alias``'s version in the background and return once it answers
    ``/ping`` (its output goes to ``log``). Stop it with ``Server.stop`` (or ``with start(...)``)."""
    target = resolve(cfg, alias)
    host, port = host or cfg.serving.host, port or cfg.serving.port
    check_port(host, port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command(target.uri, host, port, workers or cfg.serving.workers),
            env=environment(cfg, threads),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(proc, url_of(host, port), target, log)
    try:
        server.wait_ready(cfg.serving.startup_timeout_seconds)
    except BaseException:
        server.stop()
        raise
    return server


# ---- the server in the foreground: ``hap serve`` ------------------------------------------------
def _announce_ready(url: str, target: Target, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(url, timeout=1.0):
            print(f"ready: {target.describe()} answers POST {url}{INVOCATIONS}", flush=True)
            return
        time.sleep(0.5)


def serve(
    cfg: Config,
    alias: str = "champion",
    port: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> int:
    """Run the scoring server of ``alias``'s version until Ctrl-C or SIGTERM; its exit code."""
    from hap.core.procs import run_supervised

    target = resolve(cfg, alias)
    host, port = cfg.serving.host, port or cfg.serving.port
    check_port(host, port)
    url = url_of(host, port)
    print(
        f"serving {target.describe()} on {url}: POST {INVOCATIONS} with "
        '{"dataframe_split": ...}, GET /ping; Ctrl-C stops it',
        flush=True,
    )
    threading.Thread(
        target=_announce_ready, args=(url, target, cfg.serving.startup_timeout_seconds), daemon=True
    ).start()
    return run_supervised(
        command(target.uri, host, port, workers or cfg.serving.workers), env=environment(cfg, threads)
    )
