"""Quarantine: a bad day leaves the pipeline, with its data and the reason, and nothing is lost.

``quarantine_day`` moves the day's landing folder into ``quarantine/dt=D/landing`` and writes
``result.json`` with a machine-readable reason (step, check, file, examples). Every rejection
calls it: validation, ingest, training (non-finite data) and the flows for any ``DayRejected``.
Lake days are derived data: a day rejected after ingest published it is removed from the lake
tables in one commit each (``hap.data.lake.unpublish_day``), never moved, so the quarantine holds
only what landed. ``markers.require_validated``
then refuses the day. ``release_quarantine`` is for the operator who has fixed the data: either
fixed in place under ``quarantine/dt=D/landing/`` (it is moved back), or re-landed under
``landing/dt=D/`` (the fresh files win and the quarantined copy is archived). The day then goes
through ``hap validate`` and ``hap ingest`` again.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError
from hap.data import lake, markers
from hap.data.buckets import drop_cut

RESULT_FILE = layout.QUARANTINE_RESULT_FILE
RELEASED_DIR = ".released"


def _move(src: Path, dst: Path) -> bool:
    if not src.exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
    return True


def quarantine_day(cfg: Config, date: dt.date | str, reason: dict[str, Any]) -> Path:
    """Move the day's landing files to ``quarantine/dt=D`` with ``reason``; unpublish its lake
    days. Idempotent: a second rejection of the same day keeps the first one's files."""
    date = layout.day(date)
    qdir = layout.quarantine_day(cfg, date)
    qdir.mkdir(parents=True, exist_ok=True)
    markers.clear_marker(cfg, date)
    moved: dict[str, str] = {}
    if _move(layout.landing_day(cfg, date), qdir / "landing"):
        moved["landing"] = str(qdir / "landing")
    unpublished = lake.unpublish_day(cfg, date)
    drop_cut(cfg, date)  # its buckets: scratch copies
    atomic_write_json(
        qdir / RESULT_FILE,
        {
            "date": date.isoformat(),
            "quarantined_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "moved": moved,
            "unpublished": unpublished,
            "reason": reason,
            "release": f"fix the data, then `hap release-quarantine --date {date}`",
        },
    )
    return qdir


def reject(cfg: Config, err: Any) -> Path | None:
    """Quarantine the day a ``DayRejected`` names, once; returns where it went (None if no day)."""
    date = getattr(err, "date", "")
    if not date:
        return None
    if markers.is_quarantined(cfg, date):
        return layout.quarantine_day(cfg, date)
    return quarantine_day(cfg, date, err.reason())


@dataclass
class ReleaseReport:
    date: dt.date
    restored_landing: bool
    archived_to: Path

    def render(self) -> str:
        where = (
            "the quarantined landing files were moved back"
            if self.restored_landing
            else "the fresh files in landing/ were kept"
        )
        return (
            f"released {self.date} from quarantine: {where}; record archived at {self.archived_to}. "
            f"Next: `hap ingest --date {self.date}` then `hap validate --date {self.date}`"
        )


def release_quarantine(cfg: Config, date: dt.date | str) -> ReleaseReport:
    """Take a fixed day out of quarantine so that it can be ingested and validated again."""
    date = layout.day(date)
    qdir = layout.quarantine_day(cfg, date)
    if not qdir.exists():
        raise HapError(f"release-quarantine: {date} is not in quarantine ({qdir} does not exist)")
    landing = layout.landing_day(cfg, date)
    restored = False
    if not landing.exists() and (qdir / "landing").exists():
        restored = _move(qdir / "landing", landing)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    archive = cfg.path("quarantine") / RELEASED_DIR / f"{layout.partition(date)}-{stamp}"
    archive.parent.mkdir(parents=True, exist_ok=True)
    os.replace(qdir, archive)
    return ReleaseReport(date=date, restored_landing=restored, archived_to=archive)
