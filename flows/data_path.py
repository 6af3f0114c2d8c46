"""The daily flow's steps as they run: each step task with its line and its publish, and the data
steps on the configured Dask cluster through the ``data-path`` subflow.

Why a module of its own: a deployment loads ``flows/daily.py`` from its entrypoint as a script
module (named ``daily``), which no Dask worker can import. The ``data-path`` subflow travels with
every bucket task run it submits to the cluster (in the task run's context), so it must live in an
importable module of the package, as the task itself does (``flows.engine.run_partition``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from flows import engine, progress, tasks
from flows.common import resolve_date, run_config
from flows.locks import require_held
from hap.core import storage
from hap.core.config import Config
from hap.core.engine import nanny_environ_undone, require_scheduler
from hap.core.errors import HapError


def run_step(step: Any, cfg: Config, *args: Any, record: tuple[dict[str, Any], str] | None = None) -> Any:
    """Run a step task with the run's retries; its line (step, day, outcome, seconds) is reported.
    ``record`` (the day's summary, a key) takes the result before the step's publish: a step whose
    work is done stays on the day's record when the publish after it fails (a gate that promoted,
    a version that was registered)."""
    day = next((a for a in args if isinstance(a, dt.date)), None)
    require_held()  # a run whose date lock ran out stops here, before another step's outputs
    with progress.reported(step.name, day) as report:
        report["result"] = tasks.configured(step, cfg)(cfg, *args)
        if record is not None:
            summary, key = record
            summary[key] = report["result"]
        # a data root on object storage gets each step's outputs at once; a failed publish fails
        # this step, by name (its line says FAILED, the day's paragraph names it and the URL)
        storage.publish_root(cfg)
    return report["result"]


@flow(name="data-path", log_prints=True)
def data_path(date: str, steps: list[str], spec: dict[str, Any]) -> dict[str, Any]:
    """Data steps of one day on this subflow's task runner (``flows.engine``): each bucket is a
    ``bucket`` task run on a Dask worker."""
    cfg = run_config(**spec)
    day = resolve_date(cfg, date)
    return {name: run_step(tasks.DATA_STEPS[name], cfg, day, engine.prefect_map) for name in steps}


def data_steps(cfg: Config, day: dt.date, spec: dict[str, Any], steps: tuple[str, ...]) -> dict[str, Any]:
    """Run ``steps`` here, or in the ``data-path`` subflow on the configured Dask cluster."""
    if not engine.distributed(cfg):
        return {name: run_step(tasks.DATA_STEPS[name], cfg, day) for name in steps}
    try:  # an unreachable scheduler fails the first step at once, naming the scheduler
        require_scheduler(cfg)
    except HapError as err:
        err.failed_step = steps[0]  # type: ignore[attr-defined]
        raise
    runner = engine.dask_task_runner(cfg)
    with nanny_environ_undone():
        return data_path.with_options(task_runner=runner)(day.isoformat(), list(steps), spec)
