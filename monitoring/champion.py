"""The serving model as monitoring sees it: a light scorer and a calibrated routing threshold.

The champion comes from the registry's ``champion`` alias. When there is none yet (a fresh
install, the first days of a backfill) monitoring runs data-side only and says so; it never
fails the day for it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from hap.core import schema
from hap.core.config import Config
from monitoring.table import Champion

SCORE_BATCH = 65536


def _window(raw: Any) -> tuple[dt.date, ...]:
    """Parse a training window from bundle.json or a tag: a list of dates or "start..end"/"start,end"."""
    if not raw:
        return ()
    if isinstance(raw, dict):
        raw = raw.get("dates") or [raw.get("start"), raw.get("end")]
    if isinstance(raw, str):
        sep = ".." if ".." in raw else ","
        raw = [p.strip() for p in raw.split(sep) if p.strip()]
    days = [dt.date.fromisoformat(str(d)[:10]) for d in raw if d]
    if len(days) == 2 and (days[1] - days[0]).days > 1:
        days = [days[0] + dt.timedelta(days=i) for i in range((days[1] - days[0]).days + 1)]
    return tuple(days)


def routing_threshold(bundle: Any) -> float:
    """The calibrated threshold of the bundle's router (DAMR's τ_route), from ``bundle.json``."""
    value = (getattr(bundle, "routing", None) or {}).get("threshold")
    if value is None:
        raise ValueError("the bundle's routing config holds no calibrated threshold")
    return float(value)


def light_scores(bundle: Any, frame: pd.DataFrame) -> np.ndarray:
    """The light model's score of every row, each with its own request's user side.

    ``HapBundle.score_request`` scores one request at a time; monitoring scores whole days of
    mixed requests, so it runs the light towers row-wise in batches (same weights, same math:
    ``head(user(row), item(row))``).
    """
    import pyarrow as pa
    import torch

    model = bundle.light
    if model is None:
        raise ValueError("the bundle has no light model")
    columns = [c for c in ("request_id", "item_id", *schema.FEATURE_COLUMNS) if c in frame]
    out = np.empty(len(frame), np.float64)
    with torch.no_grad():
        for start in range(0, len(frame), SCORE_BATCH):
            part = frame.iloc[start : start + SCORE_BATCH][columns]
            enc = bundle.encode(pa.Table.from_pandas(part, preserve_index=False))
            user = model.user(enc["req_cat"], enc["req_dense"], enc["seq"])
            scores = model.head(user, model.item(enc["item_cat"], enc["item_dense"]))
            out[start : start + len(part)] = scores.float().cpu().numpy().reshape(-1)
    return out


def from_bundle(bundle: Any, version: str, window: Any = None, source: str = "") -> Champion:
    """Wrap a loaded ``hap.model.towers.HapBundle``: its light scorer, threshold and training window."""
    threshold = routing_threshold(bundle)
    if window is None:
        window = (getattr(bundle, "meta", None) or {}).get("window")
    return Champion(
        version=str(version),
        threshold=threshold,
        score=lambda frame: light_scores(bundle, frame),
        window=_window(window),
        source=source,
    )


def from_registry(cfg: Config) -> tuple[Champion | None, str]:
    """The ``champion`` alias of the registry, or (None, why) when there is none yet."""
    from hap.registry import tracking

    if tracking.is_embedded(cfg) and not cfg.path("mlflow_db").exists():
        return None, "no model registry yet"
    try:
        from hap.registry import registration as registry

        version = registry.alias_version(cfg, registry.CHAMPION)
        if version is None:
            return None, f"no '{registry.CHAMPION}' alias on {cfg.gate.model_name} yet"
        bundle = registry.load_bundle_of(cfg, version.version)
        window = version.tags.get(registry.TAG_WINDOW)
        return from_bundle(
            bundle, version.version, window or None, source=registry.model_uri(cfg, version.version)
        ), ""
    except Exception as err:  # noqa: BLE001 - the registry is optional for monitoring; say why and go on
        return None, f"champion unavailable ({type(err).__name__}: {err})"
