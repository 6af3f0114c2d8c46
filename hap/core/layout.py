"""Where each artifact lives under the data root. One place, so no step guesses a path."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hap.core.config import Config

LAKE_TABLES = ("samples", "fullflow")

# ---- file names inside those folders, grouped by the step that writes them -----------------------
# validate / quarantine / ingest (data versioning)
VALIDATION_SUMMARY_FILE = "summary.json"
QUARANTINE_RESULT_FILE = "result.json"
DATA_VERSION_FILE = "_data_version.json"
CUT_FILE = "_cut.json"  # a landing day cut into request-hash buckets (hap.data.buckets)
# split: its metadata travels inside the training set; its report sits in the day's metrics
SPLIT_META_FILE = "_split.json"
SPLIT_REPORT_FILE = "split.json"
# train: the model bundle and the records beside it
BUNDLE_META_FILE = "bundle.json"
HISTORY_FILE = "history.json"
DIAGNOSTICS_FILE = "diagnostics.json"
RUN_FILE = "run.json"  # how the run went (timings, resumed): not part of the bundle's identity
CHECKPOINT_FILE = "last.pt"
# evaluate / gate
EVAL_FILE = "eval.json"
EVAL_REQUESTS_FILE = "eval_requests.parquet"
RECALL_CURVE_FILE = "recall_curve.json"
BLESSING_FILE = "blessing.json"
# the daily flow
DAILY_RUN_FILE = "daily_run.json"
RETRAIN_REQUEST_FILE = "retrain_request.json"
# monitoring
MONITOR_FILE = "monitor.json"
MONITOR_REPORT_HTML = "report.html"
MONITOR_FRAME_FILE = "frame.parquet"
MONITOR_TABLE_FILE = "table.json"


def tower_weights_file(tower: str) -> str:
    """A bundle's state dict of ``tower`` (``light`` or ``expressive``)."""
    return f"{tower}.pt"


def tower_export_file(tower: str) -> str:
    """A bundle's TorchScript export of ``tower``: what a serving runtime loads (``hap.model.export``)."""
    return f"{tower}.torchscript.pt"


def day(date: dt.date | str) -> dt.date:
    """Accept ``YYYY-MM-DD`` strings or dates."""
    return date if isinstance(date, dt.date) else dt.date.fromisoformat(str(date))


def partition(date: dt.date | str) -> str:
    return f"dt={day(date).isoformat()}"


def landing_day(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("landing") / partition(date)


def raw_log(cfg: Config, date: dt.date | str, name: str) -> Path:
    """``name`` is one of ``schema.RAW_LOGS``: exposure, ranking, fullflow."""
    return landing_day(cfg, date) / f"{name}.parquet"


def lake_url(cfg: Config) -> str:
    """The lake's root: an object-store URL as given (``s3://bucket/lake``), else a folder under the
    data root. Each lake table is a Delta table below it (``hap.data.lake``).

    On an object-store data root (``HAP_HOME=s3://...``) a relative lake lives in that bucket itself,
    committed by Delta, never in the working copy: syncing Delta's files as plain files would lose
    its commits (``hap.core.storage`` skips the folder)."""
    lake = cfg.paths.lake
    if "://" in lake:
        return lake
    if cfg.root_url and not Path(lake).is_absolute():
        return f"{cfg.root_url}/{lake}"
    return str(cfg.path("lake"))


def unsynced_folders(cfg: Config) -> list[str]:
    """Top-level names of the data root the working-copy sync leaves alone: the configured ones,
    the lake when it lives in the data root's bucket (``lake_url``), and the embedded MLflow
    store's lock file, a lock of this machine's processes only (``hap.registry.tracking``), and the
    cut days that Dask workers of other hosts share through the bucket (``paths.shared_staging``)."""
    lake, db = cfg.paths.lake, Path(cfg.paths.mlflow_db)
    in_bucket = bool(cfg.root_url) and "://" not in lake and not Path(lake).is_absolute()
    db_lock = [f"{db.name}.lock"] if not db.is_absolute() and len(db.parts) == 1 else []
    shared = [cfg.paths.shared_staging] if cfg.root_url else []
    return [*cfg.storage.sync_exclude, *([Path(lake).parts[0]] if in_bucket else []), *db_lock, *shared]


def quarantine_day(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("quarantine") / partition(date)


def staging_day(cfg: Config, date: dt.date | str) -> Path:
    """The landing day cut into request-hash buckets (``hap.data.buckets``): scratch, derived data."""
    return cfg.path("staging") / partition(date)


def validation_day(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("validation") / partition(date)


def training_set(cfg: Config, date: dt.date | str) -> Path:
    """The difficulty-split training set for the window ending on ``date``."""
    return cfg.path("training") / partition(date) / "train"


def split_meta(cfg: Config, date: dt.date | str) -> Path:
    """The split's metadata (window, eval day, counts, data version), inside the training set."""
    return training_set(cfg, date) / SPLIT_META_FILE


def eval_set(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("training") / partition(date) / "eval"


def eval_samples(cfg: Config, date: dt.date | str) -> Path:
    """The lake samples (every negative source) of the eval requests: the slice AUCs' data."""
    return eval_samples_of(eval_set(cfg, date))


def fullflow_set(cfg: Config, date: dt.date | str) -> Path:
    """The window's sampled full-flow rows, the stage-order supervision (``hap.data.fullflow_set``)."""
    return cfg.path("training") / partition(date) / "fullflow"


def profile_dir(cfg: Config, date: dt.date | str) -> Path:
    """The user-history profiles of the window ending on ``date`` (``hap.data.user_history``)."""
    return cfg.path("training") / partition(date) / "profile"


def eval_samples_of(eval_set_path: Path) -> Path:
    return Path(eval_set_path).parent / "eval_samples"


def model_dir(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("models") / partition(date)


def checkpoint_dir(cfg: Config, date: dt.date | str) -> Path:
    """Training checkpoints for ``--resume``; outside the bundle folder, which is written atomically."""
    return cfg.path("models") / ".checkpoints" / partition(date)


def metrics_dir(cfg: Config, date: dt.date | str) -> Path:
    return cfg.path("metrics") / partition(date)


def window(end: dt.date | str, days: int) -> list[dt.date]:
    """The ``days`` dates ending on ``end``, oldest first."""
    end = day(end)
    return [end - dt.timedelta(days=days - 1 - i) for i in range(days)]


def monitoring_workspace(cfg: Config) -> Path:
    """The local Evidently workspace that ``evidently ui`` serves (``hap dashboard``)."""
    return cfg.path("monitoring") / "workspace"


def monitoring_day(cfg: Config, date: dt.date | str) -> Path:
    """A day's monitoring outputs: table.json, the cached frame, report.html, report.json."""
    return cfg.path("monitoring") / "days" / partition(date)
