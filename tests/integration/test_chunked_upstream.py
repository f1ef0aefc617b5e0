"""An upstream that sends blobs without Content-Length (chunked): collapse still works, in one process
and across workers (remote followers wait for the verified file instead of guessing a length).

The fake upstream speaks the real protocol for the one thing a real registry here never does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.edge import EdgeFactory, start_workers
from tests.support.registry import free_port

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class ChunkedUpstream:
    def __init__(self) -> None:
        self.gets = 0
        self.release = asyncio.Event()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def blob(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["digest"] != DIGEST:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Docker-Content-Digest": DIGEST})
        self.gets += 1
        resp = web.StreamResponse(headers={"Docker-Content-Digest": DIGEST, "Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(BLOB[: 1 << 20])
        await self.release.wait()  # the rest once the test has its clients attached
        for i in range(1 << 20, len(BLOB), 256 << 10):
            await resp.write(BLOB[i:i + (256 << 10)])
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        async def ping(request: web.Request) -> web.Response:
            return web.json_response({})

        app.router.add_get("/v2/", ping)
        app.router.add_route("*", "/v2/chunky/blobs/{digest}", self.blob)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[ChunkedUpstream]:
    u = ChunkedUpstream()
    await u.start()
    yield u
    u.release.set()
    assert u.runner is not None
    await u.runner.cleanup()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as r:
        return r.status, "sha256:" + hashlib.sha256(await r.read()).hexdigest()


async def test_chunked_upstream_in_one_process(edge_factory: EdgeFactory, upstream: ChunkedUpstream) -> None:
    edge = await edge_factory(upstream.url)
    url = f"{edge.url}/v2/chunky/blobs/{DIGEST}"
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.ensure_future(get(http, url)) for _ in range(5)]
        deadline = time.monotonic() + 10
        while upstream.gets < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        upstream.release.set()
        assert all(r == (200, DIGEST) for r in await asyncio.gather(*tasks))
        async with http.get(url) as r:
            assert r.headers["X-Cache"] == "HIT" and r.headers["Content-Length"] == str(len(BLOB))
    assert upstream.gets == 1


async def test_chunked_upstream_across_workers(tmp_path: Path, upstream: ChunkedUpstream) -> None:
    proc, url = await start_workers(tmp_path, upstream.url)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            tasks = [asyncio.ensure_future(get(http, f"{url}/v2/chunky/blobs/{DIGEST}")) for _ in range(20)]
            deadline = time.monotonic() + 10
            while upstream.gets < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            while True:  # all 20 inside edgecache (both workers; /metrics sums them; +1 for the scrape)
                assert time.monotonic() < deadline, "requests did not arrive"
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                line = next(x for x in text.splitlines() if x.startswith("edgecache_requests_in_progress "))
                if float(line.split()[1]) >= 21:
                    break
                await asyncio.sleep(0.02)
            upstream.release.set()
            results = await asyncio.gather(*tasks)
        assert all(r == (200, DIGEST) for r in results), results
        assert upstream.gets == 1
    finally:
        proc.stop()
