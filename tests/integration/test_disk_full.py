"""A full cache disk (a small tmpfs mounted by the test): clients still get their downloads, nothing
half-written is committed, eviction frees space, /readyz reports it, hits keep being served."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from edgecache.app import STATE
from edgecache.oci import Digest
from tests.support.edge import EdgeFactory
from tests.support.registry import RegistryProcess
from tests.support.seed import push_blob
from tests.support.tap import Tap

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A 20 MiB tmpfs (tests run as root here, as in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = 20 * MiB
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt, size
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with http.get(url) as r:
        body = await r.read()
        return r.status, r.headers.get("X-Cache", ""), "sha256:" + hashlib.sha256(body).hexdigest()


async def seed(registry: RegistryProcess, repo: str, sizes: list[int]) -> list[str]:
    rnd = random.Random(repo)
    async with aiohttp.ClientSession() as s:
        return [await push_blob(s, registry.url, repo, rnd.randbytes(n)) for n in sizes]


async def test_eviction_frees_space_for_a_download(small_disk: tuple[Path, int], edge_factory: EdgeFactory,
                                                   tap: Tap, registry: RegistryProcess) -> None:
    mnt, _ = small_disk
    old = await seed(registry, "team/diskfull-a", [5 * MiB, 5 * MiB, 5 * MiB])
    (big,) = await seed(registry, "team/diskfull-a", [9 * MiB])
    edge = await edge_factory(tap.url, cache_dir=mnt / "cache", max_size="1GiB")  # the disk, not the budget, runs out
    url = f"{edge.url}/v2/team/diskfull-a/blobs/"
    async with aiohttp.ClientSession() as http:
        for d in old:
            assert (await fetch(http, url + d))[0] == 200
        assert (await fetch(http, url + old[2]))[1] == "HIT"  # the most recently used
        results = await asyncio.gather(*(fetch(http, url + big) for _ in range(3)))
        assert all(status == 200 and digest == big for status, _, digest in results)
        assert (await fetch(http, url + big))[1] == "HIT"  # it was committed after eviction made room
        store = edge.app[STATE].store
        assert store is not None
        assert not store.path(Digest.parse(old[0])).exists()  # least recently used went first
        assert (await fetch(http, url + old[2]))[1] == "HIT"  # hits keep being served
    assert list((mnt / "cache" / "tmp").glob("*.partial")) == []


async def test_full_disk_serves_straight_through(small_disk: tuple[Path, int], edge_factory: EdgeFactory,
                                                 tap: Tap, registry: RegistryProcess) -> None:
    mnt, _ = small_disk
    (blob,) = await seed(registry, "team/diskfull-b", [6 * MiB])
    edge = await edge_factory(tap.url, cache_dir=mnt / "cache", max_size="1GiB")
    st = os.statvfs(mnt)
    filler = mnt / "filler"  # not ours to evict: the disk is really full
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 1 * MiB))
    url = f"{edge.url}/v2/team/diskfull-b/blobs/{blob}"
    pause = tap.pause_blob(blob, 3 * MiB)
    async with aiohttp.ClientSession() as http:
        early = [asyncio.ensure_future(fetch(http, url)) for _ in range(3)]
        await pause.wait_held(1)
        flights = edge.app[STATE].flights
        assert flights is not None
        deadline = time.monotonic() + 10
        while not flights.spilled(blob):  # the fill hit the full disk and now runs from memory
            assert time.monotonic() < deadline, "the fill never reported the full disk"
            await asyncio.sleep(0.01)
        async with http.get(edge.url + "/readyz") as r:
            assert r.status == 503 and any("disk full" in p for p in (await r.json())["problems"])
        late = asyncio.ensure_future(fetch(http, url))  # joins after the spill: relayed straight through
        await tap.wait_requests(2, kind="blob", method="GET")
        pause.release()
        for status, cache, digest in [*await asyncio.gather(*early), await late]:
            assert status == 200 and digest == blob  # every client got the whole, correct blob
        store = edge.app[STATE].store
        assert store is not None and not store.path(Digest.parse(blob)).exists()  # nothing half-written kept
        assert list((mnt / "cache" / "tmp").glob("*.partial")) == []
        filler.unlink()
        async with http.get(edge.url + "/readyz") as r:
            assert r.status == 200
        assert (await fetch(http, url))[1] == "MISS"
        assert (await fetch(http, url))[1] == "HIT"  # with room again, it is cached as usual
