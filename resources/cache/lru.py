"""The in-process tier: a thread-safe LRU of read-only vectors that remembers where each came from."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class LruTier:
    """LRU bounded by entry count (0 = disabled). Each entry keeps its *origin*: ``"local"`` for
    vectors this process computed or read from its disk, ``"redis"`` for vectors read from the
    shared tier, so that distrusting Redis can drop exactly what Redis put here."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[np.ndarray, str] | None:
        """``(vector, origin)`` or None; a hit becomes the most recently used entry."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put_many(self, items: Sequence[tuple[str, np.ndarray]], origin: str) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            for key, vector in items:
                self._entries[key] = (vector, origin)
                self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def discard(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def drop_origin(self, origin: str) -> int:
        """Remove every entry that came from ``origin``; returns how many."""
        with self._lock:
            doomed = [key for key, (_, came_from) in self._entries.items() if came_from == origin]
            for key in doomed:
                del self._entries[key]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)
