"""One upstream fetch per digest, streamed to every waiting client (issue: collapse).

Concurrency is gated with events: the tap holds the upstream response (or
pauses the body) until every client request has reached edgecache.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from edgecache.app import METRICS, STATE
from edgecache.oci import Digest
from tests.support.edge import Edge, EdgeFactory, start_workers
from tests.support.registry import RegistryProcess, free_port
from tests.support.tap import Tap

N = 50


async def wait_in_progress(edge: Edge, n: int, timeout: float = 10.0) -> None:
    """Poll edgecache's in-progress gauge until ``n`` requests are inside it (deadline, no fixed sleep)."""
    metrics = edge.app[METRICS]
    deadline = time.monotonic() + timeout
    while metrics.active < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {metrics.active} of {n} requests arrived")
        await asyncio.sleep(0.005)


class Client:
    """One client download: status, cache outcome, hash and when its first byte came."""

    def __init__(self) -> None:
        self.first_byte: float | None = None
        self.status = 0
        self.cache = ""
        self.digest = ""
        self.error: BaseException | None = None

    async def get(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
                  first_byte: asyncio.Event | None = None) -> Client:
        h = hashlib.sha256()
        try:
            async with http.get(url, headers=headers) as r:
                self.status, self.cache = r.status, r.headers.get("X-Cache", "")
                async for chunk in r.content.iter_any():
                    if self.first_byte is None:
                        self.first_byte = time.monotonic()
                        if first_byte is not None:
                            first_byte.set()
                    h.update(chunk)
            self.digest = "sha256:" + h.hexdigest()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.error = e
        return self


async def test_fifty_cold_clients_one_upstream_get(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess) -> None:
    # The tap pauses the body until all 50 clients have bytes: on a loaded machine that can outlast the
    # 5-s read timeout of the test config, and a resumed download would be a second (legitimate) GET.
    edge = await edge_factory(tap.url, read_timeout="60s")
    digest = registry.seeded.big_layer_digest
    size = len(registry.seeded.blobs[digest])
    url = f"{edge.url}/v2/team/big/blobs/{digest}"
    gate = tap.hold_first("blob", digest)
    pause = tap.pause_blob(digest, size // 2)  # the body stops half way until every client has bytes
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        clients = [Client() for _ in range(N)]
        firsts = [asyncio.Event() for _ in range(N)]
        tasks = [asyncio.ensure_future(c.get(http, url, first_byte=e)) for c, e in zip(clients, firsts)]
        await gate.wait_held(1)
        await wait_in_progress(edge, N)  # all 50 are waiting on the one flight
        gate.release()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 30)
        # every client has its first byte while the upstream body is still paused half way
        assert pause.held == 1
        flight = edge.app[STATE].flights.get(digest)  # type: ignore[union-attr]
        assert flight is not None and flight.written < size
        pause.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert all(c.error is None and c.status == 200 and c.digest == digest for c in clients)
    assert sorted({c.cache for c in clients}) == ["COLLAPSED", "MISS"]
    assert tap.count("GET", "blob", digest) == 1
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:  # later readers get the committed file
            assert r.headers["X-Cache"] == "HIT"
    assert tap.count("GET", "blob", digest) == 1


async def test_first_client_disconnect_does_not_stop_the_download(
        edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    url = f"{edge.url}/v2/team/big/blobs/{digest}"
    pause = tap.pause_blob(digest, 1 << 20)
    async with aiohttp.ClientSession() as http:
        resp = await http.get(url)
        await resp.content.readexactly(1000)
        resp.close()  # the first client goes away mid-stream
        pause.release()
        flight = edge.app[STATE].flights
        deadline = time.monotonic() + 30
        while flight is not None and flight.get(digest) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        async with http.get(url) as r:
            assert r.status == 200 and r.headers["X-Cache"] == "HIT"
            assert hashlib.sha256(await r.read()).hexdigest() == digest[7:]
    assert tap.count("GET", "blob", digest) == 1


async def test_cut_body_is_resumed_with_range(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    tap.cut_next_blob(digest, after_bytes=3 << 20)
    async with aiohttp.ClientSession() as http:
        clients = await asyncio.gather(*(Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}") for _ in range(5)))
    assert all(c.error is None and c.digest == digest for c in clients)
    gets = tap.find("GET", "blob", digest)
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    # resumed from the bytes that really arrived (the tap may lose its last buffered writes when it hangs up)
    resumed_from = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 3 << 20


async def test_cut_body_without_resume_fails_every_client(edge_factory: EdgeFactory, tap: Tap,
                                                          registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    tap.cut_next_blob(digest, after_bytes=1 << 20, times=10)  # the resumes are cut too
    async with aiohttp.ClientSession() as http:
        clients = await asyncio.gather(*(Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}") for _ in range(5)))
    assert all(c.error is not None or c.status != 200 for c in clients)  # nobody sees a body that looks whole
    store = edge.app[STATE].store
    assert store is not None and not store.path(Digest.parse(digest)).exists()
    async with aiohttp.ClientSession() as http:
        tap.reset()
        ok = await Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}")
    assert ok.error is None and ok.digest == digest


async def test_corrupt_byte_fails_all_clients_and_refetches(edge_factory: EdgeFactory, tap: Tap,
                                                            registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    tap.corrupt_next_blob(digest)
    gate = tap.hold_first("blob", digest)
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.ensure_future(Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}")) for _ in range(10)]
        await gate.wait_held(1)
        await wait_in_progress(edge, 10)
        gate.release()
        clients = await asyncio.gather(*tasks)
        assert all(c.error is not None for c in clients)
        again = await Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}")
    assert again.error is None and again.digest == digest
    assert tap.count("GET", "blob", digest) == 2


async def test_range_on_in_flight_blob(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    data = registry.seeded.blobs[digest]
    pause = tap.pause_blob(digest, 2 << 20)
    async with aiohttp.ClientSession() as http:
        first = asyncio.ensure_future(Client().get(http, f"{edge.url}/v2/team/big/blobs/{digest}"))
        await pause.wait_held(1)
        async with http.get(f"{edge.url}/v2/team/big/blobs/{digest}", headers={"Range": "bytes=100-199"}) as r:
            assert r.status == 206 and r.headers["X-Cache"] == "COLLAPSED"
            assert await r.read() == data[100:200]
        ranged = asyncio.ensure_future(http.get(f"{edge.url}/v2/team/big/blobs/{digest}",
                                                headers={"Range": f"bytes={len(data) - 10}-"}))
        pause.release()
        r = await ranged
        assert r.status == 206 and await r.read() == data[-10:]
        r.release()
        assert (await first).digest == digest
    assert tap.count("GET", "blob", digest) == 1


async def test_stale_tag_revalidation_is_collapsed(edge_factory: EdgeFactory, tap: Tap) -> None:
    edge = await edge_factory(tap.url, tag_ttl="1m")
    offset = [0.0]
    policy = edge.app[STATE].policy
    assert policy is not None
    policy.clock = lambda: time.time() + offset[0]
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    url = f"{edge.url}/v2/library/multi/manifests/v1"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=accept) as r:
            assert r.status == 200
        offset[0] = 120
        tap.reset()
        gate = tap.hold_first("manifest")
        tasks = [asyncio.ensure_future(http.get(url, headers=accept)) for _ in range(20)]
        await gate.wait_held(1)
        await wait_in_progress(edge, 20)
        gate.release()
        for r in await asyncio.gather(*tasks):
            assert r.status == 200
            r.release()
    assert tap.count("HEAD", "manifest") == 1 and tap.count("GET") == 0


@pytest.mark.slow
async def test_collapse_across_two_workers(tmp_path: Path, tap: Tap, registry: RegistryProcess) -> None:
    """workers = 2 share one port and one cache dir: still exactly one upstream GET."""
    proc, url = await start_workers(tmp_path, tap.url)
    try:
        digest = registry.seeded.big_layer_digest
        gate = tap.hold_first("blob", digest)
        # many connections, so the kernel spreads them over both workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            tasks = [asyncio.ensure_future(Client().get(http, f"{url}/v2/team/big/blobs/{digest}")) for _ in range(N)]
            await gate.wait_held(1)
            await asyncio.wait_for(tap.wait_requests(1, kind="blob"), 10)
            gate.release()
            clients = await asyncio.gather(*tasks)
        assert all(c.error is None and c.status == 200 and c.digest == digest for c in clients)
        assert tap.count("GET", "blob", digest) == 1
        from prometheus_client.parser import text_string_to_metric_families

        async def blob_200() -> float:
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "edgecache_requests_total" and s.labels.get("status") == "200"
                       and s.labels.get("route") == "/v2/{name}/blobs/{digest}")

        # /metrics sums both workers (whichever one answered the scrape); the other worker's
        # batched figures land within FLUSH_SECONDS
        deadline = time.monotonic() + 10
        while (served := await blob_200()) < N and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert served == N
    finally:
        await asyncio.get_running_loop().run_in_executor(None, proc.stop)
    lines = [orjson.loads(line) for line in (tmp_path / "edge.log").read_text().splitlines() if line.startswith("{")]
    served_by = {d["pid"] for d in lines if d.get("route") == "/v2/{name}/blobs/{digest}" and d.get("status") == 200}
    assert len(served_by) == 2  # both workers answered some of the 50 clients
    assert not any("Traceback" in str(d) for d in lines)
