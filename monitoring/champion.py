"""The serving model as monitoring sees it: a light scorer and a calibrated routing threshold.

The champion comes from the registry's ``champion`` alias. When there is none yet (a fresh
install, the first days of a backfill) monitoring runs data-side only and says so; it never
fails the day for it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from hap.core import schema
from hap.core.config import Config


@dataclass(frozen=True)
class Champion:
    """What monitoring needs of the serving model: its light scorer and routing threshold."""

    version: str
    threshold: float  # calibrated routing threshold on light scores
    score: Callable[[pd.DataFrame | pa.Table], np.ndarray]  # light score per row (features as columns)
    window: tuple[dt.date, ...] = ()  # its training window (reference=champion_window)
    source: str = ""  # where it came from, for the report


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
    value = bundle.routing.threshold
    if value is None:
        raise ValueError("the bundle's routing config holds no calibrated threshold")
    return float(value)


def light_scores(bundle: Any, frame: pd.DataFrame | pa.Table) -> np.ndarray:
    """The light model's score of every row, each with its own request's user side (the
    serving module's batch scorer over a whole day of mixed requests)."""
    if bundle.light is None:
        raise ValueError("the bundle has no light model")
    from hap.model.serving import RequestIndex

    names = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
    columns = [c for c in ("request_id", "item_id", "retrieval_pos", *schema.FEATURE_COLUMNS) if c in names]
    rows = frame.select(columns) if isinstance(frame, pa.Table) else frame[columns]
    ids = frame["request_id"].to_numpy() if "request_id" in names else np.arange(len(frame))
    scores = bundle.tower_scores("light", rows, index=RequestIndex.of(ids))
    return scores.astype(np.float64)


def from_bundle(bundle: Any, version: str, window: Any = None, source: str = "") -> Champion:
    """Wrap a loaded ``hap.model.serving.HapBundle``: its light scorer, threshold and training window."""
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


def from_registry(cfg: Config, date: dt.date | None = None) -> tuple[Champion | None, str]:
    """The model that served ``date``: the ``champion`` alias, unless it trained on ``date`` itself
    (today's run promoted it after today's traffic was served), then the champion it replaced (the
    ``previous`` alias). A model scoring a day it trained on is in-sample there: its routed and
    near-margin shares would read as drift against the out-of-sample reference days.
    (None, why) when there is no champion yet."""
    from hap.registry import tracking

    if tracking.is_embedded(cfg) and not cfg.path("mlflow_db").exists():
        return None, "no model registry yet"
    try:
        from hap.registry import registration as registry

        version = registry.alias_version(cfg, registry.CHAMPION)
        if version is None:
            return None, f"no '{registry.CHAMPION}' alias on {cfg.gate.model_name} yet"
        note = ""
        if date is not None and date in _window(version.tags.get(registry.TAG_WINDOW)):
            previous = registry.alias_version(cfg, registry.PREVIOUS)
            if previous is not None and date not in _window(previous.tags.get(registry.TAG_WINDOW)):
                note = f"v{version.version} trained on {date}: monitored with v{previous.version} (served it)"
                version = previous
        bundle = registry.load_bundle_of(cfg, version.version)
        window = version.tags.get(registry.TAG_WINDOW)
        source = registry.model_uri(cfg, version.version)
        return from_bundle(bundle, version.version, window or None, source=source), note
    except Exception as err:  # noqa: BLE001 - the registry is optional for monitoring; say why and go on
        return None, f"champion unavailable ({type(err).__name__}: {err})"
