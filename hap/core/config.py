"""Typed configuration loaded from ``params.yaml``.

``params.yaml`` is the single source of tunables. Overrides, strongest last:
the file, ``HAP__SECTION__KEY=value`` environment variables, ``--set section.key=value``
CLI flags. ``HAP_HOME`` moves the data root (a path, or an object-store URL such as
``s3://bucket/prefix``: the steps then work on a local copy under ``HAP_WORKDIR``, see
``hap.core.storage``); ``HAP_DVC_REMOTE`` and ``HAP_LAKE_URL`` set ``paths.dvc_remote`` and
``paths.lake``. Values in overrides are parsed as YAML, so
``--set train.epochs=3`` gives an int and ``--set split.sample_ratio.global_neg=0.5`` a float.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from hap.core.runtime_config import (  # the sections of where each part runs
    EngineConfig,
    LakeConfig,
    OrchestrationConfig,
    ServingConfig,
    StorageConfig,
    _Section,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
ENV_PREFIX = "HAP__"
# Deployment-facing names for keys the infrastructure sets (infra/); ``HAP__...`` still wins.
ENV_ALIASES = {
    "HAP_DVC_REMOTE": "paths.dvc_remote",
    "HAP_LAKE_URL": "paths.lake",
    "HAP_DASK_ADDRESS": "engine.address",
    "HAP_WORKDIR": "paths.workdir",
}


class PathsConfig(_Section):
    home: Path
    landing: str
    lake: str
    quarantine: str
    validation: str
    training: str
    models: str
    metrics: str
    monitoring: str
    mlflow_db: str
    mlflow_artifacts: str
    dvc_remote: str
    staging: str = "staging"  # request-hash buckets of the landing days (hap.data.buckets)
    # the cut days on an object-store root whose Dask workers are on other hosts: in the root's
    # bucket, never synced (hap.data.buckets.shared_cut_root)
    shared_staging: str = "shared-staging"
    workdir: str = "~/.cache/hap/work"  # the local working copy of a data root on object storage
    root_url: str | None = None  # the data root's object-store URL (HAP_HOME=s3://...); home is its copy

    @field_validator("lake")
    @classmethod
    def _lake_is_a_path_or_s3(cls, value: str) -> str:
        """The lake is Delta tables (``hap.data.lake``): a path (relative to the data root, absolute,
        or ``file://``) or an ``s3://`` URL (S3, MinIO, any S3-compatible store via AWS_ENDPOINT_URL)."""
        if value.startswith("file://"):
            return value[len("file://") :]
        if "://" in value and not value.startswith("s3://"):
            raise ValueError(
                f"paths.lake / HAP_LAKE_URL must be a filesystem path, a file:// URL or an s3:// URL, "
                f"not {value.split('://')[0]}:// (infra/README.md)"
            )
        if value.startswith("s3://") and not value[len("s3://") :].strip("/"):
            raise ValueError(
                "paths.lake / HAP_LAKE_URL: an s3:// URL needs a bucket, e.g. s3://hap-lake/lake"
            )
        return value


class PipelineConfig(_Section):
    date: dt.date
    dates: list[dt.date]


class SimulateConfig(_Section):
    seed: int
    start: dt.date
    days: int = Field(ge=1)
    requests_per_day: int = Field(ge=1)
    scenario: Literal["stable", "retrieval_degrades", "content_shift"]
    drift_start: dt.date
    drift_ramp_days: int = Field(ge=1)
    n_users: int
    n_items: int
    n_user_segments: int
    n_item_categories: int
    latent_dim: int
    retrieval_pool: int
    retrieval_size: int
    retrieval_noise: float
    prerank_noise: float
    rank_noise: float
    click_offset: float
    position_bias: float
    affinity_scale: float
    full_flow_requests: int = Field(ge=0)  # requests a day logged with every candidate: a count, not a share
    chunk_requests: int = Field(ge=1)
    degrade_pool_factor: float
    degrade_noise_factor: float
    content_shift_strength: float
    n_interests: int = Field(default=1, ge=1)  # interest vectors per user; affinity takes the best one
    segment_interest_share: float = Field(default=0.6, ge=0.0, le=1.0)  # interests drawn from the segment's
    seq_pool_factor: int = Field(default=4, ge=1)  # recent clicks: the favourites of seq_len x this items


class ContractConfig(_Section):
    """What every source must deliver: the cascade's shape, the id space, the feature ranges.

    The simulator writes to it, the RecFlow adapter maps into it, and validation and monitoring
    check against it; none of them reads it from another source's settings.
    """

    hash_buckets: int = Field(ge=2)  # categorical ids and click-sequence ids lie in [0, hash_buckets)
    seq_len: int = Field(ge=1)  # the recent-click sequence has exactly this length
    n_content_types: int = Field(ge=1)  # content_type codes are 0 .. n_content_types - 1
    exposed_per_request: int = Field(ge=1)  # display positions are 1..k per request, k <= this
    rank_keep: int = Field(ge=1)
    prerank_keep: int = Field(ge=1)
    rank_neg_per_request: int = Field(ge=0)
    prerank_neg_per_request: int = Field(ge=0)
    global_neg_per_pos: int = Field(ge=0)
    ranges: dict[str, tuple[float, float]]  # finite [min, max] of every dense column of every log

    @model_validator(mode="after")
    def _shape(self) -> ContractConfig:
        if not self.exposed_per_request <= self.rank_keep < self.prerank_keep:
            raise ValueError("contract: need exposed_per_request <= rank_keep < prerank_keep")
        bad = {
            k: v
            for k, v in self.ranges.items()
            if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] <= v[1])
        }
        if bad:
            raise ValueError(f"contract.ranges: each range must be finite [min, max]: {bad}")
        return self


class ValidateConfig(_Section):
    ctr_min: float = Field(ge=0.0, le=1.0)
    ctr_max: float = Field(ge=0.0, le=1.0)
    volume_trailing_days: int = Field(ge=1)
    volume_min_history: int = Field(ge=1)
    volume_min_ratio: float = Field(ge=0.0)
    volume_max_ratio: float = Field(ge=1.0)
    extra_columns: Literal["warn", "fail"]
    examples: int = Field(ge=1)
    data_docs: bool
    fullflow_min_requests: int = Field(default=100, ge=1)
    fullflow_min_clicks: int = Field(default=1, ge=0)
    distribution_min_history: int = Field(default=2, ge=1)
    distinct_ratio_min: float = Field(default=0.5, ge=0.0, le=1.0)
    dense_shift_max: float = Field(default=0.5, gt=0.0)
    content_mix_tvd_max: float = Field(default=0.3, gt=0.0, le=1.0)
    click_position_tvd_max: float = Field(default=0.25, gt=0.0, le=1.0)
    on_distribution_shift: Literal["quarantine", "alert"] = "quarantine"
    profile_sample_rows: int = Field(default=100_000, ge=1_000)


class SplitConfig(_Section):
    window_days: int = Field(ge=1)
    sample_ratio: dict[str, float]
    eval_max_requests: int = Field(ge=1)
    # which day's full-flow requests are the eval set: "last", the window's last day (those requests
    # are held out of its training rows), so the training set is a function of its window and params
    # only; "next", the held-out day after the window, which must have been validated (benchmarks)
    eval_day: Literal["last", "next"] = "last"
    seed: int = 11
    batch_rows: int = Field(default=131072, ge=1024)
    # share of the window's full-flow candidates kept as stage-order supervision (hap.data.fullflow_set)
    fullflow_share: float = Field(default=0.0, ge=0.0, le=1.0)


class TowerConfig(_Section):
    tower_dims: list[int] = Field(min_length=1)
    mlp_dims: list[int] = Field(min_length=1)  # the head's MLP: at least one layer before the logit
    attention_heads: int = 0
    pooling: Literal["target", "mean"] = (
        "target"  # expressive: target attention over the clicks, or their mean
    )


class ModelConfig(_Section):
    embed_dim: int
    seq_len: int
    hash_buckets: int
    # item side features a recent click is embedded with, beside its id (looked up from the window)
    behaviour_features: list[str] = []
    # user x item cross features the heads see (hap.model.cross.CROSS_FEATURES); [] = none
    cross_features: list[str] = []
    # days of earlier logs a day's user-history profile is built from (hap.data.user_history)
    profile_days: int = Field(default=3, ge=1)
    light: TowerConfig
    expressive: TowerConfig

    @field_validator("behaviour_features")
    @classmethod
    def _known_item_side_features(cls, v: list[str]) -> list[str]:
        from hap.core.schema import ITEM_CATEGORICAL

        side = [f for f in ITEM_CATEGORICAL if f != "i_id"]
        unknown = [f for f in v if f not in side]
        if unknown:
            raise ValueError(f"model.behaviour_features: {unknown} are not item side features ({side})")
        return v

    @model_validator(mode="after")
    def _expressive_is_deeper(self) -> ModelConfig:
        if len(self.expressive.mlp_dims) <= len(self.light.mlp_dims):
            raise ValueError("model: the expressive MLP must have more layers than the light one (N > M)")
        return self


class TrainConfig(_Section):
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    epochs: int
    batch_requests: int
    lr: float
    weight_decay: float
    temperature: float
    bce_weight: float
    loss: Literal["ghcl", "mixed_bce", "mixed_infonce"]
    harmonization: Literal["uniform", "gradnorm", "pcgrad"]
    group_proportions: dict[str, int]
    val_fraction: float
    patience: int
    diagnostics_every: int
    # intra-op threads of a training process: a number (0 = torch's default), or "auto"
    # (hap.model.member.training_threads: the CPUs it may use, 1 when the machine is busy)
    num_threads: int | Literal["auto"]
    # what the expressive model trains on: hard groups; all groups; none; or "served": the hard groups
    # plus, per anchor, the expressive_easy_top easy negatives the light model scores highest
    expressive_groups: Literal["hard", "all", "none", "served"] = "hard"
    expressive_easy_top: int = Field(default=4, ge=0)
    checkpoint_every: int = Field(default=1, ge=1)  # epochs between checkpoints
    loader_workers: int = Field(default=0, ge=0)  # DataLoader processes prefetching shards; 0 = in-process
    # memory for shards kept encoded between epochs (hap.model.stream); 0 = re-read every epoch
    shard_cache_mb: int = Field(default=2048, ge=0)
    # the cascade's stage labels as supervision: a pairwise loss per anchor that orders the candidate
    # grid by how far each got (stage_levels, higher = further); 0 turns it off
    stage_weight: float = Field(default=0.0, ge=0.0)
    stage_levels: dict[str, int] = {}
    # the window's full-flow requests ordered by the logged ranking order (hap.model.distill): the
    # weight of that pairwise loss (0 = off) and the requests per step it draws
    fullflow_weight: float = Field(default=0.0, ge=0.0)
    fullflow_batch_requests: int = Field(default=32, ge=1)
    # weight averaging (Polyak / EMA): validation, early stopping and the bundle use an exponential
    # moving average of each tower's weights, updated after every step with this decay; 0 = off
    ema_decay: float = Field(default=0.0, ge=0.0, lt=1.0)
    # which epoch's weights the bundle keeps: the best on validation (early stopping's choice) or the
    # last one trained (a fixed number of steps, no selection on a noisy validation metric)
    keep: Literal["best", "last"] = "best"


class RoutingConfig(_Section):
    mode: Literal["topk", "threshold"]
    rho: float = Field(gt=0.0, le=1.0)
    cap: float = Field(gt=0.0, le=1.0)
    serve: Literal["hap", "light", "expressive_all"] = "hap"  # which scorer the bundle serves
    merge: Literal["stack", "raw", "sum"] = "stack"  # how routed and unrouted scores merge
    threshold: float | None = None  # calibrated on validation data by training; null in params


ReferenceRanker = Literal["retrieval", "prerank", "ranking", "random", "truth"]


class EvaluateConfig(_Section):
    ks: list[int]
    primary_metric: str  # on data with ground truth (simulated)
    fallback_metric: str = "rank50_recall@50"  # primary when the eval set has no true_affinity (real logs)
    latency_candidates: int
    latency_repeats: int
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)  # of every paired bootstrap interval
    bootstrap_resamples: int = Field(default=2000, ge=100)
    seed: int = 0  # of the bootstrap and of the random reference order


class GateConfig(_Section):
    model_name: str
    floors: dict[str, float]
    margin: float = Field(ge=0.0)  # non-inferiority: lower bound of (challenger - champion) > -margin
    max_slice_regression: float = Field(ge=0.0)  # the same rule's margin for each slice
    # a slice blocks only when its interval's half-width <= slice_decisive_ratio x its margin
    slice_decisive_ratio: float = Field(default=0.5, gt=0.0)
    slice_adjust: Literal["bonferroni", "none"] = "bonferroni"  # the slices' intervals as one family
    # the primary metric decides only when its interval's half-width <= primary_decisive_ratio x margin;
    # a wider interval that straddles -margin is "undecided", and on_undecided says what happens then
    primary_decisive_ratio: float = Field(default=0.5, gt=0.0)
    on_undecided: Literal["keep", "alert", "promote_if_better"] = "alert"
    min_train_rows_ratio: float = Field(default=0.5, ge=0.0)  # train rows vs trailing training sets' median
    max_train_rows_ratio: float = Field(default=2.0, ge=1.0)
    health_trailing_days: int = Field(default=3, ge=1)
    max_flops_per_request: float
    cost_metric: str = "flops_per_request"
    slice_prefixes: list[str] = ["auc_slice_"]
    experiment: str = "hap-daily"
    smoke_timeout_s: float = 180.0


class AlertsConfig(_Section):
    hard_fraction_model_abs_change: float | None
    routed_share_abs_change: float | None
    drift_share_max: float | None
    hard_fraction_data_abs_change: float | None = None
    routed_share_rel_change: float | None = None
    prediction_drift_max: float | None = None


class MonitorConfig(_Section):
    reference: Literal["trailing", "champion_window"]
    trailing_days: int
    margin: float
    drift_method: str
    drift_threshold: float
    max_categories: int = 50
    drift_exclude: list[str] = []
    max_rows: int = Field(default=200000, ge=1000)
    project: str = "hap-prerank"
    ui_port: int = 8123
    alerts: AlertsConfig
    on_alert: Literal["retrain", "none"]


class Config(_Section):
    paths: PathsConfig
    pipeline: PipelineConfig
    contract: ContractConfig
    simulate: SimulateConfig
    validation: ValidateConfig
    split: SplitConfig
    model: ModelConfig
    train: TrainConfig
    routing: RoutingConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    monitor: MonitorConfig
    orchestration: OrchestrationConfig
    engine: EngineConfig = EngineConfig()
    lake: LakeConfig = LakeConfig()
    storage: StorageConfig = StorageConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _cascade_shape(self) -> Config:
        sim, con = self.simulate, self.contract
        if not con.prerank_keep < sim.retrieval_size <= sim.retrieval_pool <= sim.n_items:
            raise ValueError(
                "simulate: need contract.prerank_keep < retrieval_size <= retrieval_pool <= n_items"
            )
        return self

    # ---- resolved locations under the data root -------------------------------------
    @property
    def home(self) -> Path:
        return self.paths.home

    def path(self, name: str) -> Path:
        """Absolute location of one ``paths`` entry under the data root."""
        return self.home / getattr(self.paths, name)

    @property
    def root_url(self) -> str | None:
        """The data root's object-store URL, or None when the data root is a local folder."""
        return self.paths.root_url

    def dvc_remote_url(self) -> str:
        """Where ``dvc push`` sends data: an object-store URL as given, else ``paths.dvc_remote`` under
        the data root (inside the bucket when the data root is one, so DVC talks to it directly)."""
        remote = self.paths.dvc_remote
        if "://" in remote or Path(remote).is_absolute():
            return remote
        if self.root_url:
            return f"{self.root_url}/{remote}"
        return str(self.path("dvc_remote"))

    def updated(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted-key overrides applied (``{"train.epochs": 2}``)."""
        raw = self.model_dump(mode="json")
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return Config.model_validate(raw)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"unknown config key '{dotted}'")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"unknown config key '{dotted}'")
    node[leaf] = value


def parse_override(assignment: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as YAML."""
    if "=" not in assignment:
        raise ValueError(f"override '{assignment}' is not of the form key.path=value")
    key, text = assignment.split("=", 1)
    return key.strip(), yaml.safe_load(text)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {key: environ[name] for name, key in ENV_ALIASES.items() if environ.get(name)}
    for name, text in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            out[key] = yaml.safe_load(text)
    return out


def load_config(
    params_file: Path | str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load ``params.yaml``, apply env and explicit overrides, resolve the data root."""
    environ = dict(os.environ) if environ is None else environ
    params_file = Path(params_file or environ.get("HAP_PARAMS") or DEFAULT_PARAMS)
    raw = yaml.safe_load(params_file.read_text())
    raw = copy.deepcopy(raw)
    merged: dict[str, Any] = _env_overrides(environ)
    if isinstance(overrides, dict):
        merged.update(overrides)
    else:
        merged.update(dict(parse_override(o) for o in overrides or []))
    for key, value in merged.items():
        _set_dotted(raw, key, value)
    home_text = str(environ.get("HAP_HOME") or raw["paths"]["home"])
    if home_text.startswith("file://"):
        home_text = home_text[len("file://") :]
    if "://" in home_text:  # an object-store data root: the steps work on its local copy
        url = home_text.rstrip("/")
        raw["paths"]["root_url"] = url
        workdir = Path(str(raw["paths"].get("workdir") or "~/.cache/hap/work")).expanduser()
        home = workdir / url.replace("://", "/")
    else:
        raw["paths"]["root_url"] = None
        home = Path(home_text)
    if not home.is_absolute():
        home = params_file.resolve().parent / home
    raw["paths"]["home"] = str(home.resolve())
    return Config.model_validate(raw)
