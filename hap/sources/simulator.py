"""A simulator of the recommendation cascade with a known ground truth.

Users and items have latent vectors (``hap.sources.universe``); the true affinity is
``max_k u_k·v + item bias + the user's content-type preference``. Each request runs retrieval →
pre-ranking → ranking → exposure → click, and the logged negatives follow ToutiaoRec's sampling.
Because difficulty is real here (exposed negatives sit near the positives, global negatives far
away), GHCL against mixing and DAMR against uniform scaling give measurable differences.

Each knob copies a property of real feed logs (docs/data.md's table has the measured values):

- stage precision improves along the cascade: retrieval (a cheap ANN lookup) is the noisiest
  stage, pre-ranking (a small model) in between, ranking (the heavy model) the least noisy;
- active users come back several times a day (``n_users`` against ``requests_per_day``), so a
  window holds per-user signal;
- users hold several interests (``n_interests`` vectors, each on an item category's centre, some
  from their segment's favourite categories); an item's affinity is its best-matching interest, and
  the recent clicks (the favourites among ``seq_len * seq_pool_factor`` random items) spread over
  them. Target attention over the clicks can find the interest a candidate matches; their mean
  blurs them (DIN, MIND);
- the exposure click-through rate is a few percent, as in real feeds (``click_offset``).

Generation is chunked: each chunk of requests becomes one Parquet row group, so memory stays
flat in the day's volume. A day depends only on (seed, date, config): the same seed gives the
same bytes on any machine and BLAS (the affinities are exact, ``universe.exact_grid``), and days
can be generated independently (DVC runs them as separate stages).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from hap.core import layout, schema
from hap.core.atomic import atomic_dir
from hap.core.config import Config, ContractConfig, SimulateConfig
from hap.core.hashing import hash_ids
from hap.core.parquet import PARQUET_OPTIONS
from hap.sources.universe import Universe, build_universe

RNG_STREAM_CHUNK = 1
REQUEST_ID_STRIDE = 10_000_000  # request_id = date ordinal * stride + index within the day


@dataclass(frozen=True)
class DayStats:
    date: dt.date
    requests: int
    exposures: int
    clicks: int
    ranking_rows: int
    fullflow_rows: int
    path: Path


# ---- drift scenarios -----------------------------------------------------------------------------
def drift_strength(sim: SimulateConfig, date: dt.date) -> float:
    """0 before the drift starts (and always for ``stable``), ramping linearly to 1."""
    if sim.scenario == "stable" or date < sim.drift_start:
        return 0.0
    return min(1.0, ((date - sim.drift_start).days + 1) / sim.drift_ramp_days)


@dataclass(frozen=True)
class DayKnobs:
    """The cascade's settings for one day, after the scenario's drift is applied."""

    pool: int
    retrieval_noise: float
    ctype_shift: np.ndarray  # (T,) added to every user's content-type preference


def day_knobs(sim: SimulateConfig, date: dt.date, n_content_types: int) -> DayKnobs:
    s = drift_strength(sim, date)
    pool, noise = sim.retrieval_pool, sim.retrieval_noise
    shift = np.zeros(n_content_types, dtype=np.float32)
    if sim.scenario == "retrieval_degrades":
        # Retrieval turns greedy: a larger pool, ranked with less noise, floods the candidate
        # list with near-positive items, so more of the day's negatives are hard.
        pool = int(min(sim.n_items, pool * (1 + s * (sim.degrade_pool_factor - 1))))
        noise = noise * (1 - s * (1 - sim.degrade_noise_factor))
    elif sim.scenario == "content_shift":
        shift[0] = s * sim.content_shift_strength
        shift[-1] = -s * sim.content_shift_strength / 2
    return DayKnobs(pool=pool, retrieval_noise=noise, ctype_shift=shift)


# ---- one chunk of requests -----------------------------------------------------------------------
def _sample_distinct(rng: np.random.Generator, n_items: int, counts: np.ndarray) -> list[np.ndarray]:
    """Per row, ``counts[r]`` distinct random item ids (rows with a duplicate are redrawn)."""
    width = int(counts.max(initial=0))
    draws = rng.integers(0, n_items, (len(counts), max(width, 1)))
    out = []
    for r, k in enumerate(counts):
        row = draws[r, :k]
        while len(np.unique(row)) < k:
            row = rng.choice(n_items, size=k, replace=False)
        out.append(row)
    return out


def _top_positions(scores: np.ndarray, keep: int) -> np.ndarray:
    """Column indices of the ``keep`` best scores per row, best first."""
    part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def _random_subset(rng: np.random.Generator, rows: int, width: int, k: int) -> np.ndarray:
    """``k`` distinct column indices in [0, width) per row."""
    return np.argpartition(rng.random((rows, width)), k - 1, axis=1)[:, :k]


def _chunk(
    sim: SimulateConfig,
    con: ContractConfig,
    uni: Universe,
    knobs: DayKnobs,
    date: dt.date,
    first_index: int,
    size: int,
) -> dict[str, pa.Table]:
    rng = np.random.default_rng([sim.seed, RNG_STREAM_CHUNK, date.toordinal(), first_index])
    n_items = sim.n_items
    req_ids = np.int64(date.toordinal()) * REQUEST_ID_STRIDE + np.arange(first_index, first_index + size)
    users = rng.choice(sim.n_users, size=size, p=uni.user_weight)
    day_start = np.datetime64(date.isoformat(), "ms").astype(np.int64)
    seconds = np.sort(rng.uniform(0, 86_400, size)) if size else np.zeros(0)
    ts_ms = day_start + (seconds * 1000).astype(np.int64)

    # True affinity of every user in the chunk to every item (BLAS, exact: see Universe.affinity).
    affinity = uni.affinity(users, uni.user_pref[users] + knobs.ctype_shift)

    # 1. retrieval: a random pool, ranked by a noisy affinity, keeps retrieval_size.
    pool = np.sort(rng.integers(0, n_items, (size, knobs.pool)), axis=1)
    dup = np.zeros_like(pool, dtype=bool)
    dup[:, 1:] = pool[:, 1:] == pool[:, :-1]
    pool_aff = np.take_along_axis(affinity, pool, 1)
    noisy = pool_aff + knobs.retrieval_noise * rng.standard_normal(pool.shape, dtype=np.float32)
    noisy[dup] = -np.inf
    ret_cols = _top_positions(noisy, sim.retrieval_size)
    cand = np.take_along_axis(pool, ret_cols, 1)  # (R, 1000) by retrieval position
    cand_aff = np.take_along_axis(pool_aff, ret_cols, 1)
    n_ret = sim.retrieval_size

    # 2. pre-ranking: affinity + large noise, over all retrieved candidates.
    pre_order = _top_positions(
        cand_aff + sim.prerank_noise * rng.standard_normal(cand.shape, dtype=np.float32), n_ret
    )
    prerank_pos = np.empty_like(pre_order)
    np.put_along_axis(prerank_pos, pre_order, np.arange(1, n_ret + 1)[None, :], 1)
    # 3. ranking: the pre-ranker's top prerank_keep, by affinity + small noise.
    kept = pre_order[:, : con.prerank_keep]
    kept_aff = np.take_along_axis(cand_aff, kept, 1)
    rank_order = _top_positions(
        kept_aff + sim.rank_noise * rng.standard_normal(kept.shape, dtype=np.float32), con.prerank_keep
    )
    by_rank = np.take_along_axis(kept, rank_order, 1)  # candidate columns in ranking order
    rank_pos = np.zeros_like(cand, dtype=np.int32)  # 0 = never ranked
    np.put_along_axis(rank_pos, by_rank, np.arange(1, con.prerank_keep + 1)[None, :], 1)

    # 4-5. exposure of the ranking top, clicks from the true affinity with a position bias.
    n_exp = con.exposed_per_request
    exp_cols = by_rank[:, :n_exp]
    exp_aff = np.take_along_axis(cand_aff, exp_cols, 1)
    display = np.arange(1, n_exp + 1, dtype=np.int32)[None, :].repeat(size, 0)
    logit = exp_aff + sim.click_offset - sim.position_bias * (display - 1)
    click = (rng.random(exp_aff.shape) < 1 / (1 + np.exp(-logit))).astype(np.int8)

    # Logged negatives: 10 from ranking positions > rank_keep, 10 from pre-ranking positions > prerank_keep.
    rank_tail = by_rank[:, con.rank_keep :]
    rank_neg_cols = np.take_along_axis(
        rank_tail, _random_subset(rng, size, rank_tail.shape[1], con.rank_neg_per_request), 1
    )
    pre_tail = pre_order[:, con.prerank_keep :]
    prerank_neg_cols = np.take_along_axis(
        pre_tail, _random_subset(rng, size, pre_tail.shape[1], con.prerank_neg_per_request), 1
    )
    global_items = _sample_distinct(rng, n_items, click.sum(1) * con.global_neg_per_pos)

    # The user's recent clicks: the favourites among a random handful of items. With several
    # interests, the favourites spread over them: the sequence reveals each interest.
    seq_pool = rng.integers(0, n_items, (size, sim.seq_pool_factor * con.seq_len))
    seq_score = np.take_along_axis(affinity, seq_pool, 1) + rng.gumbel(size=seq_pool.shape)
    seq_items = np.take_along_axis(seq_pool, _top_positions(seq_score, con.seq_len), 1)

    chunk = _Cascade(req_ids, users, cand, cand_aff, prerank_pos, rank_pos, exp_cols, click)
    ranking = _ranking_table(uni, chunk, rank_neg_cols, prerank_neg_cols, global_items, affinity)
    exposure = _exposure_table(con, uni, rng, date, chunk, ts_ms, seq_items)
    fullflow = _fullflow_table(uni, chunk, full_flow_rows(sim, first_index, size))
    return {"exposure": exposure, "ranking": ranking, "fullflow": fullflow}


def full_flow_rows(sim: SimulateConfig, first_index: int, size: int) -> np.ndarray:
    """Rows of a chunk logged with every candidate: ``full_flow_requests`` a day, evenly spaced
    over the day's requests (a count, so eval power does not move with traffic volume)."""
    n, count = sim.requests_per_day, min(sim.full_flow_requests, sim.requests_per_day)
    index = np.arange(first_index, first_index + size, dtype=np.int64)
    return np.flatnonzero((index + 1) * count // n > index * count // n)


@dataclass(frozen=True)
class _Cascade:
    """A chunk after the cascade, what its logs are cut from; candidates in retrieval order."""

    req_ids: np.ndarray
    users: np.ndarray
    cand: np.ndarray  # item ids
    cand_aff: np.ndarray  # true affinity
    prerank_pos: np.ndarray  # 1-based
    rank_pos: np.ndarray  # 1-based, 0 = never ranked
    exp_cols: np.ndarray  # (requests, exposed): the exposed candidates' columns, by display position
    click: np.ndarray  # (requests, exposed)


def _item_columns(uni: Universe, items: np.ndarray) -> dict[str, np.ndarray]:
    return {name: uni.item_static[name][items] for name in schema.ITEM_FEATURES}


def _arrow_table(columns: dict[str, np.ndarray | pa.Array]) -> pa.Table:
    return pa.table({k: (v if isinstance(v, pa.Array) else pa.array(v)) for k, v in columns.items()})


def _ranking_table(
    uni: Universe,
    chunk: _Cascade,
    rank_neg_cols: np.ndarray,
    prerank_neg_cols: np.ndarray,
    global_items: list[np.ndarray],
    affinity: np.ndarray,
) -> pa.Table:
    size = len(chunk.req_ids)
    logged = {  # each source's logged candidates, as candidate columns
        schema.RankingSource.EXPOSED: chunk.exp_cols,
        schema.RankingSource.RANK_NEG: rank_neg_cols,
        schema.RankingSource.PRERANK_NEG: prerank_neg_cols,
    }
    rows, cols, sources = [], [], []
    for src, block in logged.items():
        rows.append(np.repeat(np.arange(size), block.shape[1]))
        cols.append(block.ravel())
        sources.append(np.full(block.size, src.value, dtype=object))
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    items = chunk.cand[row, col]
    retr = col.astype(np.int32) + 1
    pre = chunk.prerank_pos[row, col].astype(np.int32)
    rk = chunk.rank_pos[row, col]
    aff = chunk.cand_aff[row, col]
    g_row = np.repeat(np.arange(size), [len(g) for g in global_items])
    g_items = np.concatenate(global_items) if global_items else np.zeros(0, np.int64)
    # global negatives come from the whole pool; they passed through no stage.
    items = np.concatenate([items, g_items])
    row = np.concatenate([row, g_row])
    null_pos = np.zeros(len(g_items), bool)
    valid_stage = np.concatenate([np.ones(len(retr), bool), null_pos])
    rk_valid = np.concatenate([rk > 0, null_pos])
    retr = np.concatenate([retr, np.zeros(len(g_items), np.int32)])
    pre = np.concatenate([pre, np.zeros(len(g_items), np.int32)])
    rk = np.concatenate([rk, np.zeros(len(g_items), np.int32)])
    aff = np.concatenate([aff, affinity[g_row, g_items]])
    src = np.concatenate(
        sources + [np.full(len(g_items), schema.RankingSource.GLOBAL_NEG.value, dtype=object)]
    )
    order = np.lexsort((np.arange(len(row)), row))  # group rows by request, keep source order
    columns = {
        "request_id": chunk.req_ids[row],
        "item_id": items.astype(np.int64),
        "source": src,
        "retrieval_pos": pa.array(retr, mask=~valid_stage),
        "prerank_pos": pa.array(pre, mask=~valid_stage),
        "rank_pos": pa.array(rk, mask=~rk_valid),
        "content_type": uni.item_ctype[items],
        "true_affinity": aff.astype(np.float32),
        **_item_columns(uni, items),
    }
    return _arrow_table(columns).take(pa.array(order)).cast(schema.RANKING_LOG)


def _exposure_table(
    con: ContractConfig,
    uni: Universe,
    rng: np.random.Generator,
    date: dt.date,
    chunk: _Cascade,
    ts_ms: np.ndarray,
    seq_items: np.ndarray,
) -> pa.Table:
    users = chunk.users
    size, n_exp = chunk.exp_cols.shape
    row = np.repeat(np.arange(size), n_exp)
    items = np.take_along_axis(chunk.cand, chunk.exp_cols, 1).ravel()
    clk = chunk.click.ravel()
    n = len(row)
    like = (clk & (rng.random(n) < 0.25)).astype(np.int8)
    comment = (clk & (rng.random(n) < 0.05)).astype(np.int8)
    share = (clk & (rng.random(n) < 0.03)).astype(np.int8)
    dwell = np.where(clk == 1, rng.lognormal(3.0, 0.8, n), rng.exponential(1.5, n)).astype(np.float32)
    hours = ((ts_ms // 3_600_000) % 24)[row]
    seq = hash_ids(seq_items, 10, con.hash_buckets)  # same hash as i_id: the sequence lives in item-id space
    b = con.hash_buckets
    request_features = {
        **{
            name: uni.user_static[name][users][row] for name in (*schema.USER_CATEGORICAL, *schema.USER_DENSE)
        },
        schema.USER_SEQUENCE: pa.FixedSizeListArray.from_arrays(pa.array(seq[row].ravel()), con.seq_len).cast(
            pa.list_(pa.int32())
        ),
        "c_hour": hash_ids(hours, 20, b),
        "c_weekday": hash_ids(np.full(n, date.weekday()), 21, b),
        "c_network": hash_ids(rng.integers(0, 4, size)[row], 22, b),
        "c_os": hash_ids((users % 3)[row], 23, b),
        "c_channel": hash_ids(rng.integers(0, 6, size)[row], 24, b),
    }
    columns = {
        "request_id": chunk.req_ids[row],
        "timestamp": pa.array(ts_ms[row], type=pa.int64()).cast(schema.TIMESTAMP),
        "user_id": users[row].astype(np.int64),
        "item_id": items.astype(np.int64),
        "position": np.tile(np.arange(1, n_exp + 1, dtype=np.int32), size),
        "content_type": uni.item_ctype[items],
        "click": clk,
        "like": like,
        "comment": comment,
        "share": share,
        "dwell": dwell,
        **request_features,
    }
    return _arrow_table(columns).cast(schema.EXPOSURE_LOG)


def _fullflow_table(uni: Universe, chunk: _Cascade, rows: np.ndarray) -> pa.Table:
    """The candidates of the chunk's requests at ``rows``, every one of them."""
    n_ret = chunk.cand.shape[1]
    exposed = np.zeros(chunk.cand.shape, bool)
    clicked = np.zeros(chunk.cand.shape, np.int8)
    np.put_along_axis(exposed, chunk.exp_cols, True, 1)
    np.put_along_axis(clicked, chunk.exp_cols, chunk.click, 1)
    items = chunk.cand[rows].ravel()
    rk = chunk.rank_pos[rows].ravel()
    columns = {
        "request_id": np.repeat(chunk.req_ids[rows], n_ret),
        "item_id": items.astype(np.int64),
        "retrieval_pos": np.tile(np.arange(1, n_ret + 1, dtype=np.int32), len(rows)),
        "prerank_pos": chunk.prerank_pos[rows].ravel().astype(np.int32),
        "rank_pos": pa.array(rk.astype(np.int32), mask=rk == 0),
        "exposed": exposed[rows].ravel(),
        "click": clicked[rows].ravel(),
        "content_type": uni.item_ctype[items],
        "true_affinity": chunk.cand_aff[rows].ravel().astype(np.float32),
        **_item_columns(uni, items),
    }
    return _arrow_table(columns).cast(schema.FULLFLOW_LOG)


# ---- days ----------------------------------------------------------------------------------------
def simulate_day(cfg: Config, date: dt.date | str, progress: bool = True) -> DayStats:
    """Write one day's raw logs into ``landing/dt=D`` atomically; a re-run replaces them."""
    date = layout.day(date)
    sim = cfg.simulate
    uni = build_universe(sim, cfg.contract.hash_buckets, cfg.contract.n_content_types)
    knobs = day_knobs(sim, date, cfg.contract.n_content_types)
    counts = dict(requests=0, exposures=0, clicks=0, ranking_rows=0, fullflow_rows=0)
    target = layout.landing_day(cfg, date)
    with atomic_dir(target) as tmp:
        writers = {
            name: pq.ParquetWriter(tmp / f"{name}.parquet", s, **PARQUET_OPTIONS)
            for name, s in schema.RAW_LOGS.items()
        }
        try:
            starts = range(0, sim.requests_per_day, sim.chunk_requests)
            for start in tqdm(
                starts, desc=f"simulate {date}", unit="chunk", disable=not progress, leave=False
            ):
                size = min(sim.chunk_requests, sim.requests_per_day - start)
                tables = _chunk(sim, cfg.contract, uni, knobs, date, start, size)
                for name, table in tables.items():
                    writers[name].write_table(table, row_group_size=max(table.num_rows, 1))
                counts["requests"] += size
                counts["exposures"] += tables["exposure"].num_rows
                counts["clicks"] += int(pc.sum(tables["exposure"]["click"]).as_py() or 0)
                counts["ranking_rows"] += tables["ranking"].num_rows
                counts["fullflow_rows"] += tables["fullflow"].num_rows
        finally:
            for writer in writers.values():
                writer.close()
    return DayStats(date=date, path=target, **counts)


def simulate_days(
    cfg: Config, start: dt.date, days: int, progress: bool = True
) -> Iterator[tuple[dt.date, DayStats]]:
    for offset in range(days):
        date = start + dt.timedelta(days=offset)
        yield date, simulate_day(cfg, date, progress=progress)
