"""The project's one hash: splitmix64 over a pair of integer arrays and a salt.

Every deterministic pseudo-random decision of the pipeline uses it: the split's sampling and eval
requests (``unit_hash``), validation's request content keys, the model's feature re-hashing and
monitoring's request sampling and the sources' id anonymization (``hash_ids``). A pure function
of its inputs: no RNG state, the same bytes on every machine.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SECOND = np.uint64(0xC2B2AE3D27D4EB4F)


def mix64(a: np.ndarray | int, b: np.ndarray | int, salt: int) -> np.ndarray:
    """A well-mixed uint64 per ``(a, b, salt)`` (splitmix64's finalizer over the combined pair)."""
    with np.errstate(over="ignore"):
        x = (
            np.asarray(a).astype(np.uint64) * _GOLDEN
            ^ (np.asarray(b).astype(np.uint64) + np.uint64(salt & 0xFFFFFFFF)) * _SECOND
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def unit_hash(a: np.ndarray | int, b: np.ndarray | int, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per ``(a, b, salt)``: sampling that never depends on batch
    boundaries or RNG state."""
    return (mix64(a, b, salt) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def bucket(a: np.ndarray | int, b: np.ndarray | int, salt: int, buckets: int) -> np.ndarray:
    """A bucket in ``[1, buckets)`` per ``(a, b, salt)``; 0 stays free as the padding id."""
    return (mix64(a, b, salt) % np.uint64(buckets - 1) + np.uint64(1)).astype(np.int64)


def hash_ids(values: np.ndarray, salt: int, buckets: int) -> np.ndarray:
    """Anonymized ids in ``[1, buckets)`` for raw ids, one stream per ``salt`` (per feature)."""
    return bucket(values, 0, salt, buckets).astype(np.int32)
