"""A tiny dataset in RecFlow's documented layout: ``realshow/<day>.feather`` (the exposures, with
their feedback) and ``all_stage/<day>.feather`` (every stage's candidates: the exposed ones, the
ones dropped at rerank, ranking, coarse ranking and pre-ranking), one file per day.

Realistic where the pipeline checks it, tiny everywhere else: the same users come back every day,
each user prefers one category (clicks, ``effective_view``, follow it: ~10% of exposures), every
request keeps 10 ranking and 10 pre-ranking/coarse negatives (the contract's defaults), and
``duration`` is in milliseconds and ``rank_pos`` a 0/1 flag, as RecFlow documents them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather

START = dt.date(2024, 2, 1)
RANK_NEG = 10  # per request: contract.rank_neg_per_request
PRERANK_NEG = 10  # coarse_neg + prerank_neg per request: contract.prerank_neg_per_request
N_CATEGORIES = 8
STAGE_FLAGS = ("realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg")


@dataclass(frozen=True)
class RecFlowDay:
    """One written day: the rows of its ``realshow`` and ``all_stage`` files."""

    date: dt.date
    realshow: pd.DataFrame
    all_stage: pd.DataFrame


def _request(rng: np.random.Generator, req: int, user: int, ts: int, catalog: pd.DataFrame) -> pd.DataFrame:
    """Every candidate of one request that RecFlow logs, with its stage flags and feedback."""
    shown, rerank_neg = int(rng.integers(4, 9)), int(rng.integers(0, 3))
    n = shown + rerank_neg + RANK_NEG + PRERANK_NEG
    rows = catalog.iloc[rng.choice(len(catalog), n, replace=False)].reset_index(drop=True)
    stage = np.repeat(["show", "rerank", "rank", "coarse", "prerank"], [shown, rerank_neg, RANK_NEG, 5, 5])
    rows["request_id"] = req
    rows["request_timestamp"] = ts
    rows["user_id"] = user
    rows["device_id"] = 1000 + user
    rows["age"] = user % 6
    rows["gender"] = user % 2
    rows["province"] = user % 31
    rows["upload_timestamp"] = ts - rng.integers(3_600_000, 30 * 86_400_000, n)
    for flag in STAGE_FLAGS:
        rows[flag] = 0
    rows["realshow"] = (stage == "show").astype(np.int64)
    rows["rerank_pos"] = rows["realshow"]
    rows["rerank_neg"] = (stage == "rerank").astype(np.int64)
    rows["rank_pos"] = np.isin(stage, ["show", "rerank"]).astype(np.int64)  # a flag: ranked top 10
    rows["rank_neg"] = (stage == "rank").astype(np.int64)
    rows["coarse_neg"] = (stage == "coarse").astype(np.int64)
    rows["prerank_neg"] = (stage == "prerank").astype(np.int64)
    rank_index = np.full(n, -1)
    rank_index[: shown + rerank_neg] = np.arange(shown + rerank_neg)
    rank_index[stage == "rank"] = np.sort(rng.choice(np.arange(10, 200), RANK_NEG, replace=False))
    rows["rank_index"] = rank_index  # 0-based; -1 where the candidate never reached ranking
    rows["rerank_index"] = np.where(rank_index >= 0, rank_index, -1)
    liked = rows["category_level_one"].to_numpy() == user % N_CATEGORIES
    view = (rng.random(n) < np.where(liked, 0.45, 0.06)) & (stage == "show")
    rows["effective_view"] = view.astype(np.int64)
    rows["long_view"] = (view & (rng.random(n) < 0.4)).astype(np.int64)
    rows["playing_time"] = np.where(view, rows["duration"] // 2, rows["duration"] // 20) * (stage == "show")
    rows["like"] = (view & (rng.random(n) < 0.2)).astype(np.int64)
    rows["follow"] = 0
    rows["forward"] = (view & (rng.random(n) < 0.05)).astype(np.int64)
    rows["comment"] = (view & (rng.random(n) < 0.05)).astype(np.int64)
    return rows


def write_day(root: Path, date: dt.date, n_requests: int, n_users: int, seed: int) -> RecFlowDay:
    """Write one day's two feather files under ``root`` and return their rows."""
    rng = np.random.default_rng([seed, date.toordinal()])
    catalog_rng = np.random.default_rng(seed)  # the same videos every day
    videos = np.arange(1, 3001)
    catalog = pd.DataFrame(
        {
            "video_id": videos,
            "author_id": videos // 7,
            "category_level_one": catalog_rng.integers(0, N_CATEGORIES, len(videos)),
            "category_level_two": catalog_rng.integers(0, 60, len(videos)),
            "upload_type": catalog_rng.integers(0, 5, len(videos)),
            "duration": catalog_rng.integers(5_000, 180_000, len(videos)),  # milliseconds
        }
    )
    day_start = int(dt.datetime.combine(date, dt.time(), dt.UTC).timestamp() * 1000)
    times = np.sort(day_start + rng.integers(0, 86_400_000, n_requests))
    users = rng.integers(0, n_users, n_requests)
    base_id = (date - START).days * 1_000_000 + 1_000_000
    requests = [_request(rng, base_id + i, int(users[i]), int(times[i]), catalog) for i in range(n_requests)]
    all_stage = pd.concat(requests, ignore_index=True)
    realshow = all_stage[all_stage["realshow"] == 1].reset_index(drop=True)
    for folder, frame in (("realshow", realshow), ("all_stage", all_stage)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        feather.write_feather(
            pa.Table.from_pandas(frame, preserve_index=False), root / folder / f"{date}.feather"
        )
    return RecFlowDay(date, realshow, all_stage)


def write_fixture(
    root: Path, days: int = 4, n_requests: int = 120, n_users: int = 60, seed: int = 0, start: dt.date = START
) -> list[RecFlowDay]:
    """``days`` consecutive RecFlow days from ``start`` under ``root``: 120 requests a day by
    default, enough for ``validation.fullflow_min_requests`` (every request is a full-flow one)."""
    return [
        write_day(Path(root), start + dt.timedelta(days=i), n_requests, n_users, seed) for i in range(days)
    ]
