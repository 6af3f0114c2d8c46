"""The retraining skip rule, and the retrain request an alert leaves for the next run.

A daily run always ingests, validates and monitors. It retrains (split, train, evaluate,
register, gate) when any of these holds, checked in this order:

1. ``force`` was asked for (``hap run --force-train``, a backfill re-run);
2. a monitoring alert of an earlier day left a retrain request (``monitor.on_alert: retrain``);
3. no earlier day has a trained model yet;
4. the newest trained model before this date is ``orchestration.retrain_every_days`` days old
   or older (the default 1 retrains every day).

It skips when the training window ``[D - w + 1, D]`` is incomplete: a day of it never landed
(the warm-up days at the start of a history). A day that landed but failed validation is not
"missing": the split then refuses it loudly instead of training around it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.data import lake

REQUEST_FILE = layout.RETRAIN_REQUEST_FILE
BUNDLE_FILE = layout.BUNDLE_META_FILE


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str


def request_path(cfg: Config) -> Path:
    return cfg.path("metrics") / REQUEST_FILE


def request_retrain(cfg: Config, date: dt.date, alerts: list[Any]) -> Path:
    """Leave a retrain request for the next run (called when an alert fires and on_alert=retrain)."""
    path = request_path(cfg)
    atomic_write_json(path, {"requested_by": date.isoformat(), "alerts": [str(a) for a in alerts]})
    return path


def pending_request(cfg: Config, date: dt.date) -> dict[str, Any] | None:
    """A retrain request left by an earlier day's alert, if any."""
    path = request_path(cfg)
    if not path.exists():
        return None
    request = json.loads(path.read_text())
    return request if layout.day(request["requested_by"]) < date else None


def consume_request(cfg: Config, date: dt.date) -> None:
    """A successful retrain on ``date`` answers the requests made before it."""
    if pending_request(cfg, date) is not None:
        request_path(cfg).unlink(missing_ok=True)


def trained_days(cfg: Config) -> list[dt.date]:
    root = cfg.path("models")
    if not root.is_dir():
        return []
    days = []
    for folder in root.glob("dt=*"):
        if (folder / BUNDLE_FILE).exists():
            try:
                days.append(dt.date.fromisoformat(folder.name[3:]))
            except ValueError:
                continue
    return sorted(days)


def missing_window_days(cfg: Config, date: dt.date) -> list[dt.date]:
    """Window days whose logs never landed and never reached the lake."""
    return [
        d
        for d in layout.window(date, cfg.split.window_days)
        if not layout.landing_day(cfg, d).exists() and not lake.has_day(cfg, "samples", d)
    ]


def decide(cfg: Config, date: dt.date, force: bool = False) -> Decision:
    missing = missing_window_days(cfg, date)
    if missing:
        return Decision(
            False,
            f"window incomplete: {', '.join(d.isoformat() for d in missing)} never landed "
            f"(window_days={cfg.split.window_days})",
        )
    if force:
        return Decision(True, "forced")
    request = pending_request(cfg, date)
    if request is not None and cfg.monitor.on_alert == "retrain":
        return Decision(True, f"monitoring alert on {request['requested_by']} requested a retrain")
    earlier = [d for d in trained_days(cfg) if d < date]
    if not earlier:
        return Decision(True, "no earlier model")
    age = (date - earlier[-1]).days
    every = cfg.orchestration.retrain_every_days
    if age >= every:
        return Decision(True, f"last model is {age} day(s) old (retrain_every_days={every})")
    return Decision(
        False,
        f"last model ({earlier[-1].isoformat()}) is {age} day(s) old, "
        f"retrain_every_days={every}, no alert pending",
    )
