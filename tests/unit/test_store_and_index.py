"""Blob store and index conformance, and LRU eviction with an injected clock."""

from __future__ import annotations

import os
from pathlib import Path

import diskcache
import pytest

from edgecache.metadata import Entry, Metadata, TagEntry
from edgecache.metrics import Metrics
from edgecache.oci import Digest
from edgecache.evictor import Evictor
from edgecache.storage import BlobStore, FillInfo, HotFiles
from edgecache.tasks import TaskOwner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fill_commit_and_abort(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    data = b"hello"
    d = Digest.of(data)
    fd = store.begin_fill(d, FillInfo(len(data), "x"))
    os.write(fd, data)
    reader = store.open_partial(d)
    assert reader is not None and store.fill_info(d) == FillInfo(5, "x")
    store.commit_fill(d)
    os.close(fd)
    assert store.read(d) == data and os.pread(reader, 5, 0) == data  # reader's fd survives the rename
    assert os.fstat(reader).st_nlink == 1
    os.close(reader)
    d2 = Digest.of(b"other")
    fd = store.begin_fill(d2, FillInfo(5, "x"))
    reader = store.open_partial(d2)
    assert reader is not None
    store.abort_fill(d2)
    assert os.fstat(reader).st_nlink == 0 and store.size(d2) is None
    os.close(fd)
    os.close(reader)


def test_lock_is_exclusive(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    d = Digest.of(b"x")
    a, b = store.lock(d), store.lock(d)
    assert a.try_acquire() and not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()


def test_clean_tmp_keeps_live_fills(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    live, dead = Digest.of(b"live"), Digest.of(b"dead")
    lock = store.lock(live)
    assert lock.try_acquire()
    os.close(store.begin_fill(live, FillInfo(4, "x")))
    os.close(store.begin_fill(dead, FillInfo(4, "x")))
    store.clean_tmp()
    assert store.partial_path(live).exists() and not store.partial_path(dead).exists()
    lock.release()


async def test_index_tags_links_negative(tmp_path: Path) -> None:
    clock = Clock()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    try:
        await md.set_tag("up|r|t|*", TagEntry("sha256:" + "a" * 64, "m", 3, clock()))
        entry = await md.get_tag("up|r|t|*")
        assert entry is not None and entry.size == 3
        assert not await md.has_link("up", "r", "d")
        await md.add_link("up", "r", "d")
        assert await md.has_link("up", "r", "d")
        await md.set_negative("up|r|x", 30)
        assert await md.get_negative("up|r|x")
        clock.now += 31
        assert not await md.get_negative("up|r|x")
        assert await md.purge("up|r|") >= 2
        assert await md.get_tag("up|r|t|*") is None
    finally:
        await md.close()



async def test_visibility_expires_and_can_be_read_stale(tmp_path: Path) -> None:
    clock = Clock()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    try:
        assert await md.visibility("up", "r") is None
        await md.set_visibility("up", "r", "public", 300)
        assert await md.visibility("up", "r") == "public"
        clock.now += 301
        assert await md.visibility("up", "r") is None  # ask the upstream again
        assert await md.visibility("up", "r", stale_ok=3600) == "public"  # unless it is down
        with diskcache.Cache(str(tmp_path / "index" / "meta")) as older_version:
            older_version.set("v|up|old", "public")  # the shape it kept forever
        assert await md.visibility("up", "old", stale_ok=3600) is None
    finally:
        await md.close()

async def test_lru_eviction_respects_budget_and_access_order(tmp_path: Path) -> None:
    clock = Clock()
    store = BlobStore(tmp_path)
    store.create_dirs()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    owner = TaskOwner()
    evictor = Evictor(store, md, Metrics(), max_size=1000, high=0.9, low=0.5, spawn=owner.spawn)
    digests = []
    try:
        for i in range(4):
            data = bytes([i]) * 300
            d = Digest.of(data)
            store.write_verified(d, data)
            await md.put_entry(str(d), len(data), "x")
            digests.append(d)
            clock.now += 1
        md.touch(str(digests[0]))  # the oldest becomes the most recently used
        freed = await evictor.evict(0)
        assert freed >= 300
        assert await md.total_bytes() <= 500
        assert store.size(digests[0]) == 300  # kept: recently used
        assert store.size(digests[1]) is None  # evicted: least recently used
    finally:
        await owner.close()
        await md.close()


async def test_eviction_spares_what_another_worker_used_or_committed_since_the_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between listing the LRU order and unlinking, another worker (a second index handle on the same
    directory) re-commits one digest and uses another: only the untouched one is evicted."""
    clock, other_clock = Clock(), Clock()
    store = BlobStore(tmp_path)
    store.create_dirs()
    md, other = Metadata(tmp_path / "index", clock), Metadata(tmp_path / "index", other_clock)
    await md.open()
    await other.open()
    owner = TaskOwner()
    evictor = Evictor(store, md, Metrics(), max_size=1000, high=0.5, low=0.1, spawn=owner.spawn)
    contents = {Digest.of(bytes([i]) * 300): bytes([i]) * 300 for i in range(3)}
    recommitted, used, idle = contents
    try:
        for d, data in contents.items():
            store.write_verified(d, data)
            await md.put_entry(str(d), 300, "x")
            clock.now += 1
        listing = md.lru

        async def listing_then_other_worker() -> list[tuple[str, Entry]]:
            listed = await listing()
            other_clock.now = clock.now + 10
            await other.drop_entry(str(recommitted))  # its eviction ...
            store.remove(recommitted)
            store.write_verified(recommitted, contents[recommitted])  # ... and a fresh fetch
            await other.put_entry(str(recommitted), 300, "x")
            other.touch(str(used))
            await other.flush_touches()
            return listed

        monkeypatch.setattr(md, "lru", listing_then_other_worker)
        assert await evictor.evict(0) == 300
        assert store.size(idle) is None
        assert store.size(recommitted) == 300 and store.size(used) == 300
        assert await md.get_entry(str(recommitted)) is not None
        assert await other.total_bytes() == 600
    finally:
        await owner.close()
        await other.close()
        await md.close()


async def test_reconcile_drops_missing_and_adopts_verified(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    md = Metadata(tmp_path / "index")
    await md.open()
    try:
        good = Digest.of(b"good")
        store.write_verified(good, b"good")
        await md.put_entry("sha256:" + "f" * 64, 10, "x")  # entry without file
        files = [(str(d), s) for d, s in store.walk()]
        dropped, adopted = await md.reconcile(files, lambda d, s: "application/octet-stream")
        assert (dropped, adopted) == (1, 1)
        assert await md.total_bytes() == 4
    finally:
        await md.close()


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
def test_write_verified_sizes(tmp_path: Path, size: int) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    data = os.urandom(size)
    d = Digest.of(data)
    assert store.write_verified(d, data) == size and store.read(d) == data


def test_hot_files_hand_out_their_own_descriptors_and_let_go_of_unlinked_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.create_dirs()
    digests = []
    for i in range(4):
        data = f"blob {i}".encode()
        d = Digest.of(data)
        store.write_verified(d, data)
        digests.append(d)
    assert store.open_blob(Digest.of(b"never stored")) is None
    hot = HotFiles(capacity=2, max_file_size=100)
    for d in digests[:3]:
        opened = store.open_blob(d)
        assert opened is not None
        mine = hot.offer(str(d), *opened)
        assert mine != opened[0]  # the cache keeps the original; the caller gets a duplicate
        assert os.pread(mine, 100, 0) == f"blob {digests.index(d)}".encode()
        os.close(mine)
    assert len(hot) == 2 and hot.dup(str(digests[0])) is None  # capacity: the least recently used went
    got = hot.dup(str(digests[1]))
    assert got is not None and got[1] == len(b"blob 1")
    store.remove(digests[1])  # another process evicts it while a send holds a duplicate
    assert os.pread(got[0], 100, 0) == b"blob 1"  # an open descriptor reads the verified inode
    assert hot.sweep() == 1 and hot.dup(str(digests[1])) is None  # the unlinked file is let go
    assert os.pread(got[0], 100, 0) == b"blob 1"  # ... without breaking the send in progress
    os.close(got[0])
    big = store.open_blob(digests[3])
    assert big is not None
    assert HotFiles(capacity=2, max_file_size=3).offer(str(digests[3]), *big) == big[0]  # too big: not kept
    os.close(big[0])
    before = len(os.listdir("/proc/self/fd"))
    hot.close()
    assert len(hot) == 0 and len(os.listdir("/proc/self/fd")) == before - 1
