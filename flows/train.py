"""The ``train-ghcl`` flow: training alone, so it can run on a GPU work pool.

``daily_retrain`` calls it through ``run_deployment`` when ``orchestration.train_on: gpu-pool``
(the deployment lives in ``prefect.yaml`` on the ``gpu`` pool; its Kubernetes job template in
``infra/``). The worker must see the same data root: a shared volume, or the same object-store
URL, whose changes it pulls into its own working copy and to which it publishes the bundle.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import tasks
from flows.common import quiet_env, resolve_date, run_config
from hap.core import storage


@flow(name="train-ghcl", log_prints=True)
def train_ghcl(
    date: str,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
    params_file: str | None = None,
) -> dict[str, Any]:
    """Train the HAP towers for the window ending on ``date``; returns the training summary."""
    quiet_env()
    cfg = run_config(overrides, home, params_file)
    with storage.synced(cfg):  # no-op for a local data root
        return tasks.configured(tasks.train, cfg)(cfg, resolve_date(cfg, date), resume)
