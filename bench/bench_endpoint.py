"""The served endpoint's cost: ``hap serve``'s scoring server under a bounded load, against the
in-process scorer on the same request.

The model: ``bench.bench_serving.prepare`` builds a default-size bundle (``params.yaml`` model
sizes, random weights: a scorer's cost does not depend on them) from a small simulated window
under ``--home``. It is logged and registered as a version of ``hap-prerank`` in a SQLite MLflow
registry under the same home through the registration code path (``registration.log_run``: the
signature, the input example, the bundle as the pyfunc's artifact, the code), and promoted to
champion; a later run with the same bundle reuses that version. The champion is served by
``hap.registry.endpoint.start``, the server of ``hap serve`` (``mlflow models serve
--env-manager local``), once with each ``--workers`` count of uvicorn workers (1 and 2), each
worker on ``--torch-threads`` torch threads (1).

The request: one simulated request's candidates repeated to ``--candidates`` (1,000), as
``bench_serving.one_request`` builds it, encoded once as the ``dataframe_split`` payload
(``endpoint.payload``). The endpoint's answer is checked against the in-process result (same
ranks and routed set, scores within 1e-5) before anything is timed.

The load: after ``--warmup`` requests per worker, ``--requests`` requests per setting, split
evenly over 1 and 2 client threads; each thread holds a keep-alive ``requests.Session`` and sends
its next request as soon as the last one is answered (a closed loop). Latency is per request,
measured by the client from sending the payload to the parsed reply (``endpoint.score``);
throughput is the setting's requests over its wall time. p99 of 200 requests lies between the
two slowest.

The baseline, in this process, on as many torch threads as a server worker: the same request
through ``HapBundle.score_request`` (the scoring path); then, to place the difference, through the
registered pyfunc's ``predict`` on the payload's frame, and through MLflow's own per-request call
of the server (``scoring_server.invocations``: parse the JSON payload against the signature,
predict, encode the JSON reply), without HTTP. Each is timed before and after the load; the p50
is over both rounds. The ratio endpoint p50 / ``score_request`` p50 is the price of serving over
HTTP. The clients, the servers and the baseline share the machine's cores (and a shared
machine's neighbours): on two cores, two client threads compete with the server they measure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import markdown_table, volume_config, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = ROOT / "data" / "bench-endpoint"
CLIENTS = (1, 2)


# ---- the registered model ---------------------------------------------------------------------------
def register_bundle(cfg: Any, folder: Path) -> str:
    """``folder``'s bundle as a champion version of ``cfg.gate.model_name`` (reused when registered)."""
    import mlflow

    from bench.bench_serving import DATE
    from hap.core import layout
    from hap.registry import registration, tracking

    target = layout.model_dir(cfg, DATE)  # where log_run reads a day's bundle
    if not target.exists():
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("eval.parquet"))
    digest = registration.bundle_hash(target)
    reg = registration.Registry(cfg)
    known = [v for v in reg.versions() if v.tags.get(registration.TAG_BUNDLE_HASH) == digest]
    if known:
        version = known[-1].version
    else:
        tags = {registration.TAG_BUNDLE_HASH: digest, registration.TAG_DATE: DATE.isoformat()}
        run_id, uri = registration.log_run(cfg, DATE, tags, {})
        with tracking.fluent(cfg):
            version = str(mlflow.register_model(uri, reg.name, tags={**tags, "run_id": run_id}).version)
    reg.promote(version)
    return version


# ---- timing ---------------------------------------------------------------------------------------
def summary(seconds: list[float], wall: float | None = None) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "requests": len(ms),
        "p50_ms": float(np.quantile(ms, 0.5)),
        "p90_ms": float(np.quantile(ms, 0.9)),
        "p99_ms": float(np.quantile(ms, 0.99)),
        "mean_ms": float(ms.mean()),
        "requests_per_s": len(ms) / (wall if wall is not None else float(ms.sum()) / 1e3),
    }


def time_calls(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def load(url: str, body: bytes, requests_total: int, clients: int) -> dict[str, float]:
    """``requests_total`` requests over ``clients`` closed-loop threads: per-request latencies and
    the wall time from the first send to the last reply."""
    import requests

    from hap.registry import endpoint

    shares = [requests_total // clients + (k < requests_total % clients) for k in range(clients)]
    go = threading.Barrier(clients + 1)

    def client(n: int) -> list[float]:
        with requests.Session() as session:
            endpoint.score(url, body, session)  # opens the keep-alive connection
            go.wait()
            out = []
            for _ in range(n):
                start = time.perf_counter()
                endpoint.score(url, body, session)
                out.append(time.perf_counter() - start)
            return out

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, n) for n in shares]
        go.wait()
        start = time.perf_counter()
        latencies = [t for f in futures for t in f.result()]
        wall = time.perf_counter() - start
    return summary(latencies, wall) | {"clients": clients}


def check_same(served: Any, expected: Any) -> None:
    for column in ("item_id", "rank", "routed"):
        assert (served[column].to_numpy() == expected[column].to_numpy()).all(), column
    assert np.allclose(served["score"], expected["score"], atol=1e-5)


# ---- the run ----------------------------------------------------------------------------------------
def run(
    home: Path,
    n: int,
    requests_total: int,
    warmup: int,
    reps: int,
    threads: int,
    clients: list[int],
    workers: list[int],
) -> None:
    import torch
    from mlflow.pyfunc import scoring_server

    from bench.bench_serving import SMALL_WINDOW, one_request, prepare
    from hap.model.serving import load_bundle
    from hap.registry import endpoint, registration
    from hap.registry.pyfunc import INPUT_COLUMNS, serving_example

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the registry under --home
        os.environ.pop(name, None)
    cfg = volume_config(str(home), SMALL_WINDOW["simulate.requests_per_day"], SMALL_WINDOW)
    folder, table = prepare(home)
    version = register_bundle(cfg, folder)
    request = one_request(table, n)
    frame = serving_example(request.select(list(INPUT_COLUMNS)).to_pandas())
    body = endpoint.payload(frame)

    torch.set_num_threads(threads)
    bundle = load_bundle(folder)
    pyfunc = registration.load_model(cfg, version)
    expected = pyfunc.predict(frame)
    direct = bundle.score_request(request)
    assert (np.asarray(direct.rank) == expected["rank"].to_numpy()).all()
    schema = pyfunc.metadata.get_input_schema()

    def server_call() -> None:  # what the server does per request, without HTTP: parse, predict, encode
        reply = scoring_server.invocations(body, "application/json", pyfunc, schema)
        assert reply.status == 200, reply.response[:500]

    calls = {
        "score_request": lambda: bundle.score_request(request),
        "pyfunc": lambda: pyfunc.predict(frame),
        "invocations": server_call,
    }
    base: dict[str, list[float]] = {k: [] for k in calls}

    def baseline() -> None:
        for key, fn in calls.items():
            base[key] += time_calls(fn, reps if key == "score_request" else max(1, reps // 2))

    baseline()
    served: list[dict[str, Any]] = []
    startup: dict[int, float] = {}
    for w in workers:
        started = time.perf_counter()
        server = endpoint.start(
            cfg, home / "endpoint.log", port=endpoint.free_port(), workers=w, threads=threads
        )
        startup[w] = time.perf_counter() - started
        try:
            check_same(endpoint.score(server.url, body), expected)
            for _ in range(warmup * w):
                endpoint.score(server.url, body)
            for c in clients:
                served.append(load(server.url, body, requests_total, c) | {"workers": w})
                print(served[-1], flush=True)
        finally:
            server.stop()
        assert not server.alive(), "the scoring server outlived stop()"
    baseline()

    figures = {k: summary(v) for k, v in base.items()}
    ref = figures["score_request"]["p50_ms"]
    rows: list[list[Any]] = [
        [
            "in process: `HapBundle.score_request` (baseline)",
            "-",
            1,
            *_figures(figures["score_request"], ref),
        ],
        ["in process: registered pyfunc `predict`", "-", 1, *_figures(figures["pyfunc"], ref)],
        [
            "in process: the server's call (`scoring_server.invocations`: JSON in, predict, JSON out)",
            "-",
            1,
            *_figures(figures["invocations"], ref),
        ],
    ]
    rows += [["endpoint: POST /invocations", s["workers"], s["clients"], *_figures(s, ref)] for s in served]
    out = {
        "candidates": n,
        "model_version": version,
        "torch_threads": threads,
        "payload_bytes": len(body),
        "server_start_s": startup,
        "warmup": warmup,
        "in_process": figures,
        "endpoint": served,
        "ratio_endpoint_p50_vs_in_process": [
            {"workers": s["workers"], "clients": s["clients"], "ratio": s["p50_ms"] / ref} for s in served
        ],
    }
    starts = ", ".join(f"{w} worker(s) {t:.1f} s" for w, t in startup.items())
    text = (
        f"One request of {n:,} candidates (`bench_serving.one_request`), default-size towers with random "
        f"weights, registered as `hap-prerank` v{version} in a SQLite registry and served by "
        f"`hap.registry.endpoint.start` (`mlflow models serve --env-manager local`, {threads} torch "
        f"thread(s) per uvicorn worker; start to first /ping answer: {starts}). Payload: "
        f"`dataframe_split` JSON, {len(body) / 1024:,.0f} KiB. Endpoint: {requests_total} requests per "
        f"setting after {warmup} warm-up ones per worker, closed-loop client threads with keep-alive "
        "sessions, latency from send to parsed reply; requests/s over the setting's wall time. In process "
        f"({threads} torch thread(s)): {len(base['score_request'])} `score_request` calls and "
        f"{len(base['pyfunc'])} of each other call, half before and half after the load. "
        "× in-process p50: a row's p50 over `score_request`'s.\n\n" + markdown_table(HEADERS, rows)
    )
    write_results("endpoint", out, text)


def _figures(s: dict[str, float], ref: float) -> list[Any]:
    return [
        s["requests"],
        f"{s['p50_ms']:.2f}",
        f"{s['p90_ms']:.2f}",
        f"{s['p99_ms']:.2f}",
        f"{s['requests_per_s']:.1f}",
        s["p50_ms"] / ref,
    ]


HEADERS = [
    "path",
    "uvicorn workers",
    "client threads",
    "requests",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "requests/s",
    "× in-process p50",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME, help="data root: window, bundle, registry")
    ap.add_argument("--candidates", type=int, default=1_000, help="candidates per request")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per client-thread setting")
    ap.add_argument("--warmup", type=int, default=10, help="requests before timing")
    ap.add_argument("--reps", type=int, default=50, help="in-process calls per baseline round (x2 rounds)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the server and baseline")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="client-thread counts")
    ap.add_argument("--workers", default="1,2", help="uvicorn worker counts: one server each")
    args = ap.parse_args()
    np.seterr(all="ignore")
    clients = [int(c) for c in args.clients.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    run(
        args.home,
        args.candidates,
        args.requests,
        args.warmup,
        args.reps,
        args.torch_threads,
        clients,
        workers,
    )


if __name__ == "__main__":
    main()
