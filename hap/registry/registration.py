"""MLflow tracking and the ``hap-prerank`` model registry: register, aliases, rollback, listing.

``register_day`` turns one day's training outputs (the bundle folder, ``history.json``,
``diagnostics.json`` and ``eval.json``) into one MLflow run and one registered model version.
The version carries the tags that tie it to its exact inputs: git commit, the DVC
data version of its training set, the data window and the day. Aliases carry the decisions:
``champion`` serves, ``previous`` is what ``hap rollback`` returns to, ``challenger`` is the
last rejected candidate. Re-registering an unchanged bundle returns the existing version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hap.core import layout
from hap.core.config import REPO_ROOT, Config
from hap.core.errors import HapError
from hap.registry import tracking

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
MODEL_ARTIFACT = "model"
EXAMPLE_CANDIDATES = 32
# Tags on every model version (and its run).
TAG_DATE, TAG_DATA_VERSION, TAG_WINDOW, TAG_GIT = "hap.date", "data_version", "data_window", "git_commit"
TAG_GIT_DIRTY, TAG_BUNDLE_HASH, TAG_TRAIN_PATH = "git_dirty", "hap.bundle_hash", "training_set_path"
TAG_DVC_MD5, TAG_DVC_OUT = "dvc_md5", "dvc_out"  # DVC's hash of the split stage output (hap.dvcref)
TAG_VERDICT, TAG_REASON, TAG_REPLACED = "gate.verdict", "gate.reason", "hap.replaced_version"
# Runtime deps of the pyfunc; explicit, since inference is slow and pins torch without +cpu.
PIP_REQUIREMENTS = ["torch==2.13.0", "pandas<3", "numpy", "pyarrow", "pyyaml", "pydantic>=2", "mlflow"]


# ---- small helpers ----------------------------------------------------------------------------
def metric_key(name: str) -> str:
    """MLflow metric names may not hold '@': ``recall@50`` is logged as ``recall_at_50``."""
    return re.sub(r"[^\w.\-/ :]", "_", name.replace("@", "_at_"))


# Files of a bundle folder that are not part of its identity: what describes the run (timings), and
# the TorchScript exports, derived from the weights by the code (git_commit tags it), whose bytes
# change from process to process (torch.jit.save orders constants by Python's salted string hash).
RUN_FILES = (layout.RUN_FILE, layout.tower_export_file("light"), layout.tower_export_file("expressive"))


def bundle_hash(folder: Path) -> str:
    """Content hash of a bundle: the same weights, config and profile give the same hash, whatever
    the timings and whichever process exported the towers."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in RUN_FILES):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def git_commit() -> tuple[str, bool]:
    """(HEAD commit, working tree dirty?) of the code that trained the model."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def metric_series(tree: Any, prefix: str = "") -> list[tuple[str, float, int]]:
    """(key, value, step) of every number in a history/diagnostics JSON, whatever its shape.

    Lists of records use their ``step`` (else ``epoch``) field as the step (else their index); lists of
    numbers use their index; scalars get step 0.
    """
    out: list[tuple[str, float, int]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += metric_series(value, f"{prefix}{key}/")
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            if isinstance(item, dict):
                step = item.get("step", item.get("epoch", index))
                step = int(step) if _is_number(step) else index
                for key, value in flatten(item).items():
                    if key not in ("epoch", "step") and _is_number(value):
                        out.append((metric_key(prefix + key.replace(".", "/")), float(value), step))
            elif _is_number(item):
                out.append((metric_key(prefix[:-1]), float(item), index))
    elif _is_number(tree):
        out.append((metric_key(prefix[:-1]), float(tree), 0))
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def alias_lock(cfg: Config) -> Iterator[None]:
    """Serialize alias moves between processes (embedded store; a server serializes its own)."""
    with tracking._init_lock(cfg):
        yield


# ---- registration ------------------------------------------------------------------------------
def input_example(cfg: Config, date: dt.date | str) -> pd.DataFrame:
    """The first eval request's first candidates, in the model's input layout."""
    import pyarrow.dataset as ds

    from hap.registry.pyfunc import INPUT_COLUMNS, serving_example

    path = layout.eval_set(cfg, date)
    if not path.exists():
        raise HapError(f"no eval set at {path}; run `hap split --date {layout.day(date)}` first")
    table = ds.dataset(path, format="parquet").head(4096, columns=list(INPUT_COLUMNS))
    frame = table.to_pandas()
    first = frame["request_id"].iloc[0]
    return serving_example(frame[frame["request_id"] == first].head(EXAMPLE_CANDIDATES))


def _str_version(mv: ModelVersion) -> ModelVersion:
    """MLflow's SQL store hands back ``version`` as an int, while aliases, tags and URIs carry it as
    text. The project compares and prints versions as strings, so every ModelVersion it reads is
    normalized here, at the two places it enters."""
    mv._version = str(mv.version)
    return mv


class Registry:
    """One registry operation: the config and the one MLflow client every helper below shares."""

    def __init__(self, cfg: Config, c: MlflowClient | None = None) -> None:
        self.cfg, self.name = cfg, cfg.gate.model_name
        self.c = c or tracking.client(cfg)

    def versions(self) -> list[ModelVersion]:
        found = [_str_version(v) for v in self.c.search_model_versions(f"name='{self.name}'")]
        return sorted(found, key=lambda v: int(v.version))

    def version_for_day(self, date: dt.date | str) -> ModelVersion | None:
        """The newest version registered for ``date``."""
        iso = layout.day(date).isoformat()
        mine = [v for v in self.versions() if v.tags.get(TAG_DATE) == iso]
        return mine[-1] if mine else None

    def identical(self, date: dt.date | str, identity: dict[str, str]) -> ModelVersion | None:
        """A version of ``date`` trained from the same inputs (``identity`` tags all equal), if any."""
        iso = layout.day(date).isoformat()
        for v in reversed(self.versions()):
            if v.tags.get(TAG_DATE) == iso and all(v.tags.get(k) == val for k, val in identity.items()):
                return v
        return None

    def alias(self, alias: str) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            return _str_version(self.c.get_model_version_by_alias(self.name, alias))
        except MlflowException:
            return None

    def promote(self, version: str) -> str | None:
        """Make ``version`` the champion; the old champion becomes ``previous``. The old champion."""
        with alias_lock(self.cfg):
            old = self.alias(CHAMPION)
            if old is not None and old.version == str(version):
                return None
            if old is not None:
                self.c.set_registered_model_alias(self.name, PREVIOUS, old.version)
                self.c.set_model_version_tag(self.name, str(version), TAG_REPLACED, old.version)
            # one row update: readers of @champion see the old version or the new one, never none
            self.c.set_registered_model_alias(self.name, CHAMPION, str(version))
            challenger = self.alias(CHALLENGER)
            if challenger is not None and challenger.version == str(version):
                self.c.delete_registered_model_alias(self.name, CHALLENGER)
        return old.version if old is not None else None

    def mark_challenger(self, version: str) -> None:
        with alias_lock(self.cfg):
            self.c.set_registered_model_alias(self.name, CHALLENGER, str(version))

    def rollback(self) -> Rollback:
        """Move ``champion`` back to ``previous``; ``previous`` moves one step further back."""
        with alias_lock(self.cfg):
            current, prev = self.alias(CHAMPION), self.alias(PREVIOUS)
            if current is None:
                raise HapError(f"no champion for '{self.name}': nothing to roll back")
            if prev is None:
                raise HapError(
                    f"'{self.name}' has no previous champion (v{current.version} is the first): "
                    "nothing to roll back to"
                )
            self.c.set_registered_model_alias(self.name, CHAMPION, prev.version)
            now = dt.datetime.now(dt.UTC).isoformat()
            self.c.set_model_version_tag(self.name, current.version, "hap.rolled_back", now)
            before = prev.tags.get(TAG_REPLACED)
            if before and before != current.version:
                self.c.set_registered_model_alias(self.name, PREVIOUS, before)
            else:
                self.c.delete_registered_model_alias(self.name, PREVIOUS)
                before = None
        return Rollback(champion=prev.version, rolled_back=current.version, previous=before)


@dataclass(frozen=True)
class Rollback:
    champion: str  # the version serving now
    rolled_back: str  # the version that was champion before
    previous: str | None

    def render(self) -> str:
        return (
            f"champion: v{self.rolled_back} -> v{self.champion}; "
            f"previous is now {('v' + self.previous) if self.previous else 'unset'}"
        )


# Module-level entry points: each builds one ``Registry`` (one client) for its operation.
def versions(cfg: Config, c: MlflowClient | None = None) -> list[ModelVersion]:
    return Registry(cfg, c).versions()


def version_for_day(cfg: Config, date: dt.date | str, c: MlflowClient | None = None) -> ModelVersion | None:
    return Registry(cfg, c).version_for_day(date)


def alias_version(cfg: Config, alias: str, c: MlflowClient | None = None) -> ModelVersion | None:
    return Registry(cfg, c).alias(alias)


def promote(cfg: Config, version: str, c: MlflowClient | None = None) -> str | None:
    return Registry(cfg, c).promote(version)


def mark_challenger(cfg: Config, version: str, c: MlflowClient | None = None) -> None:
    Registry(cfg, c).mark_challenger(version)


def rollback(cfg: Config) -> Rollback:
    return Registry(cfg).rollback()


# ---- registration ------------------------------------------------------------------------------
# MLflow's log_batch takes at most 1000 metrics per call; 900 leaves room under that limit.
METRICS_PER_BATCH = 900
TAG_CONFIG_HASH = "hap.config_hash"


def identity(cfg: Config, date: dt.date | str) -> dict[str, str]:
    """What makes a day's model: its training data version, the weight-shaping config, the code."""
    from hap.data.versioning import data_version
    from hap.model.train import config_hash

    commit, dirty = git_commit()
    return {
        TAG_DATA_VERSION: data_version(cfg, date),
        TAG_CONFIG_HASH: config_hash(cfg),
        TAG_GIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
    }


def _require_outputs(cfg: Config, date: dt.date) -> dict[str, Any]:
    """The day's eval metrics; a clear error when the bundle or the metrics are missing."""
    iso = date.isoformat()
    bundle_dir, metrics_dir = layout.model_dir(cfg, date), layout.metrics_dir(cfg, date)
    if not (bundle_dir / layout.BUNDLE_META_FILE).exists():
        raise HapError(f"no model bundle at {bundle_dir}; run `hap train --date {iso}` first")
    eval_metrics = _read_json(metrics_dir / layout.EVAL_FILE)
    if eval_metrics is None:
        raise HapError(
            f"no eval metrics at {metrics_dir / 'eval.json'}; run `hap evaluate --date {iso}` first"
        )
    return eval_metrics


def version_tags(cfg: Config, date: dt.date, digest: str, bundle_meta: dict[str, Any]) -> dict[str, str]:
    """The tags that tie a version to its exact inputs (set at creation, all or nothing)."""
    from hap.data.dvc_repo import dvc_dir_md5

    train_set = layout.training_set(cfg, date)
    window = bundle_meta.get("window") or [d.isoformat() for d in layout.window(date, cfg.split.window_days)]
    return {
        TAG_DATE: date.isoformat(),
        **identity(cfg, date),
        TAG_WINDOW: ",".join(map(str, window)),
        TAG_BUNDLE_HASH: digest,
        TAG_TRAIN_PATH: str(train_set.relative_to(cfg.home)),
        TAG_DVC_MD5: dvc_dir_md5(train_set.parent),
        TAG_DVC_OUT: str(train_set.parent.relative_to(cfg.home)),
    }


def run_params(cfg: Config, bundle_meta: dict[str, Any]) -> dict[str, str]:
    """The run's params: the config, with the model and train sections the bundle was trained with."""
    trained = {
        **cfg.model_dump(mode="json"),
        **{k: bundle_meta[k] for k in ("model", "train") if isinstance(bundle_meta.get(k), dict)},
    }
    return {metric_key(k): str(v)[:500] for k, v in flatten(trained).items() if not k.startswith("paths.")}


def log_metrics(c: MlflowClient, run_id: str, bundle_dir: Path, eval_metrics: dict[str, Any]) -> None:
    """Training history, diagnostics and eval metrics, in batches MLflow accepts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    series = metric_series(_read_json(bundle_dir / layout.HISTORY_FILE) or [], "train/")
    series += metric_series(_read_json(bundle_dir / layout.DIAGNOSTICS_FILE) or {}, "diag/")
    series += [(metric_key(f"eval/{k}"), float(v), 0) for k, v in eval_metrics.items() if _is_number(v)]
    batch = [Metric(key, value, now, step) for key, value, step in series]
    for start in range(0, len(batch), METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=batch[start : start + METRICS_PER_BATCH], synchronous=True)


def log_run(
    cfg: Config, date: dt.date, tags: dict[str, str], eval_metrics: dict[str, Any]
) -> tuple[str, str]:
    """One MLflow run with params, tags, metrics, artifacts and the pyfunc model: (run id, model URI)."""
    import mlflow
    from mlflow.models import infer_signature

    from hap.registry.pyfunc import BUNDLE_ARTIFACT, HapPrerankModel

    bundle_dir = layout.model_dir(cfg, date)
    example = input_example(cfg, date)
    # the hashed-id columns are integers that never hold missing values: MLflow's hint about
    # integer columns and missing values (printed at each signature inference) does not apply
    warnings.filterwarnings("ignore", message=".*Integer columns in Python cannot represent missing")
    signature = infer_signature(example, HapPrerankModel().load(bundle_dir).predict(None, example))
    exp = tracking.experiment_id(cfg)
    with tracking.fluent(cfg), mlflow.start_run(experiment_id=exp, run_name=f"train-{date}") as run:
        mlflow.log_params(run_params(cfg, _read_json(bundle_dir / layout.BUNDLE_META_FILE) or {}))
        mlflow.set_tags(tags)
        log_metrics(tracking.client(cfg), run.info.run_id, bundle_dir, eval_metrics)
        for name in (layout.BUNDLE_META_FILE, layout.HISTORY_FILE, layout.DIAGNOSTICS_FILE):
            if (bundle_dir / name).exists():
                mlflow.log_artifact(str(bundle_dir / name), artifact_path="training")
        mlflow.log_dict(eval_metrics, "eval/eval.json")
        # the pyfunc's predict takes a DataFrame and the signature is given explicitly: MLflow's
        # hint to add type hints for signature inference does not apply
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=HapPrerankModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(Path(__file__).resolve().parents[1])],
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
        )
    return run.info.run_id, info.model_uri


def register_day(cfg: Config, date: dt.date | str) -> str:
    """Log the day's training run to MLflow and register its bundle as ``hap-prerank``; the version.

    The version is created with its tags in one call, so a crash leaves either no version or a
    fully tagged one. Re-registering an unchanged bundle returns the existing version."""
    import mlflow

    date = layout.day(date)
    eval_metrics = _require_outputs(cfg, date)
    reg = Registry(cfg)
    bundle_dir = layout.model_dir(cfg, date)
    digest = bundle_hash(bundle_dir)
    for v in reg.versions():
        if v.tags.get(TAG_DATE) == date.isoformat() and v.tags.get(TAG_BUNDLE_HASH) == digest:
            return v.version  # idempotent: this exact bundle is registered already
    tags = version_tags(cfg, date, digest, _read_json(bundle_dir / layout.BUNDLE_META_FILE) or {})
    run_id, uri = log_run(cfg, date, tags, eval_metrics)
    with tracking.fluent(cfg):
        mv = mlflow.register_model(uri, reg.name, tags={**tags, "run_id": run_id})
    return str(mv.version)


# ---- reading back ------------------------------------------------------------------------------
def model_uri(cfg: Config, version_or_alias: str) -> str:
    sep = "/" if str(version_or_alias).isdigit() else "@"
    return f"models:/{cfg.gate.model_name}{sep}{version_or_alias}"


def load_model(cfg: Config, version_or_alias: str = CHAMPION):
    """The registered pyfunc (``mlflow.pyfunc.PyFuncModel``) of a version or an alias."""
    import mlflow.pyfunc

    tracking.client(cfg)
    path = list(sys.path)
    try:
        with tracking.fluent(cfg):
            return mlflow.pyfunc.load_model(model_uri(cfg, version_or_alias))
    finally:
        # MLflow puts the artifact's copy of our code first on sys.path; this process already runs
        # the installed package, and processes it spawns later (Dask workers) must import that too
        sys.path[:] = path


def load_champion(cfg: Config):
    return load_model(cfg, CHAMPION)


def load_bundle_of(cfg: Config, version_or_alias: str):
    """The ``HapBundle`` packaged in a registered version. Read from the day's bundle folder when
    that folder is byte for byte the registered artifact (its ``hap.bundle_hash`` tag), which skips
    MLflow's download and pyfunc load (seconds a day for the gate and the monitor); else from the
    registry's artifact."""
    import torch

    from hap.model.serving import load_bundle

    c = tracking.client(cfg)
    if str(version_or_alias).isdigit():
        mv = c.get_model_version(cfg.gate.model_name, str(version_or_alias))
    else:
        mv = alias_version(cfg, version_or_alias, c)
    date, digest = (mv.tags.get(TAG_DATE), mv.tags.get(TAG_BUNDLE_HASH)) if mv is not None else (None, None)
    local = layout.model_dir(cfg, date) if date else None
    if digest and local is not None and (local / layout.BUNDLE_META_FILE).exists():
        if bundle_hash(local) == digest:
            return load_bundle(local, device="cuda" if torch.cuda.is_available() else "cpu")
    return load_model(cfg, version_or_alias).unwrap_python_model()._bundle
