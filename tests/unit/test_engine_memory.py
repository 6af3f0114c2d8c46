"""Each mapped item runs on the system allocator and hands its freed memory back before the next."""

from __future__ import annotations

import psutil
import pyarrow as pa
import pytest

from hap.core import engine


@pytest.fixture
def default_pool():
    before = pa.default_memory_pool()
    yield
    pa.set_memory_pool(before)


def _allocate_and_drop(megabytes: int) -> int:
    chunks = [pa.array(range(1 << 20), pa.int64()) for _ in range(megabytes // 8)]
    allocated = pa.default_memory_pool().bytes_allocated()
    del chunks
    return allocated


def test_an_item_runs_on_the_system_pool_and_releases_what_it_freed(default_pool, monkeypatch):
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    rss = psutil.Process().memory_info().rss
    assert engine.local_map(_allocate_and_drop, [400])[0] >= 400 * 2**20
    assert pa.default_memory_pool().backend_name == "system"
    # the 400 MB the item freed went back to the OS, not to a pool kept for later
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20


def test_an_explicit_arrow_pool_is_kept(default_pool, monkeypatch):
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    engine.local_map(_allocate_and_drop, [8])
    assert pa.default_memory_pool().backend_name == "mimalloc"


class _Cyclic:
    """An object in a reference cycle, as GX's validators and execution engines are."""

    def __init__(self, megabytes: int) -> None:
        self.data = pa.array(range(megabytes << 17), pa.int64())
        self.me = self


def _leave_a_cycle(megabytes: int) -> int:
    left = _Cyclic(megabytes)
    return left.data.nbytes


def test_what_an_item_left_in_reference_cycles_is_freed_before_the_next(default_pool, monkeypatch):
    import gc

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    gc.disable()  # as if the cycle collector's oldest generation were not due for a long while
    try:
        engine.local_map(_leave_a_cycle, [1])  # settles the pool switch
        before = pa.default_memory_pool().bytes_allocated()
        assert engine.local_map(_leave_a_cycle, [200])[0] >= 200 * 2**20
        assert pa.default_memory_pool().bytes_allocated() - before < 8 * 2**20
    finally:
        gc.enable()
