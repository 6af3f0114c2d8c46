"""Plot data for ``dvc plots``: the per-K recall curve, derived from the day's ``eval.json``.

``hap evaluate`` writes flat metric names (``recall@10``, ``ndcg@50``, ...); DVC plots want a
list of records, so this turns them into ``[{"k": 10, "recall": .., "ndcg": ..}, ...]``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError

CURVE_FILE = layout.RECALL_CURVE_FILE
_AT_K = re.compile(r"^(recall|ndcg)@(\d+)$")


def recall_curve(metrics: dict[str, float]) -> list[dict[str, float]]:
    """Records ``{"k", "recall", "ndcg"}`` sorted by K, from flat ``name@K`` metrics."""
    by_k: dict[int, dict[str, float]] = {}
    for name, value in metrics.items():
        match = _AT_K.match(name)
        if match:
            by_k.setdefault(int(match.group(2)), {"k": int(match.group(2))})[match.group(1)] = value
    return [by_k[k] for k in sorted(by_k)]


def write_recall_curve(cfg: Config, date: dt.date | str) -> Path:
    """Read ``metrics/dt=D/eval.json`` and write ``metrics/dt=D/recall_curve.json``."""
    folder = layout.metrics_dir(cfg, date)
    source = folder / layout.EVAL_FILE
    if not source.exists():
        raise HapError(f"no evaluation at {source}; run `hap evaluate --date {layout.day(date)}` first")
    payload = json.loads(source.read_text())
    metrics = payload.get("metrics", payload) if isinstance(payload, dict) else {}
    curve = recall_curve({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if not curve:
        raise HapError(f"{source} holds no recall@K / ndcg@K metrics")
    atomic_write_json(folder / CURVE_FILE, curve)
    return folder / CURVE_FILE
