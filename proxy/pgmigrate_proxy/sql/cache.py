"""A least-recently-used map bounded by the bytes of its entries, not by their count."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Keeps entries while their sizes (as the caller counts them) add up to at most `budget`;
    an entry larger than `max_entry` is never kept. Evicts the least recently used first."""

    __slots__ = ("_entries", "budget", "max_entry", "size")

    def __init__(self, budget: int, max_entry: int) -> None:
        self.budget = budget
        self.max_entry = max_entry
        self.size = 0  # the sum of the kept entries' sizes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Keep `value` under `key` unless it is too large; evict until the budget holds."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        if size > self.max_entry or size > self.budget:
            return
        self._entries[key] = (value, size)
        self.size += size
        while self.size > self.budget:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0
