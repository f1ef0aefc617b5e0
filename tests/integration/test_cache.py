"""The disk cache: hits without upstream, tag TTLs, stale serving, verification, LRU budget, restart."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import aiohttp
import pytest

from edgecache.app import STATE
from edgecache.routes import CTX
from tests.support.edge import Edge, EdgeFactory
from tests.support.registry import RegistryProcess
from tests.support.seed import move_tag, push_blob
from tests.support.tap import Tap

ACCEPT = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, */*"}


def shift_clock(edge: Edge) -> Callable[[float], None]:
    """Move the policy's clock forward (tag freshness) without sleeping."""
    offset = [0.0]
    policy = edge.app[STATE].policy
    assert policy is not None
    policy.clock = lambda: time.time() + offset[0]

    def advance(seconds: float) -> None:
        offset[0] += seconds

    return advance


async def pull(http: aiohttp.ClientSession, edge: Edge, repo: str, digests: list[str]) -> None:
    for d in digests:
        async with http.get(f"{edge.url}/v2/{repo}/blobs/{d}") as r:
            assert r.status == 200, d
            assert hashlib.sha256(await r.read()).hexdigest() == d[7:]


async def test_warm_pull_makes_no_upstream_blob_request(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                        http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    digests = [s.configs["amd64"], *s.layers["amd64"]]
    await pull(http, edge, "library/multi", digests)
    assert tap.count("GET", "blob") == len(digests)
    tap.reset()
    await pull(http, edge, "library/multi", digests)
    for d in digests:
        async with http.head(f"{edge.url}/v2/library/multi/blobs/{d}") as r:
            assert r.status == 200 and r.headers["X-Cache"] == "HIT"
    assert tap.count(kind="blob") == 0


async def test_tag_ttl_then_one_head(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                     http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url, tag_ttl="5m")
    advance = shift_clock(edge)
    url = f"{edge.url}/v2/library/multi/manifests/v1"
    async with http.get(url, headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    tap.reset()
    index = registry.seeded.index_bytes
    for _ in range(5):  # the first hit is decided by the policy, the next ones replayed (edge memo)
        async with http.get(url, headers=ACCEPT) as r:
            assert r.status == 200 and r.headers["X-Cache"] == "HIT" and await r.read() == index
            assert r.headers["Docker-Content-Digest"] == registry.seeded.index_digest
        async with http.head(url, headers=ACCEPT) as r:
            assert r.status == 200 and r.headers["X-Cache"] == "HIT" and await r.read() == b""
            assert r.headers["Content-Length"] == str(len(index))
    assert len(edge.app[CTX].router.answers) == 1
    assert tap.count() == 0  # fresh tag: zero upstream requests
    advance(301)
    async with http.get(url, headers=ACCEPT) as r:
        assert r.status == 200 and await r.read() == registry.seeded.index_bytes
    assert tap.count("HEAD", "manifest") == 1 and tap.count("GET") == 0  # unchanged: one HEAD, no GET
    async with http.get(url, headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"
    assert tap.count() == 1


async def test_moved_tag_is_followed_after_ttl(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                               http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url, tag_ttl="1m")
    advance = shift_clock(edge)
    url = f"{edge.url}/v2/team/moving/manifests/v1"
    async with aiohttp.ClientSession() as s:
        first = (await move_tag(s, registry.url, "team/moving", "v1", salt="a")).digest
    async with http.get(url, headers=ACCEPT) as r:
        assert r.headers["Docker-Content-Digest"] == first
    async with aiohttp.ClientSession() as s:
        second = (await move_tag(s, registry.url, "team/moving", "v1", salt="b")).digest
    async with http.get(url, headers=ACCEPT) as r:  # still fresh: the old answer
        assert r.headers["Docker-Content-Digest"] == first
    tap.reset()
    advance(61)
    async with http.get(url, headers=ACCEPT) as r:
        assert r.headers["Docker-Content-Digest"] == second
    assert tap.count("HEAD", "manifest") == 1 and tap.count("GET", "manifest") == 1


async def test_upstream_down_serves_cache_and_stale_tags(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                         http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url, tag_ttl="1m", max_stale="1h")
    advance = shift_clock(edge)
    s = registry.seeded
    amd64 = s.manifests["amd64"][0]
    async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200
    async with http.get(f"{edge.url}/v2/library/multi/manifests/{amd64}", headers=ACCEPT) as r:
        assert r.status == 200
    await pull(http, edge, "library/multi", list(s.layers["amd64"]))
    tap.set_down()
    advance(120)  # the tag is stale now
    async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "STALE"
        assert await r.read() == s.index_bytes
    async with http.get(f"{edge.url}/v2/library/multi/manifests/{amd64}", headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"
    await pull(http, edge, "library/multi", list(s.layers["amd64"]))
    async with http.get(f"{edge.url}/v2/library/multi/blobs/{s.layers['arm64'][0]}") as r:  # never cached
        assert r.status in (502, 503)
        assert (await r.json())["errors"][0]["code"] in ("UNAVAILABLE", "UPSTREAM_ERROR")
    advance(7200)  # past max_stale: no more stale answers
    async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
        assert r.status in (502, 503)


async def test_rate_limited_upstream_serves_stale(edge_factory: EdgeFactory, tap: Tap, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url, tag_ttl="1m", max_stale="1h")
    advance = shift_clock(edge)
    url = f"{edge.url}/v2/library/multi/manifests/latest"
    async with http.get(url, headers=ACCEPT) as r:
        assert r.status == 200
    advance(120)
    tap.status_next("manifest", 429, {"Retry-After": "3600"}, times=None)
    async with http.get(url, headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "STALE"
    async with http.get(f"{edge.url}/v2/library/multi/manifests/unknown-tag", headers=ACCEPT) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "3600"
        assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_corrupt_download_is_never_cached(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    url = f"{edge.url}/v2/team/big/blobs/{digest}"
    tap.corrupt_next_blob(digest)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as r:
            assert r.status == 200  # headers went out before the mismatch could be known
            await r.read()  # ... so the stream is cut before Content-Length
    store = edge.app[STATE].store
    assert store is not None
    from edgecache.oci import Digest

    assert not store.path(Digest.parse(digest)).exists()
    assert list(store.tmp.iterdir()) == []
    async with http.get(url) as r:  # the next request fetches again, and succeeds
        assert r.status == 200 and r.headers["X-Cache"] == "MISS"
        assert hashlib.sha256(await r.read()).hexdigest() == digest[7:]
    assert tap.count("GET", "blob", digest) == 2


async def test_lru_budget_with_big_blobs(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                         http: aiohttp.ClientSession) -> None:
    """Pull three times the budget: usage stays under it and the least recently used go first."""
    blob_size, budget = 1 << 20, 6 << 20
    digests = []
    async with aiohttp.ClientSession() as s:
        for i in range(18):
            digests.append(await push_blob(s, registry.url, "team/lru", os.urandom(blob_size - i)))
    edge = await edge_factory(tap.url, max_size=budget)
    store, metadata = edge.app[STATE].store, edge.app[STATE].metadata
    assert store is not None and metadata is not None
    keep = digests[0]
    for i, d in enumerate(digests):
        await pull(http, edge, "team/lru", [d])
        if i % 3 == 0:
            await pull(http, edge, "team/lru", [keep])  # keep the first one recently used
        assert await metadata.total_bytes() <= budget
        assert sum(f.stat().st_size for f in store.blobs.rglob("*") if f.is_file()) <= budget + blob_size
    from edgecache.oci import Digest

    present = [store.path(Digest.parse(d)).exists() for d in digests]
    assert present[0]  # recently used survives
    assert not any(present[1:6])  # least recently used are gone
    assert present[-1]
    assert sum(present) * blob_size <= budget + blob_size


async def test_restart_serves_from_cache_without_upstream(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                          http: aiohttp.ClientSession, tmp_path: object) -> None:
    from pathlib import Path

    cache = Path(str(tmp_path)) / "shared-cache"
    s = registry.seeded
    first = await edge_factory(tap.url, cache_dir=cache)
    amd64 = s.manifests["amd64"][0]
    async with http.get(f"{first.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200
    async with http.get(f"{first.url}/v2/library/multi/manifests/{amd64}", headers=ACCEPT) as r:
        assert r.status == 200
    await pull(http, first, "library/multi", [s.configs["amd64"], *s.layers["amd64"]])
    await first.stop()
    # a leftover partial from a "crash" must be cleaned up on start
    (cache / "tmp" / ("sha256-" + "e" * 64 + ".partial")).write_bytes(b"junk")
    tap.reset()
    second = await edge_factory(tap.url, cache_dir=cache)
    assert list((cache / "tmp").glob("*.partial")) == []
    async with http.get(f"{second.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT" and await r.read() == s.index_bytes
    async with http.get(f"{second.url}/v2/library/multi/manifests/{amd64}", headers=ACCEPT) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"
        assert r.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    await pull(http, second, "library/multi", [s.configs["amd64"], *s.layers["amd64"]])
    assert tap.count() == 0


async def test_blob_gone_from_disk_is_a_miss_not_a_404(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                       http: aiohttp.ClientSession) -> None:
    """Another worker's eviction (or ``edgecache purge``) unlinks a file this process still believes cached.
    A descriptor this process holds open keeps serving the verified bytes until the periodic sweep closes
    it; after that the next request fetches the blob again (one upstream GET) instead of answering 404."""
    from edgecache.oci import Digest

    edge = await edge_factory(tap.url)
    store = edge.app[STATE].store
    assert store is not None
    digest = registry.seeded.layers["amd64"][0]
    url = f"{edge.url}/v2/library/multi/blobs/{digest}"
    await pull(http, edge, "library/multi", [digest])
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"
    tap.reset()
    store.path(Digest.parse(digest)).unlink()  # behind the app's back, as another worker's evictor does
    async with http.get(url) as r:  # the open descriptor still reads the old (verified) inode
        assert r.status == 200 and r.headers["X-Cache"] == "HIT" and await r.read() == registry.seeded.blobs[digest]
    policy = edge.app[STATE].policy
    assert policy is not None
    assert policy.blobs.hot.sweep() == 1  # what the sweep task does every few seconds: the unlinked file is let go
    assert tap.count() == 0
    async with http.head(url) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(registry.seeded.blobs[digest])
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "MISS"
        assert await r.read() == registry.seeded.blobs[digest]
    assert tap.count("GET", "blob", digest) == 1
    assert store.path(Digest.parse(digest)).exists()  # cached again
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT" and await r.read() == registry.seeded.blobs[digest]
    assert tap.count("GET", "blob", digest) == 1
