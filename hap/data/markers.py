"""Per-day validation markers: the contract between ``validate`` and everything downstream.

A day may feed training only when ``validation/dt=D/_VALIDATED.json`` exists and the day is
not in quarantine. ``validate`` writes the marker; ``split`` and ``train`` call
``require_validated``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import NotValidated

MARKER_NAME = "_VALIDATED.json"


def marker_path(cfg: Config, date: dt.date | str) -> Path:
    return layout.validation_day(cfg, date) / MARKER_NAME


def mark_validated(cfg: Config, date: dt.date | str, summary: dict[str, Any]) -> Path:
    path = marker_path(cfg, date)
    atomic_write_json(path, {"date": layout.day(date).isoformat(), **summary})
    return path


def clear_marker(cfg: Config, date: dt.date | str) -> None:
    marker_path(cfg, date).unlink(missing_ok=True)


def is_quarantined(cfg: Config, date: dt.date | str) -> bool:
    return layout.quarantine_day(cfg, date).exists()


def is_validated(cfg: Config, date: dt.date | str) -> bool:
    return marker_path(cfg, date).exists() and not is_quarantined(cfg, date)


def validated_days(cfg: Config) -> list[dt.date]:
    """Every day that holds a validation marker and is not quarantined, oldest first."""
    root = cfg.path("validation")
    days = sorted(layout.day(p.name.removeprefix("dt=")) for p in root.glob("dt=*") if p.is_dir())
    return [d for d in days if is_validated(cfg, d)]


def read_marker(cfg: Config, date: dt.date | str) -> dict[str, Any]:
    return json.loads(marker_path(cfg, date).read_text())


def landing_stamp(cfg: Config, date: dt.date | str) -> dict[str, list[int]]:
    """Size and modification time of each file in the landing day: what validation saw."""
    folder = layout.landing_day(cfg, date)
    if not folder.is_dir():
        return {}
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())}


def require_fresh_validation(cfg: Config, date: dt.date | str, step: str) -> None:
    """Refuse ``step`` unless the day passed validation on exactly the files it holds now: a file
    that changed or arrived after validation was never checked."""
    require_validated(cfg, [date], step)
    iso = layout.day(date).isoformat()
    seen, now = read_marker(cfg, date).get("files"), landing_stamp(cfg, date)
    if seen != now:
        changed = sorted(n for n in set(seen or {}) | set(now) if (seen or {}).get(n) != now.get(n))
        raise NotValidated(
            f"{step}: the landing files of {iso} changed after validation ({changed}); "
            f"run `hap validate --date {iso}` again"
        )


def require_validated(cfg: Config, dates: Iterable[dt.date | str], step: str) -> None:
    """Refuse to run ``step`` on any day that is quarantined or has not passed validation."""
    for date in dates:
        iso = layout.day(date).isoformat()
        if is_quarantined(cfg, date):
            raise NotValidated(
                f"{step}: day {iso} is quarantined ({layout.quarantine_day(cfg, date)}); fix the data "
                f"and run `hap release-quarantine --date {iso}`, then `hap validate --date {iso}`"
            )
        if not marker_path(cfg, date).exists():
            raise NotValidated(
                f"{step}: day {iso} has not passed validation; run `hap validate --date {iso}` first"
            )
