"""ByteLRU: bounded by the sizes of its entries, least recently used out first."""

from __future__ import annotations

from pgmigrate_proxy.sql.cache import ByteLRU


def test_keeps_entries_within_the_budget() -> None:
    cache: ByteLRU[str, int] = ByteLRU(budget=100, max_entry=60)
    for i in range(10):
        cache.put(f"k{i}", i, 30)
        assert cache.size <= 100
    assert len(cache) == 3
    assert [cache.get(f"k{i}") for i in range(10)] == [None] * 7 + [7, 8, 9]


def test_least_recently_used_goes_first() -> None:
    cache: ByteLRU[str, int] = ByteLRU(budget=90, max_entry=60)
    cache.put("a", 1, 30)
    cache.put("b", 2, 30)
    cache.put("c", 3, 30)
    assert cache.get("a") == 1  # now b is the oldest
    cache.put("d", 4, 30)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.get("d")) == (1, None, 3, 4)


def test_never_keeps_an_entry_above_max_entry() -> None:
    cache: ByteLRU[str, int] = ByteLRU(budget=1000, max_entry=60)
    cache.put("small", 1, 60)
    cache.put("big", 2, 61)
    assert (cache.get("small"), cache.get("big"), cache.size) == (1, None, 60)


def test_replacing_an_entry_counts_it_once() -> None:
    cache: ByteLRU[str, int] = ByteLRU(budget=100, max_entry=100)
    cache.put("a", 1, 40)
    cache.put("a", 2, 50)
    assert (cache.get("a"), cache.size, len(cache)) == (2, 50, 1)
    cache.put("a", 3, 500)  # too large now: dropped, not kept stale
    assert (cache.get("a"), cache.size, len(cache)) == (None, 0, 0)
    cache.clear()
    assert cache.size == 0
