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
data root on a shared filesystem and this package installed; the lake may instead be a bucket
(``HAP_LAKE_URL=s3://...``), which workers write their buckets' files to (``hap.data.lake``). On
an object-store data root with a cluster by address the workers use the bucket, not this
process's working copy (``remote_object_root``). A worker that cannot reach a file fails its item
as ``InputUnreachable`` (``run_item``), never as bad data.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from hap.core import environ
from hap.core.config import Config
from hap.core.errors import HapError, is_io_failure, unreachable

T = TypeVar("T")
R = TypeVar("R")


class Mapper(Protocol):
    """``mapper(fn, items)`` → ``[fn(item) for item in items]``, in order, wherever it runs."""

    def __call__(self, fn: Callable[[T], R], items: Sequence[T], /) -> list[R]: ...


def release_memory() -> None:
    """Free what a partition left behind and hand it back to the OS. Reference cycles first: GX's
    validators and execution engines refer to each other and to the frames they checked, so without
    a collection a bucket's frames outlived it until Python's oldest generation was next collected
    (measured: RSS after each 1M-day bucket grew 1.3 -> 2.3 GB over six buckets, peaks to 3.1 GB);
    then Arrow's pool and glibc, which keep freed blocks for reuse."""
    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


_libc = _load_libc()


def use_system_memory_pool() -> None:
    """Allocate Arrow memory with the system allocator, unless ``ARROW_DEFAULT_MEMORY_POOL`` says
    otherwise. With pyarrow's default (mimalloc) the freed memory of one bucket stayed fragmented
    under the next, and a 1M-request day's buckets peaked 45% above a 100k day's buckets of the
    same size (2.75 GB against 1.89 GB, one process); with the system pool, released after each
    item, both peak at about 2.0 GB."""
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def run_item(fn: Callable[[T], R], item: T) -> R:
    """One item of a map, in whatever process runs it: its peak memory follows the item alone, and
    a file it cannot reach fails it as ``InputUnreachable`` (exit 9), whichever reader met it.

    What lives when the item starts is frozen out of the cycle collector for the item's duration,
    so the collection after it scans only what the item made (0.17 s a collection with GX loaded
    otherwise, paid by every cut slice, bucket, key partition and split unit), then thawed, so
    that Python's own collections still see it."""
    use_system_memory_pool()
    gc.freeze()
    try:
        return fn(item)
    except OSError as err:  # a file this process could not reach: storage's failure, not the data's
        if is_io_failure(err):
            raise unreachable(getattr(err, "filename", None) or "an input of this step", err) from None
        raise
    finally:
        release_memory()
        gc.unfreeze()


def local_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run every item in this process, in order."""
    return [run_item(fn, item) for item in items]


def client_map(client: Any, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run the items as Dask tasks; ``gather`` returns them in item order and re-raises a task's
    own exception (a ``DataContractError`` stays one)."""
    if not items:
        return []
    futures = client.map(functools.partial(run_item, fn), list(items), pure=False)
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


def scheduler_address(cfg: Config) -> str | None:
    """The cluster to use: ``engine.address`` (``HAP_DASK_ADDRESS``), else none (local mode)."""
    return cfg.engine.address or None


def remote_object_root(cfg: Config) -> bool:
    """Whether the data path's workers run on other hosts over an object-store data root: a
    cluster by address, ``HAP_HOME=s3://...``, and no shared mount of this process's working copy
    (``engine.workers_share_workdir``). The workers then reach the data root's bucket on their own:
    the cut day lives there (``hap.data.buckets.shared_cut_root``) and the lake is there already;
    the split's units, which write the training set into the working copy, run in this process."""
    return bool(scheduler_address(cfg) and cfg.root_url and not cfg.engine.workers_share_workdir)


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
        nanny_environ_undone(),
        LocalCluster(**local_cluster_kwargs(cfg)) as cluster,
        Client(cluster, timeout=cfg.engine.connect_timeout_seconds) as client,
    ):
        yield client


def require_scheduler(cfg: Config) -> None:
    """Fail at once, naming the scheduler, when the configured Dask cluster does not answer within
    ``engine.connect_timeout_seconds``: a task runner would otherwise surface a bare connect
    timeout that looks transient and is retried. No cluster address: nothing to check."""
    if scheduler_address(cfg) is None:
        return
    with dask_client(cfg):
        pass


@contextlib.contextmanager
def nanny_environ_undone() -> Iterator[None]:
    """Put back the variables a local cluster's ``Nanny`` writes into *this* process's environment
    as it spawns its workers (``distributed.nanny.pre-spawn-environ``: ``OMP_NUM_THREADS=1``,
    ``MALLOC_TRIM_THRESHOLD_``, ..., and ``PYTHONHASHSEED``). They are meant for the workers; left
    in place they single-thread every later step and subprocess of this process (a training run,
    a ``dvc repro``)."""
    import dask

    names = {*dask.config.get("distributed.nanny.pre-spawn-environ", {}), "PYTHONHASHSEED"}
    with environ.restored(names):
        yield


def local_cluster_kwargs(cfg: Config) -> dict[str, Any]:
    """A ``LocalCluster`` of ``engine.workers`` single-threaded processes on 127.0.0.1 (also what the
    flow's ``DaskTaskRunner`` starts when no address is set), each running ``engine.worker_preload``
    as it starts."""
    return {
        "n_workers": cfg.engine.workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "memory_limit": cfg.engine.worker_memory,
        "preload": list(cfg.engine.worker_preload),
    }


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[Mapper]:
    """The mapper of this configuration, open for the duration of a step (the CLI's entry point)."""
    with dask_client(cfg) as client:
        yield local_map if client is None else functools.partial(client_map, client)
