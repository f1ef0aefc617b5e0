"""The cache index (diskcache): what is stored, who may read it, what tags point at.

Records, keyed by strings built from validated values:

* entries: ``<digest>`` → :class:`Entry` (size, media type, last access);
* links: ``l|<upstream>|<repo>|<digest>``: the upstream showed this digest in
  that repository (a blob is only served under a repository it belongs to);
* visibility: ``v|<upstream>|<repo>`` → ``public`` | ``private`` and when that answer expires (DESIGN §4);
* tags: ``t|<upstream>|<repo>|<tag>|<accept>`` → :class:`TagEntry`;
* negative: ``n|<upstream>|<repo>|<ref>|<credential key>`` → expiry time of a remembered 404.

diskcache is SQLite underneath and safe across worker processes. Every call
here blocks; the async :class:`Metadata` facade runs them on a private executor
and keeps a small in-memory front for the hit path.

Expired negative and visibility records are never read again; the app deletes them
periodically (:meth:`Metadata.prune_expired`), visibility only once past the largest
``max_stale`` too (an upstream that is down lets a stale answer stand that long).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import itertools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import diskcache

T = TypeVar("T")
PURGE_COUNTER = "purges"  # in the meta store: bumped by every purge, read by running processes
log = logging.getLogger("edgecache.metadata")

PRUNE_BATCH = 100  # keys per executor call while pruning: the hit path waits behind one batch at most


def _redis_glob_escape(text: str) -> str:
    """A literal for a Redis SCAN MATCH pattern (``*``, ``?``, ``[``, ``]`` and ``\\`` are special there)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _negative_expiry(value: Any) -> float:
    """When a remembered 404 stops counting; a record of any other shape never counts."""
    return value if isinstance(value, float) else -math.inf


def _visibility_expiry(value: Any) -> float:
    """When a visibility answer stops being fresh; the old shape (a bare string) never was."""
    if not isinstance(value, dict) or not isinstance(value.get("expires"), float):
        return -math.inf
    return float(value["expires"])


@dataclass(frozen=True, slots=True)
class Entry:
    size: int
    media_type: str
    atime: float


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    size: int
    fetched_at: float  # when upstream last confirmed it


class Metadata:
    """Async facade over the diskcache index."""

    def __init__(self, directory: str | Path, clock: Callable[[], float] = time.time, shared_tags: Any = None) -> None:
        self._dir = Path(directory)
        # Optional aiocache backend (Redis) so every instance of a region resolves a tag the same way.
        self._shared_tags = shared_tags
        self._clock = clock
        # One thread: diskcache keeps an SQLite connection per thread, and close() can only close the
        # calling thread's; SQLite serialises writers anyway.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metadata")
        self._entries: diskcache.Cache | None = None
        self._meta: diskcache.Cache | None = None
        self._front: dict[str, Entry] = {}
        self._links: set[str] = set()
        self._touched: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._tag_front: dict[str, TagEntry] = {}  # this process's view; the index is the shared truth
        self._parents: dict[str, tuple[str, ...]] = {}
        self._lookups: dict[str, asyncio.Future[Any]] = {}
        self._dropped: set[str] = set()  # evicted here, even if the index write failed (disk full)
        self.is_open = False
        self.generation = 0  # bumped by purge: answers remembered before it are void
        self._purges_seen = 0

    @property
    def shared_tags(self) -> bool:
        """Tags are resolved region-wide (Redis): another instance may move one at any moment."""
        return self._shared_tags is not None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> None:
        """An index write. A full disk (or a busy database) must not fail the request that caused it:
        the in-memory front still has the answer, and restart reconciles index and files."""
        try:
            await self._run(fn, *args)
        except (sqlite3.OperationalError, diskcache.Timeout) as e:
            log.warning("index write skipped: %s", e)

    async def open(self) -> None:
        await self._run(self._open)
        self.is_open = True
        self._purges_seen = int(await self._run(self.meta.get, PURGE_COUNTER, 0))  # purges before now: seen

    def _open(self) -> None:
        # No size limit and no culling: eviction is driven by our own LRU (DESIGN §3).
        opts: dict[str, Any] = {"size_limit": 2**62, "cull_limit": 0, "eviction_policy": "none", "timeout": 60}
        self._entries = diskcache.Cache(str(self._dir / "entries"), **opts)
        self._meta = diskcache.Cache(str(self._dir / "meta"), **opts)

    async def close(self) -> None:
        if self.is_open:
            await self.flush_touches()
            await self._run(self._close)
            self.is_open = False
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        assert self._entries is not None and self._meta is not None
        self._entries.close()
        self._meta.close()

    @property
    def entries(self) -> diskcache.Cache:
        assert self._entries is not None
        return self._entries

    @property
    def meta(self) -> diskcache.Cache:
        assert self._meta is not None
        return self._meta

    # entries ---------------------------------------------------------------
    async def get_entry(self, digest: str) -> Entry | None:
        entry = self._front.get(digest)
        if entry is not None:
            return entry
        if digest in self._dropped:
            return None
        # A cold storm asks for the same missing digest many times at once: one index lookup serves all.
        pending = self._lookups.get(digest)
        if pending is None:
            pending = self._lookups[digest] = asyncio.ensure_future(self._run(self.entries.get, digest))
            pending.add_done_callback(lambda _f: self._lookups.pop(digest, None))
        raw = await asyncio.shield(pending)
        if raw is None:
            return None
        entry = Entry(**raw)
        self._front[digest] = entry
        return entry

    async def put_entry(self, digest: str, size: int, media_type: str) -> None:
        self._dropped.discard(digest)
        entry = Entry(size, media_type, self._clock())
        self._front[digest] = entry
        await self._write(self._put_entry, digest, entry)

    def _put_entry(self, digest: str, entry: Entry) -> None:
        with self.entries.transact():
            old = self.entries.get(digest)
            self.entries.set(digest, asdict(entry))
            if old is None:
                self.meta.incr("total_bytes", entry.size)

    async def drop_entry(self, digest: str, only_if: Callable[[Entry | None], bool] | None = None) -> bool:
        """Forget an entry; True if it was dropped.

        ``only_if`` is called with the stored entry inside the index transaction (in the index
        thread: it may touch the disk): another worker may have evicted the digest and committed it
        again since the caller looked, and its new entry and file must survive.
        """
        try:
            dropped = await self._run(self._drop_entry, digest, only_if)
        except (sqlite3.OperationalError, diskcache.Timeout) as e:
            log.warning("index write skipped: %s", e)
            dropped = True  # disk full: remembered in memory, so the file still goes and frees its space
        if dropped:
            self._forget(digest)
        return dropped

    def _forget(self, digest: str) -> None:
        self._front.pop(digest, None)
        self._touched.pop(digest, None)
        self._dropped.add(digest)

    def _drop_entry(self, digest: str, only_if: Callable[[Entry | None], bool] | None) -> bool:
        with self.entries.transact():
            old = self.entries.get(digest)
            if only_if is not None and not only_if(Entry(**old) if old is not None else None):
                return False
            if old is not None:
                self.entries.pop(digest, None)
                self.meta.decr("total_bytes", old["size"])
            return True

    def forget_front(self, digest: str) -> None:
        self._front.pop(digest, None)

    def touch(self, digest: str) -> None:
        """Record an access; written in batches by :meth:`flush_touches` (LRU order)."""
        self._touched[digest] = self._clock()

    def count(self, name: str) -> None:
        """Count an outcome for ``edgecache stats``; written with the access times."""
        self._counts[name] = self._counts.get(name, 0) + 1

    async def flush_touches(self) -> None:
        if not self._touched and not self._counts:
            return
        batch, self._touched = self._touched, {}
        counts, self._counts = self._counts, {}
        await self._write(self._flush, batch, counts)

    def _flush(self, batch: dict[str, float], counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.meta.incr(f"s|{name}", n)
        with self.entries.transact():
            for digest, at in batch.items():
                raw = self.entries.get(digest)
                if raw is not None:
                    raw["atime"] = max(raw["atime"], at)
                    self.entries.set(digest, raw)

    async def total_bytes(self) -> int:
        return int(await self._run(self.meta.get, "total_bytes", 0))

    async def lru(self) -> list[tuple[str, Entry]]:
        """Every entry, least recently used first."""
        await self.flush_touches()
        return [(d, e) for d, e in await self._run(self._lru) if d not in self._dropped]

    def _lru(self) -> list[tuple[str, Entry]]:
        items = []
        for k in self.entries.iterkeys():
            raw = self.entries.get(k)  # another worker may drop it between listing and reading
            if raw is not None:
                items.append((k, Entry(**raw)))
        items.sort(key=lambda kv: kv[1].atime)
        return items

    async def reconcile(self, files: Iterable[tuple[str, int]], adopt: Callable[[str, int], str | None]) -> tuple[int, int]:
        """Make the index match the files: drop entries without a file, adopt or reject files without an entry."""
        return await self._run(self._reconcile, list(files), adopt)

    def _reconcile(self, files: list[tuple[str, int]], adopt: Callable[[str, int], str | None]) -> tuple[int, int]:
        on_disk = dict(files)
        dropped = adopted = 0
        for key in list(self.entries.iterkeys()):
            if key not in on_disk:
                self.entries.pop(key, None)
                dropped += 1
        for digest, size in on_disk.items():
            if digest not in self.entries:
                media_type = adopt(digest, size)
                if media_type is not None:
                    self.entries.set(digest, asdict(Entry(size, media_type, self._clock())))
                    adopted += 1
        total = sum(raw["size"] for raw in (self.entries.get(k) for k in self.entries.iterkeys()) if raw)
        self.meta.set("total_bytes", total)
        return dropped, adopted

    # links and visibility --------------------------------------------------------
    async def has_link(self, upstream: str, repo: str, digest: str) -> bool:
        key = f"l|{upstream}|{repo}|{digest}"
        if key in self._links:
            return True
        found = bool(await self._run(self.meta.get, key, False))
        if found:
            self._links.add(key)
        return found

    async def add_link(self, upstream: str, repo: str, digest: str) -> None:
        key = f"l|{upstream}|{repo}|{digest}"
        if key not in self._links:
            self._links.add(key)
            await self._write(self.meta.set, key, True)

    async def visibility(self, upstream: str, repo: str, stale_ok: float = 0.0) -> str | None:
        """``public`` or ``private`` while the upstream's answer is fresh (``stale_ok`` seconds past
        that: the upstream is down), else None: ask it again. A record of the old shape (a bare
        string, kept forever) counts as expired."""
        value = await self._run(self.meta.get, f"v|{upstream}|{repo}")
        fresh = _visibility_expiry(value) + stale_ok > self._clock()
        return str(value["value"]) if fresh else None

    async def set_visibility(self, upstream: str, repo: str, value: str, ttl: float) -> None:
        await self._write(self.meta.set, f"v|{upstream}|{repo}", {"value": value, "expires": self._clock() + ttl})

    # tags and negative answers ----------------------------------------------------
    async def get_tag(self, key: str, cached: bool = True) -> TagEntry | None:
        """A tag entry; ``cached`` allows this process's copy (the caller re-reads when it looks stale)."""
        if self._shared_tags is not None:  # Redis: always the shared answer, so instances agree
            raw = await self._shared_tags.get("t|" + key)
            return TagEntry(**raw) if isinstance(raw, dict) else None
        if cached and key in self._tag_front:
            return self._tag_front[key]
        raw = await self._run(self.meta.get, "t|" + key)
        entry = TagEntry(**raw) if isinstance(raw, dict) else None
        if entry is not None:
            self._front_tag(key, entry)
        return entry

    def _front_tag(self, key: str, entry: TagEntry) -> None:
        if len(self._tag_front) > 100_000:
            self._tag_front.clear()
        self._tag_front[key] = entry

    async def set_tag(self, key: str, entry: TagEntry) -> None:
        self._front_tag(key, entry)
        if self._shared_tags is not None:
            await self._shared_tags.set("t|" + key, asdict(entry))
        else:
            await self._write(self.meta.set, "t|" + key, asdict(entry))

    async def add_tag(self, key: str, entry: TagEntry) -> TagEntry:
        """Write a tag entry only if there is none (a pinned tag: the first writer wins, in every
        process and every instance sharing the tags); the entry that holds is returned."""
        added = True
        if self._shared_tags is not None:
            try:
                await self._shared_tags.add("t|" + key, asdict(entry))
            except ValueError:  # aiocache: the key exists
                added = False
        else:
            try:
                added = await self._run(self.meta.add, "t|" + key, asdict(entry))
            except (sqlite3.OperationalError, diskcache.Timeout) as e:
                log.warning("index write skipped: %s", e)  # as _write: the front still has the answer
        if added:
            self._front_tag(key, entry)
            return entry
        held = await self.get_tag(key, cached=False)  # the winner's
        if held is None:  # removed since (a purge): ours stands
            await self.set_tag(key, entry)
            return entry
        return held

    async def purge(self, prefix: str) -> int:
        """Drop tag, negative, link and visibility records whose key starts with ``prefix`` (after the kind).

        Running processes (``edgecache purge`` is one of its own) learn of it from the index's purge
        counter, bumped last, through :meth:`notice_purges`."""
        self._forget_fronts()
        n = 0
        if self._shared_tags is not None:
            pattern = _redis_glob_escape(self._shared_tags.build_key("t|" + prefix)) + "*"
            cursor = 0
            while True:  # SCAN, not KEYS: a shared Redis is never blocked by one walk over its keyspace
                cursor, keys = await self._shared_tags.raw("scan", cursor, pattern, 1000)
                if keys:
                    n += await self._shared_tags.raw("delete", *keys)
                if not int(cursor):
                    break
        # Not _write: a purge that cannot reach the index must fail loudly (the command exits non-zero).
        return n + await self._run(self._purge, prefix)

    def _forget_fronts(self) -> None:
        self.generation += 1
        self._links.clear()
        self._tag_front.clear()

    async def notice_purges(self) -> bool:
        """Has any process purged since we last looked? Then forget what this process remembers of
        tags and links (answers remembered from them are voided too, through ``generation``)."""
        seen = int(await self._run(self.meta.get, PURGE_COUNTER, 0))
        changed = seen != self._purges_seen
        self._purges_seen = seen
        if changed:
            self._forget_fronts()
        return changed

    def _purge(self, prefix: str) -> int:
        """The deletes and the counter bump in one transaction: all of it happens, and is noticed, or none."""
        n = 0
        with self.meta.transact():
            for key in list(self.meta.iterkeys()):
                if isinstance(key, str) and key[:2] in ("t|", "n|", "v|", "l|") and key[2:].startswith(prefix):
                    self.meta.pop(key, None)
                    n += 1
            self.meta.incr(PURGE_COUNTER)
        return n

    async def get_negative(self, key: str) -> bool:
        expiry = await self._run(self.meta.get, "n|" + key)
        return _negative_expiry(expiry) > self._clock()

    async def set_negative(self, key: str, ttl: float) -> None:
        await self._write(self.meta.set, "n|" + key, self._clock() + ttl)

    async def prune_expired(self, now: float, keep_stale_for: float) -> int:
        """Delete negative records expired by ``now`` and visibility records expired more than
        ``keep_stale_for`` seconds before it (the largest ``stale_ok`` any caller reads with);
        returns how many. Neither kind has an in-memory front, so only the index changes.

        The keys are walked in batches, each its own executor call, so lookups interleave with a
        long walk. A busy or full database ends this pass early (logged); the next pass tries again.
        """
        keys = self.meta.iterkeys()  # pages by key (diskcache): deletions behind or ahead are safe
        removed = 0
        while True:
            try:
                n, more = await self._run(self._prune_batch, keys, now, keep_stale_for)
            except (sqlite3.OperationalError, diskcache.Timeout) as e:
                log.warning("index prune stopped after %d records: %s", removed, e)
                return removed
            removed += n
            if not more:
                break
        try:  # values stored with a diskcache expiry (scanner verdicts): culling is off, so expire them here
            removed += await self._run(self.meta.expire)
        except (sqlite3.OperationalError, diskcache.Timeout) as e:
            log.warning("index prune: expiring timed values failed: %s", e)
        return removed

    def _prune_batch(self, keys: Iterator[Any], now: float, keep_stale_for: float) -> tuple[int, bool]:
        batch = list(itertools.islice(keys, PRUNE_BATCH))
        candidates = [k for k in batch if isinstance(k, str) and k[:2] in ("n|", "v|")]
        removed = 0
        if candidates:
            # Read and delete in one transaction: since the listing another worker may have refreshed
            # a record (kept) or deleted it (None, expired, and delete finds nothing).
            with self.meta.transact():
                for key in candidates:
                    value = self.meta.get(key)  # the readers' own tests: nobody would use it again
                    end = _negative_expiry(value) if key[0] == "n" else _visibility_expiry(value) + keep_stale_for
                    if end <= now:
                        removed += bool(self.meta.delete(key))
        return removed, len(batch) == PRUNE_BATCH

    async def get_value(self, key: str) -> Any:
        return await self._run(self.meta.get, "x|" + key)

    async def set_value(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self._write(lambda: self.meta.set("x|" + key, value, expire=ttl))

    async def add_parent(self, children: list[str], parent: str) -> None:
        """Remember that ``children`` were reached through index ``parent`` (a blocked index blocks them)."""
        def add() -> None:
            for child in children:
                parents = set(self.meta.get("p|" + child, ()))
                if parent not in parents:
                    self.meta.set("p|" + child, tuple(parents | {parent}))
                self._parents[child] = tuple(parents | {parent})
        await self._write(add)

    async def parents(self, child: str) -> tuple[str, ...]:
        found = self._parents.get(child)
        if found is None:
            found = tuple(await self._run(self.meta.get, "p|" + child, ()))
            if len(self._parents) > 100_000:
                self._parents.clear()
            self._parents[child] = found
        return found

    async def count_entries(self) -> int:
        return int(await self._run(len, self.entries))

    async def incr(self, key: str, delta: int = 1) -> None:
        await self._write(self.meta.incr, f"s|{key}", delta)

    async def counters(self) -> dict[str, int]:
        return await self._run(lambda: {k[2:]: int(self.meta[k]) for k in self.meta.iterkeys() if str(k).startswith("s|")})
