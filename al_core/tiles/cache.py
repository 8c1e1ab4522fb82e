"""A thread-safe byte-bounded LRU cache of tile bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class LRUCache:
    """A thread-safe least-recently-used cache of tile bytes, bounded by total bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        """The cached bytes of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        """Cache ``data`` under ``key``, dropping the least recently used entries beyond ``max_bytes``."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
