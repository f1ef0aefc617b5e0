"""Pruning the index: expired negative and visibility records go, everything else stays."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from edgecache.app import AppState, _prune_metadata
from edgecache.caches import make_cache
from edgecache.config import UpstreamConfig
from edgecache.metadata import PRUNE_BATCH, Metadata, TagEntry
from edgecache.tasks import TaskOwner
from edgecache.upstream import UpstreamClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stored_keys(index: Path) -> set[str]:
    with diskcache.Cache(str(index / "meta")) as meta:
        return set(meta.iterkeys())


async def test_prune_deletes_only_records_nobody_would_read_again(tmp_path: Path) -> None:
    clock = Clock()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    try:
        await md.set_negative("up|r|gone|anon", 30)  # expires 1030
        await md.set_negative("up|r|gone|alice", 5000)  # expires 6000
        await md.set_visibility("up", "long-gone", "public", 300)  # 1300: past even the stale allowance
        await md.set_visibility("up", "fresh", "private", 5000)
        clock.now = 1500.0
        await md.set_visibility("up", "stale", "public", 300)  # 1800: expired, but usable while upstream is down
        clock.now = 1700.0
        await md.set_negative("up|r|edge|anon", 300)  # 2000: expired exactly at the prune time
        with diskcache.Cache(str(tmp_path / "index" / "meta")) as older_version:
            older_version.set("v|up|old-shape", "public")  # never read (counts as expired)
        # Other kinds, all older than any expiry: nothing here may go.
        await md.set_tag("up|r|t|*", TagEntry("sha256:" + "a" * 64, "m", 3, 0.0))
        await md.add_link("up", "r", "sha256:" + "a" * 64)
        await md.put_entry("sha256:" + "a" * 64, 3, "m")
        await md.add_parent(["sha256:" + "b" * 64], "sha256:" + "a" * 64)
        await md.set_value("verdict", {"allow": True})
        await md.incr("hits")
        before = stored_keys(tmp_path / "index")

        clock.now = 2000.0
        assert await md.prune_expired(2000.0, keep_stale_for=600) == 4

        gone = {"n|up|r|gone|anon", "n|up|r|edge|anon", "v|up|long-gone", "v|up|old-shape"}
        assert before - stored_keys(tmp_path / "index") == gone
        assert await md.visibility("up", "stale", stale_ok=600) == "public"  # kept, and still an answer
        assert await md.visibility("up", "fresh") == "private"
        assert await md.get_negative("up|r|gone|alice")
        assert await md.count_entries() == 1
        assert await md.prune_expired(2000.0, keep_stale_for=600) == 0
        assert await md.prune_expired(2400.0, keep_stale_for=600) == 1  # now the stale one is past use too
    finally:
        await md.close()


async def test_prune_tolerates_another_worker_deleting_and_refreshing_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker (its own diskcache handle, its own thread) deletes some expired records and
    refreshes others after the prune listed them and before it reads them, across several batches."""
    clock = Clock()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    keys = [f"up|r|missing-{i:03}|anon" for i in range(PRUNE_BATCH * 5 // 2)]
    deleted, refreshed = set(keys[::5]), set(keys[1::25])
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="other-worker")
    other = diskcache.Cache(str(tmp_path / "index" / "meta"))
    try:
        for key in keys:
            await md.set_negative(key, 30)
        listing = md.meta.iterkeys

        def listing_while_another_worker_writes() -> Iterator[Any]:
            for key in listing():
                if key[2:] in deleted:
                    worker.submit(other.delete, key).result()
                elif key[2:] in refreshed:
                    worker.submit(other.set, key, 5000.0).result()
                yield key  # listed, but no longer what the index holds

        monkeypatch.setattr(md.meta, "iterkeys", listing_while_another_worker_writes)
        assert await md.prune_expired(2000.0, keep_stale_for=0) == len(keys) - len(deleted) - len(refreshed)
        assert {k[2:] for k in stored_keys(tmp_path / "index")} == refreshed
    finally:
        worker.submit(other.close).result()
        worker.shutdown()
        await md.close()


async def test_prune_skips_a_pass_when_the_index_is_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    try:
        await md.set_negative("up|r|gone|anon", 30)
        transact = md.meta.transact

        def locked(*_args: Any) -> Any:
            raise diskcache.Timeout  # what diskcache raises when SQLite says "database is locked"

        monkeypatch.setattr(md.meta, "transact", locked)
        with caplog.at_level(logging.WARNING, "edgecache.metadata"):
            assert await md.prune_expired(2000.0, keep_stale_for=0) == 0
        assert "index prune stopped" in caplog.text
        monkeypatch.setattr(md.meta, "transact", transact)
        assert await md.prune_expired(2000.0, keep_stale_for=0) == 1  # the next pass does the work
    finally:
        await md.close()


async def test_the_app_prunes_with_the_largest_max_stale_of_the_live_upstream_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    clock.now = time.time() - 5000  # the records are written in the past; the app prunes at time.time()
    md = Metadata(tmp_path / "index", clock)
    await md.open()
    state, owner, tokens = AppState(), TaskOwner(), make_cache(None, "tokens")
    state.clients = {name: UpstreamClient(UpstreamConfig(name, f"https://{name}.example", max_stale=stale), tokens)
                     for name, stale in (("short", 600.0), ("long", 3600.0))}
    passes: list[float] = []
    one_pass = asyncio.Event()
    prune = md.prune_expired

    async def observed(now: float, keep_stale_for: float) -> int:
        removed = await prune(now, keep_stale_for)
        passes.append(keep_stale_for)
        one_pass.set()
        return removed

    try:
        await md.set_negative("up|r|gone|anon", 30.0)
        await md.set_visibility("up", "long-gone", "public", 30.0)  # expired ~5000s ago: past 3600
        await md.set_visibility("up", "stale", "public", 2000.0)  # expired ~3000s ago: inside 3600, not 600
        monkeypatch.setattr(md, "prune_expired", observed)
        owner.spawn(_prune_metadata(md, state, every=0), "prune-metadata")
        await asyncio.wait_for(one_pass.wait(), 10)
        await owner.close()
        assert passes[0] == 3600.0
        assert stored_keys(tmp_path / "index") == {"v|up|stale"}
    finally:
        await owner.close()
        await md.close()


async def test_prune_expires_timed_values(tmp_path: Path) -> None:
    """Scanner verdicts are stored with a diskcache expiry; with culling off only the prune removes them."""
    md = Metadata(tmp_path / "index")
    await md.open()
    try:
        await md.set_value("verdict-old", {"allow": True}, ttl=0.01)
        await md.set_value("verdict-new", {"allow": True}, ttl=3600)
        deadline = time.monotonic() + 5
        while await md.get_value("verdict-old") is not None:  # diskcache's own clock: wait for the expiry
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert "x|verdict-old" in stored_keys(tmp_path / "index")  # expired, but still stored
        assert await md.prune_expired(time.time(), keep_stale_for=0) == 1
        assert stored_keys(tmp_path / "index") & {"x|verdict-old", "x|verdict-new"} == {"x|verdict-new"}
    finally:
        await md.close()
