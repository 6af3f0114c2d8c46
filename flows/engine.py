"""The data path's engine as the flows see it: per-bucket work as Prefect tasks on a Dask runner.

Locally (no ``engine.address``, one worker) the data steps run as before, their buckets one after
another in the step's own process. Otherwise the steps run inside the ``data-path`` subflow, whose
task runner is prefect-dask's ``DaskTaskRunner``: on the cluster at ``engine.address``
(``HAP_DASK_ADDRESS``), or on a local cluster of ``engine.workers`` processes. Each bucket is then
one ``bucket`` task run, visible in the Prefect UI, executed by a Dask worker. The step code in
``hap/`` is the same in both cases: it only receives another ``Mapper``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from hap.core import engine
from hap.core.config import Config


@task(name="bucket", cache_policy=NO_CACHE, persist_result=False)
def run_partition(fn: Callable[[Any], Any], item: Any) -> Any:
    """One item of a data step's map (a bucket, a slice of a raw log, a key partition)."""
    return engine.run_item(fn, item)


def prefect_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """A ``hap.core.engine.Mapper`` over the current flow's task runner; results in item order, and
    a bucket's own exception (a ``DataContractError``) re-raised as it is."""
    futures = run_partition.map(unmapped(fn), list(items))
    return [f.result() for f in futures]


def distributed(cfg: Config) -> bool:
    """Whether the data steps leave this process (a cluster address, or several local workers)."""
    return engine.scheduler_address(cfg) is not None or cfg.engine.workers > 1


def dask_task_runner(cfg: Config) -> Any:
    """The ``DaskTaskRunner`` of this configuration: the cluster by address, else a local one."""
    from prefect_dask import DaskTaskRunner

    address = engine.scheduler_address(cfg)
    if address is not None:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=engine.local_cluster_kwargs(cfg))
