"""The simulator's latent universe: users, items, their static features and the true affinity.

Users and items have latent vectors; the true affinity is ``max_k u_k·v + item bias + the user's
content-type preference``. Users hold several interests (``n_interests`` vectors, each on an item
category's centre, some from their segment's favourite categories); an item's affinity is its
best-matching interest. The universe depends on the seed alone, so it is identical every day.

The latent vectors sit on ``exact_grid``, so every affinity is exact in float64 and a simulated
day does not depend on the BLAS build or its thread count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from hap.core.config import SimulateConfig
from hap.core.hashing import hash_ids

RNG_STREAM_UNIVERSE = 0
AFFINITY_BLOCK_USERS = 256  # users per float64 affinity block (~40 MB at 20k items)


@dataclass(frozen=True)
class Universe:
    user_vec: np.ndarray  # (U, K, d): K interest vectors per user
    user_segment: np.ndarray  # (U,)
    user_pref: np.ndarray  # (U, T) content-type preference
    user_weight: np.ndarray  # (U,) request probability
    user_static: dict[str, np.ndarray]
    item_vec: np.ndarray  # (I, d)
    item_bias: np.ndarray  # (I,)
    item_ctype: np.ndarray  # (I,)
    item_static: dict[str, np.ndarray]

    def affinity(self, users: np.ndarray, pref: np.ndarray) -> np.ndarray:
        """True affinity ``(len(users), I)``: the best of the user's interests, plus item bias and
        content-type preference.

        The latent vectors sit on ``exact_grid``, so every dot product is exact in float64: the
        bits do not depend on the BLAS build, its thread count or its summation order (a float32
        product summed by BLAS did: a rebuild on another machine, or after a Dask nanny set
        ``OPENBLAS_NUM_THREADS=1``, simulated other logs). One BLAS call per interest and block of
        users, a running max; memory stays at one float64 block."""
        items = self.item_vec.astype(np.float64).T
        out = np.empty((len(users), items.shape[1]), np.float32)
        for start in range(0, len(users), AFFINITY_BLOCK_USERS):
            vec = self.user_vec[users[start : start + AFFINITY_BLOCK_USERS]].astype(np.float64)
            best = vec[:, 0] @ items
            for k in range(1, vec.shape[1]):
                np.maximum(best, vec[:, k] @ items, out=best)
            out[start : start + len(vec)] = best  # an exact value rounds to one float32
        return out + self.item_bias + pref[:, self.item_ctype]


def exact_grid(x: np.ndarray, dim: int) -> np.ndarray:
    """``x`` rounded to float32 values on one power-of-two grid: as fine as float32 holds for the
    largest value, and coarse enough that a sum of ``dim`` products of two such values needs at
    most float64's 53 mantissa bits, so computing it in any order gives the exact result."""
    top = float(np.abs(x).max(initial=0.0))
    if top == 0.0:
        return x.astype(np.float32)
    exponent = math.frexp(top)[1]  # top < 2**exponent
    bits = min(24 - exponent, (53 - math.ceil(math.log2(max(dim, 2))) - 2 * exponent) // 2)
    step = 2.0**bits
    return (np.round(x.astype(np.float64) * step) / step).astype(np.float32)


def _interest_categories(
    rng: np.random.Generator, sim: SimulateConfig, user_segment: np.ndarray
) -> np.ndarray:
    """``(U, K)`` item categories each user's interests sit on: a share from the user's segment's
    favourite categories (people like those around them), the rest anywhere."""
    n_u, k = len(user_segment), sim.n_interests
    seg_cats = rng.integers(0, sim.n_item_categories, (sim.n_user_segments, max(k, 4)))
    from_segment = seg_cats[user_segment[:, None], rng.integers(0, seg_cats.shape[1], (n_u, k))]
    anywhere = rng.integers(0, sim.n_item_categories, (n_u, k))
    return np.where(rng.random((n_u, k)) < sim.segment_interest_share, from_segment, anywhere)


@functools.lru_cache(maxsize=4)
def build_universe(sim: SimulateConfig, hash_buckets: int, n_content_types: int) -> Universe:
    """Users, items and their static features, from the seed alone (identical every day)."""
    rng = np.random.default_rng([sim.seed, RNG_STREAM_UNIVERSE])
    d, n_u, n_i, t = sim.latent_dim, sim.n_users, sim.n_items, n_content_types
    scale = sim.affinity_scale / np.sqrt(np.sqrt(d))  # keeps std(u·v) near affinity_scale

    seg_centres = rng.normal(0, 1.0, (sim.n_user_segments, d))
    user_segment = rng.integers(0, sim.n_user_segments, n_u)
    user_pref = rng.normal(0, 0.6, (n_u, t))
    activity = rng.lognormal(0, 0.8, n_u)

    cat_centres = rng.normal(0, 1.0, (sim.n_item_categories, d))
    item_category = rng.integers(0, sim.n_item_categories, n_i)
    item_vec = scale * (cat_centres[item_category] + rng.normal(0, 0.7, (n_i, d)))
    item_bias = rng.normal(0, 0.5, n_i)
    item_ctype = (item_category % t).astype(np.int8)
    if sim.n_interests == 1:  # one taste vector around the segment's centre
        user_vec = scale * (seg_centres[user_segment] + rng.normal(0, 0.7, (n_u, d)))[:, None, :]
    else:  # several interests, each around an item category's centre
        cats = _interest_categories(rng, sim, user_segment)
        user_vec = scale * (cat_centres[cats] + rng.normal(0, 0.7, (n_u, sim.n_interests, d)))

    b = hash_buckets
    user_static = {
        "u_id": hash_ids(np.arange(n_u), 1, b),
        "u_age": hash_ids(rng.integers(0, 8, n_u), 2, b),
        "u_gender": hash_ids(rng.integers(0, 3, n_u), 3, b),
        "u_city": hash_ids(user_segment, 4, b),
        "u_device": hash_ids(rng.integers(0, 6, n_u), 5, b),
        "u_activity": np.log1p(activity).astype(np.float32),
        "u_ctr": (1 / (1 + np.exp(-(user_pref.mean(1) - 2.0 + rng.normal(0, 0.3, n_u))))).astype(np.float32),
    }
    item_static = {
        "i_id": hash_ids(np.arange(n_i), 10, b),
        "i_author": hash_ids(item_category * 16 + rng.integers(0, 16, n_i), 11, b),
        "i_content_type": hash_ids(item_ctype, 12, b),
        "i_category": hash_ids(item_category, 13, b),
        "i_subcategory": hash_ids(item_category * 4 + rng.integers(0, 4, n_i), 14, b),
        "i_tag": hash_ids(rng.integers(0, 500, n_i), 15, b),
        "i_language": hash_ids(rng.integers(0, 4, n_i), 16, b),
        "i_resolution": hash_ids(rng.integers(0, 3, n_i), 17, b),
        "i_age_hours": rng.exponential(72, n_i).astype(np.float32),
        "i_duration": rng.lognormal(4, 0.7, n_i).astype(np.float32),
        "i_ctr": (1 / (1 + np.exp(-(item_bias - 2.0 + rng.normal(0, 0.3, n_i))))).astype(np.float32),
        "i_popularity": np.log1p(np.exp(item_bias + rng.normal(0, 0.5, n_i)) * 100).astype(np.float32),
        "i_quality": (item_bias + rng.normal(0, 0.4, n_i)).astype(np.float32),
        "i_followers": rng.lognormal(6, 1.5, n_i).astype(np.float32),
        "i_title_len": rng.integers(5, 60, n_i).astype(np.float32),
        "i_cover_score": rng.uniform(0, 1, n_i).astype(np.float32),
    }
    return Universe(
        user_vec=exact_grid(user_vec, d),
        user_segment=user_segment,
        user_pref=user_pref.astype(np.float32),
        user_weight=activity / activity.sum(),
        user_static=user_static,
        item_vec=exact_grid(item_vec, d),
        item_bias=item_bias.astype(np.float32),
        item_ctype=item_ctype,
        item_static=item_static,
    )
