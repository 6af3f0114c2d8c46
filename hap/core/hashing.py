"""Feature-id anonymization shared by the simulator and the adapters."""

from __future__ import annotations

import numpy as np


def hash_ids(values: np.ndarray, salt: int, buckets: int) -> np.ndarray:
    """A salted multiplicative hash into ``[1, buckets)``; 0 stays free as the padding id."""
    mixed = (np.asarray(values).astype(np.uint64) + np.uint64(salt * 1_000_003 + 1)) * np.uint64(
        0x9E3779B97F4A7C15
    )
    return ((mixed >> np.uint64(33)) % np.uint64(buckets - 1) + np.uint64(1)).astype(np.int32)
