"""aiocache TTL caches: in memory, or Redis when state is shared across nodes (tags, tokens)."""

from __future__ import annotations

from aiocache import BaseCache, Cache

SHARED_TAGS_NAMESPACE = "edgecache:"


def make_cache(redis_url: str | None, namespace: str, json: bool = False) -> BaseCache:
    """An aiocache TTL cache: in memory, or Redis when state is shared across nodes."""
    if redis_url:
        from aiocache.serializers import JsonSerializer, PickleSerializer

        cache = Cache.from_url(redis_url)
        cache.namespace = namespace
        cache.serializer = JsonSerializer() if json else PickleSerializer()
        return cache
    return Cache(Cache.MEMORY, namespace=namespace)


def make_shared_tags(redis_url: str | None) -> BaseCache | None:
    """The region-wide tag store every instance (and ``edgecache purge``) uses, when configured."""
    return make_cache(redis_url, SHARED_TAGS_NAMESPACE, json=True) if redis_url else None
