"""The configuration sections that say where each part runs and how it reaches its services:
the orchestrator, the data path's engine, object storage, the lake and the scoring server. Kept
apart from ``hap.core.config`` (which composes every section) so that each file stays readable."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingConfig(_Section):
    """``hap serve``: the registered model behind MLflow's scoring server (``hap.registry.endpoint``)."""

    host: str = "127.0.0.1"  # the interface the scoring server binds
    port: int = Field(default=5001, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)  # uvicorn worker processes, each with its own copy of the model
    # torch threads per worker (OMP_NUM_THREADS); null: torch's default
    threads: int | None = Field(default=None, ge=1)
    startup_timeout_seconds: float = Field(default=180, gt=0)  # model download and load, until /ping answers


class OrchestrationConfig(_Section):
    train_on: Literal["local", "gpu-pool"]
    retries: int
    retry_delay_seconds: float
    timezone: str
    cron: str
    train_deployment: str = "train-ghcl/train-ghcl"
    # the wait for the train-ghcl run (flows.tasks.train_remote): the whole run, and the longest silence
    # (no heartbeat of the run, or of its pool's workers while queued); None: no silence check
    train_timeout_seconds: float = Field(default=21600, gt=0)
    train_heartbeat_timeout_seconds: float | None = Field(default=600, gt=0)
    retrain_every_days: int = Field(default=1, ge=1)
    date_lock_timeout_seconds: float = Field(default=3600, gt=0)
    dvc_push: bool = True
    # bounds on every call to an outside service: a dead server fails a run in bounded time
    mlflow_timeout_seconds: float = Field(default=10, gt=0)
    mlflow_max_retries: int = Field(default=1, ge=0)
    mlflow_backoff_factor: int = Field(default=1, ge=0)
    prefect_api_timeout_seconds: float = Field(default=30, gt=0)
    dvc_timeout_seconds: float = Field(default=600, gt=0)
    lock_lease_seconds: float = Field(default=120, gt=0)


class StorageConfig(_Section):
    """Bounds and scope of every object-store call (``hap.core.storage``)."""

    connect_timeout_seconds: float = Field(default=5, gt=0)
    read_timeout_seconds: float = Field(default=10, gt=0)
    attempts: int = Field(default=3, ge=1)  # tries per call; transient errors only
    # the most a failed run spends sending its records to the bucket before its error is shown
    after_failure_seconds: float = Field(default=10, gt=0)
    # a whole publish: this, plus its changed bytes at the rate below (a hung upload is cut there)
    publish_seconds: float = Field(default=30, gt=0)
    min_upload_mb_per_second: float = Field(default=1.0, gt=0)
    sync_exclude: list[str] = [".locks", ".hap-sync.json", ".dvc-store"]  # top-level names never synced


class EngineConfig(_Section):
    """Where the data path's per-bucket work runs (``hap.core.engine``), and how big a bucket is."""

    address: str | None = None  # a Dask scheduler, tcp://host:8786 (HAP_DASK_ADDRESS); null: local
    workers: int = Field(default=1, ge=1)  # local mode: 1 = in this process, >1 = a local Dask cluster
    bucket_requests: int = Field(default=50000, ge=1)  # requests per bucket: sets each step's memory
    slice_rows: int = Field(default=500000, ge=1)  # raw-log rows one cut task reads (whole row groups)
    worker_memory: str = "4GiB"  # memory limit of each local worker process
    # modules a worker runs as it starts (Dask preload): hap.data.gx_runner imports GX early
    worker_preload: list[str] = Field(default_factory=list)
    connect_timeout_seconds: float = Field(default=30, gt=0)
    # whether every worker of the cluster at ``address`` mounts this process's data root (its working
    # copy, for an object-store root) at the same path: a shared filesystem. Without it, a cluster by
    # address with an object-store root is refused at start (hap.core.engine.scheduler_address)
    workers_share_workdir: bool = False


class LakeConfig(_Section):
    """How the lake talks to its storage (``hap.data.lake``): bounded, so a dead store fails fast."""

    timeout_seconds: int = Field(default=10, ge=1)  # connect and per-request timeout on object storage
    max_retries: int = Field(default=1, ge=0)  # retries of one request before the step fails
    commit_retries: int = Field(default=3, ge=0)  # re-commits of a day after losing to a concurrent writer
    vacuum_retention_hours: int = Field(default=168, ge=0)  # unreferenced files older than this are deleted
