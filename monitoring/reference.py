"""Which days a day's monitoring figures are compared with, and why those days."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from hap.core import layout
from hap.core.config import Config
from hap.data import lake
from monitoring.champion import Champion


@dataclass
class Reference:
    """The frames a day is compared with, and why those days."""

    dates: list[dt.date] = field(default_factory=list)
    kind: str = "trailing"
    note: str = ""


def reference_dates(cfg: Config, date: dt.date, champion: Champion | None) -> Reference:
    """Trailing ``k`` ingested days before ``date``, or the champion's training window."""

    def ingested(d: dt.date) -> bool:
        return lake.has_days(cfg, d)

    if cfg.monitor.reference == "champion_window":
        if champion is not None and champion.window:
            days = [d for d in champion.window if d != date and ingested(d)]
            return Reference(days, "champion_window", f"champion v{champion.version}'s training window")
        note = "no champion window known; fell back to the trailing days"
    else:
        note = ""
    # Days the champion trained on are in-sample for it: its scores there (routed share, near-margin
    # share) are biased, and comparing today's out-of-sample figures against them reads as drift the
    # day after every retrain. The trailing reference therefore skips them and looks further back.
    k = cfg.monitor.trailing_days
    in_sample = set(champion.window) if champion is not None and champion.window else set()
    lookback = layout.window(date - dt.timedelta(days=1), k + len(in_sample))
    days = [d for d in lookback if ingested(d) and d not in in_sample][-k:]
    skipped = f", skipping champion v{champion.version}'s training days" if in_sample else ""
    return Reference(days, "trailing", note or f"trailing {k} days{skipped}")
