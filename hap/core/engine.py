"""Where the data path's per-bucket work runs: in this process, on a local Dask cluster, or on a
remote Dask cluster chosen by its address.

Every data step (``hap.data.validate``, ``ingest``, ``split``) is written as *plan → map a pure
function over buckets → reduce in bucket order*, and takes the map as a ``Mapper``. The step code
is the same in every mode; only the mapper changes:

- ``local_map``: in this process, one bucket after another (the default: ``make run``, the tests);
- a Dask client's map (``session``): ``engine.workers > 1`` starts a ``LocalCluster`` of worker
  processes on 127.0.0.1, ``engine.address`` (``HAP_DASK_ADDRESS``) connects to a running cluster;
- the orchestrator's own mapper (``flows``): Prefect tasks mapped on the flow's ``DaskTaskRunner``.

Results come back in the order of the items, whatever worker ran them, so a reduce sees the same
sequence with one worker or many: the outputs are byte-identical at every scale. Workers need the
data root on a shared filesystem (or object store) and this package installed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from hap.core.config import Config
from hap.core.errors import HapError

T = TypeVar("T")
R = TypeVar("R")


class Mapper(Protocol):
    """``mapper(fn, items)`` → ``[fn(item) for item in items]``, in order, wherever it runs."""

    def __call__(self, fn: Callable[[T], R], items: Sequence[T], /) -> list[R]: ...


def local_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run every item in this process, in order."""
    return [fn(item) for item in items]


def client_map(client: Any, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run the items as Dask tasks; ``gather`` returns them in item order and re-raises a task's
    own exception (a ``DataContractError`` stays one)."""
    if not items:
        return []
    futures = client.map(fn, list(items), pure=False)
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


def scheduler_address(cfg: Config) -> str | None:
    """The cluster to use: ``engine.address`` (``HAP_DASK_ADDRESS``), else none (local mode)."""
    return cfg.engine.address or None


@contextlib.contextmanager
def dask_client(cfg: Config) -> Iterator[Any | None]:
    """A client on the configured cluster, a local cluster when ``engine.workers > 1``, else
    ``None`` (run in this process). A cluster that cannot be reached is a clear ``HapError``."""
    address = scheduler_address(cfg)
    if address is None and cfg.engine.workers <= 1:
        yield None
        return
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address is not None:
        try:
            client = Client(address, timeout=cfg.engine.connect_timeout_seconds)
        except (OSError, TimeoutError) as err:
            raise HapError(
                f"engine: cannot reach the Dask scheduler at {address} ({err}); start it, or unset "
                "HAP_DASK_ADDRESS / engine.address to run locally"
            ) from None
        with client:
            yield client
        return
    with (
        LocalCluster(**local_cluster_kwargs(cfg)) as cluster,
        Client(cluster, timeout=cfg.engine.connect_timeout_seconds) as client,
    ):
        yield client


def local_cluster_kwargs(cfg: Config) -> dict[str, Any]:
    """A ``LocalCluster`` of ``engine.workers`` single-threaded processes on 127.0.0.1 (also what the
    flow's ``DaskTaskRunner`` starts when no address is set)."""
    return {
        "n_workers": cfg.engine.workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "memory_limit": cfg.engine.worker_memory,
    }


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[Mapper]:
    """The mapper of this configuration, open for the duration of a step (the CLI's entry point)."""
    with dask_client(cfg) as client:
        yield local_map if client is None else functools.partial(client_map, client)
