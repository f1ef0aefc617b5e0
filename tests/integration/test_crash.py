"""Crashes: ``kill -9`` with a hundred cold downloads in flight, and a crash between commit and index.

After a restart over the same cache directory: no partial file is left, every
blob served hashes to its digest, and the index matches the files.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import time
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from edgecache.app import STATE
from edgecache.metadata import Metadata
from tests.conftest import RegistryFactory
from tests.support.edge import EdgeProcess, make_config, start_edge, write_config
from tests.support.registry import RegistryProcess, free_port
from tests.support.seed import push_blob
from tests.support.tap import Tap

BLOBS = 20
CLIENTS_PER_BLOB = 5
PAUSE_AT = 256 << 10


async def in_progress(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "edgecache_requests_in_progress")


async def index_and_files(cache: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(index entries: digest -> size, committed files: digest -> size), read after edgecache stopped."""
    meta = Metadata(cache / "index")
    await meta.open()
    try:
        entries = await asyncio.get_running_loop().run_in_executor(
            None, lambda: {k: int(meta.entries[k]["size"]) for k in meta.entries.iterkeys()})
    finally:
        await meta.close()
        gc.collect()  # Metadata.close leaves other threads' SQLite connections to the GC (see test_faults)
    files = {f"{p.parent.parent.name}:{p.name}": p.stat().st_size
             for p in (cache / "blobs").glob("*/*/*") if p.is_file()}
    return entries, files


def hash_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def log_problems(log_file: Path) -> list[str]:
    """Error lines and tracebacks in edgecache's JSON log (the lines before a kill -9 included)."""
    bad = []
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append(line[:300])  # not JSON: a raw traceback or a crash message
            continue
        if doc.get("level") in ("error", "critical") or "Traceback" in str(doc.get("error", "")):
            bad.append(line[:500])
    return bad


async def test_kill9_with_a_hundred_downloads_in_flight(registry_factory: RegistryFactory, tmp_path: Path) -> None:
    registry: RegistryProcess = await asyncio.get_running_loop().run_in_executor(None, registry_factory)
    blobs: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as s:
        for i in range(BLOBS):
            data = random.Random(i).randbytes((1 << 20) + i * (150 << 10))  # 1 MiB .. ~3.8 MiB
            blobs[await push_blob(s, registry.url, "crash/app", data)] = data
    cache = tmp_path / "cache"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    async with Tap(registry.url) as tap:
        cfg = write_config(tmp_path, tap.url, port, cache=cache, shutdown_timeout="5s")
        first = EdgeProcess(cfg, tmp_path / "edge1.log")
        await loop.run_in_executor(None, first.start, url)
        pauses = {d: tap.pause_blob(d, PAUSE_AT) for d in blobs}
        results: list[BaseException | tuple[int, bytes]] = []
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                async def download(d: str) -> tuple[int, bytes]:
                    async with http.get(f"{url}/v2/crash/app/blobs/{d}") as r:
                        return r.status, await r.read()

                tasks = [asyncio.ensure_future(download(d)) for d in blobs for _ in range(CLIENTS_PER_BLOB)]
                # every body is paused mid-way upstream, and all 100 clients are inside edgecache
                for gate in pauses.values():
                    await gate.wait_held(1, timeout=30)
                deadline = time.monotonic() + 30
                while await in_progress(http, url) < BLOBS * CLIENTS_PER_BLOB + 1:  # + this /metrics request
                    assert time.monotonic() < deadline, "the 100 downloads never were all in flight"
                    await asyncio.sleep(0.05)
                while len(list((cache / "tmp").glob("*.partial"))) < BLOBS:  # one fill per digest, each mid-way
                    assert time.monotonic() < deadline, "not every download had started its partial file"
                    await asyncio.sleep(0.02)
                assert tap.count("GET", "blob") == BLOBS
                first.kill9()
                results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for gate in pauses.values():
                gate.release()
            first.stop()
        # no client saw a body that looks complete: a cut stream, never a short or wrong 200
        for r in results:
            if isinstance(r, tuple):
                status, body = r
                raise AssertionError(f"a client got a whole answer from a killed edgecache: {status}, {len(body)} bytes")
            assert isinstance(r, (aiohttp.ClientError, asyncio.TimeoutError)), repr(r)
        assert list((cache / "tmp").glob("*.partial")), "the crash should have left partial files to clean up"

        tap.reset()
        second = EdgeProcess(cfg, tmp_path / "edge2.log")
        await loop.run_in_executor(None, second.start, url)
        try:
            leftovers = sorted(p.name for p in (cache / "tmp").iterdir())
            assert not [n for n in leftovers if n.endswith((".partial", ".json"))], leftovers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                async def fetch(d: str) -> tuple[str, int, str, str]:
                    async with http.get(f"{url}/v2/crash/app/blobs/{d}") as r:
                        body = await r.read()
                        return d, r.status, r.headers.get("X-Cache", ""), "sha256:" + hashlib.sha256(body).hexdigest()

                for d, status, cache_outcome, got in await asyncio.gather(*(fetch(d) for d in blobs)):
                    assert status == 200 and got == d, (d, status, got)
                    assert cache_outcome == "MISS"  # nothing half-done was kept
                for d, status, cache_outcome, got in await asyncio.gather(*(fetch(d) for d in blobs)):
                    assert status == 200 and got == d and cache_outcome == "HIT", (d, status, cache_outcome, got)
            assert tap.count("GET", "blob") == BLOBS
        finally:
            assert await loop.run_in_executor(None, second.stop) == 0
    entries, files = await index_and_files(cache)
    assert entries == files, "the index does not match the committed files"
    assert set(files) == set(blobs)
    for d in files:
        assert hash_file(cache / "blobs" / "sha256" / d[7:9] / d[7:]) == d
    assert list((cache / "tmp").glob("*.partial")) == []
    assert log_problems(tmp_path / "edge2.log") == []


async def test_crash_between_commit_and_index(registry: RegistryProcess, tmp_path: Path) -> None:
    """Committed files the index never heard of: a verified one is adopted, a corrupt one removed and refetched."""
    s = registry.seeded
    good, corrupt = s.layers["amd64"][0], s.layers["amd64"][1]
    unlinked = s.configs["amd64"]  # a verified file with neither entry nor link (e.g. copied in by hand)
    cache = tmp_path / "cache"
    async with Tap(registry.url) as tap:
        edge = await start_edge(make_config(cache, tap.url))
        try:
            async with aiohttp.ClientSession() as http:
                for d in (good, corrupt):  # pulled once: links and entries exist, files committed
                    async with http.get(f"{edge.url}/v2/library/multi/blobs/{d}") as r:
                        assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == d[7:]
        finally:
            await edge.stop()
        # the "crash": both files were committed but their index entries never written,
        # and the second file is torn (its bytes no longer hash to its name)
        meta = Metadata(cache / "index")
        await meta.open()
        for d in (good, corrupt):
            await meta.drop_entry(d)
        await meta.close()
        gc.collect()
        corrupt_path = cache / "blobs" / "sha256" / corrupt[7:9] / corrupt[7:]
        corrupt_path.write_bytes(s.blobs[corrupt][: len(s.blobs[corrupt]) // 2] + b"\0torn")
        unlinked_path = cache / "blobs" / "sha256" / unlinked[7:9] / unlinked[7:]
        unlinked_path.parent.mkdir(parents=True, exist_ok=True)
        unlinked_path.write_bytes(s.blobs[unlinked])
        tap.reset()

        edge = await start_edge(make_config(cache, tap.url))  # the restart reconciles index and files
        try:
            assert not corrupt_path.exists(), "the corrupt file was kept"
            metadata = edge.app[STATE].metadata
            assert metadata is not None
            assert (await metadata.get_entry(good)) is not None and (await metadata.get_entry(corrupt)) is None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{edge.url}/v2/library/multi/blobs/{good}") as r:
                    assert r.status == 200 and r.headers["X-Cache"] == "HIT"
                    assert hashlib.sha256(await r.read()).hexdigest() == good[7:]
                assert tap.count() == 0  # adopted and served with no upstream request at all
                async with http.get(f"{edge.url}/v2/library/multi/blobs/{unlinked}") as r:
                    assert r.status == 200 and r.headers["X-Cache"] == "HIT"
                    assert hashlib.sha256(await r.read()).hexdigest() == unlinked[7:]
                assert tap.count("GET") == 0  # no link yet: at most a HEAD to check the repository, never a GET
                async with http.get(f"{edge.url}/v2/library/multi/blobs/{corrupt}") as r:
                    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
                    assert hashlib.sha256(await r.read()).hexdigest() == corrupt[7:]
                assert tap.count("GET", "blob", corrupt) == 1
        finally:
            await edge.stop()
    entries, files = await index_and_files(cache)
    assert entries == files
    for d in files:
        assert hash_file(cache / "blobs" / "sha256" / d[7:9] / d[7:]) == d
