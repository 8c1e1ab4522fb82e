"""The tile cache (al_core.tiles.cache): an LRU bounded by bytes."""

from __future__ import annotations

from al_core.tiles.cache import LRUCache


def test_lru_cache_is_bounded_by_bytes() -> None:
    cache = LRUCache(max_bytes=10)
    cache.put(("a",), b"12345")
    cache.put(("b",), b"12345")
    assert cache.get(("a",)) == b"12345"  # now most recent
    cache.put(("c",), b"123")
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 2
