"""LRU eviction driven from the index: keep the cache under its byte budget (DESIGN §3)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .metadata import Entry, Metadata
from .metrics import Metrics
from .oci import Digest
from .storage import BlobStore, HotFiles

log = logging.getLogger("edgecache.evictor")


class Evictor:
    """LRU eviction driven from the index (diskcache's own culling only governs its own values)."""

    def __init__(self, store: BlobStore, metadata: Metadata, metrics: Metrics, max_size: int,
                 high: float, low: float, spawn: Callable[..., Any], hot: HotFiles | None = None) -> None:
        self.store, self.metadata, self.metrics = store, metadata, metrics
        self.hot = hot if hot is not None else HotFiles()
        self.max_size = max_size
        self.high, self.low = int(max_size * high), int(max_size * low)
        self._spawn = spawn
        self._lock = asyncio.Lock()
        self._kicked = False

    def kick(self) -> None:
        """Check the budget in the background after a commit."""
        if not self._kicked:
            self._kicked = True
            self._spawn(self._evict_task(), "evict")

    async def _evict_task(self) -> None:
        self._kicked = False
        await self.evict(0)

    async def free(self, nbytes: int) -> int:
        """The disk is full whatever the budget says: evict least recently used until ``nbytes`` are freed."""
        async with self._lock:
            freed = 0
            for digest, entry in await self.metadata.lru():
                if freed >= nbytes:
                    break
                freed += await self._evict_one(digest, entry)
            return freed

    async def _evict_one(self, digest: str, listed: Entry) -> int:
        """Forget an entry, then unlink its file (an open reader keeps its inode); index writes that fail
        on a full disk are remembered in memory, so the file still goes and frees its space.

        Only the entry as listed goes: since the listing, another worker may have used it (then it is
        not least recently used any more) or evicted it and committed the digest again (then the file
        is that worker's fresh copy, possibly being served)."""
        if not await self.metadata.drop_entry(digest, only_if=lambda stored: stored == listed):
            return 0
        await asyncio.get_running_loop().run_in_executor(None, self.store.remove, Digest.parse(digest))
        self.hot.forget(digest)
        self.metrics.evictions.inc()
        self.metrics.evicted_bytes.inc(listed.size)
        return listed.size

    async def make_room(self, incoming: int) -> None:
        """Before a fill: evict so that usage plus the new blob stays under the budget."""
        await self.evict(incoming)

    async def evict(self, incoming: int) -> int:
        async with self._lock:
            total = await self.metadata.total_bytes()
            self.metrics.cache_bytes.set(total)
            if total + incoming <= self.high:
                return 0
            target = max(0, self.low - incoming)
            freed = 0
            for digest, entry in await self.metadata.lru():
                if total - freed <= target:
                    break
                freed += await self._evict_one(digest, entry)
            self.metrics.cache_bytes.set(total - freed)
            if freed:
                log.info("evicted %d bytes (usage %d, budget %d)", freed, total - freed, self.max_size)
            return freed
