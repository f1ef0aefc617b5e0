"""Upstream faults: each maps to its documented client-visible result, and leaks nothing.

For every fault the test takes a baseline of this process (open file
descriptors, asyncio tasks) before anything is started, provokes the fault
through a real edgecache (in-process) in front of a tap or a fake upstream,
checks what the client saw, checks edgecache's own state settled (background
tasks back to the startup set, no flight, no partial file, nothing half
cached), then stops everything and checks the process is back to the baseline.
Pooled keep-alive connections are why the descriptor comparison is made after
the edge, the tap and the client session are stopped: then the count must be
exactly the baseline again.

Documented results (README / DESIGN): upstream unreachable -> 503 UNAVAILABLE,
upstream 5xx -> 502 UPSTREAM_ERROR, 429 -> 429 TOOMANYREQUESTS with
Retry-After when nothing stale can be served, a failed or corrupt fill -> the
client's stream is cut (aiohttp raises ClientPayloadError) and nothing is cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from edgecache.app import METRICS, STATE, TASKS
from edgecache.oci import Digest
from tests.support.edge import Edge, make_config, self_signed_cert, start_edge
from tests.support.registry import RegistryProcess
from tests.support.tap import Tap

ACCEPT = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"}
# what edgecache's TaskOwner holds when idle
STARTUP_TASKS = ["flush-metrics", "flush-touches", "prune-metadata", "sweep-hot-files"]


# -- leak accounting ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    tasks: int

    @classmethod
    def now(cls) -> Usage:
        return cls(psutil.Process().num_fds(), len(asyncio.all_tasks()))

    def within(self, base: Usage) -> bool:
        """No more than the baseline (fewer is fine: the collector may free other tests' leftovers)."""
        return self.fds <= base.fds and self.tasks <= base.tasks


async def poll(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Poll ``check`` until true, with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout}s: {what()}")
        await asyncio.sleep(delay)
        delay = min(0.05, delay * 2)


def open_paths() -> set[str]:
    return {f.path for f in psutil.Process().open_files()}


async def assert_back_to(base: Usage, timeout: float = 5.0) -> None:
    """Everything was stopped: descriptors and asyncio tasks are exactly the baseline again.

    One known leak is tolerated here (and asserted on its own in
    :func:`test_stopping_the_edge_closes_every_index_descriptor`): ``Metadata.close`` closes
    only one executor thread's SQLite connections, the others stay open until the garbage
    collector breaks their cycles. So if the count is not back, the only files still open may
    be the index's, and after ``gc.collect()`` everything must be back. Sockets are never
    excused (and one freed only by the collector would raise a ResourceWarning, an error here).
    """
    def describe() -> str:
        proc = psutil.Process()
        tasks = [t.get_name() + ":" + repr(t.get_coro())[:80] for t in asyncio.all_tasks()]
        return (f"baseline {base}, now {Usage.now()}; open files {sorted(open_paths())}; "
                f"sockets {[(c.laddr, c.raddr, c.status) for c in proc.net_connections()]}; tasks {tasks}")

    try:
        await poll(lambda: Usage.now().within(base), 1.0, describe)
        return
    except AssertionError:
        pass
    extra = {p for p in open_paths() if "/index/" in p}
    not_index = Usage.now().fds - base.fds - len([f for f in psutil.Process().open_files() if f.path in extra])
    gc.collect()
    await poll(lambda: Usage.now().within(base), timeout, describe)
    assert not_index <= 0, f"{not_index} descriptors besides the index's were freed only by the garbage collector"


async def assert_edge_settled(edge: Edge, timeout: float = 10.0) -> None:
    """edgecache's own state is idle: startup tasks only, no flight, no partial file, nothing in progress."""
    state, tasks, metrics = edge.app[STATE], edge.app[TASKS], edge.app[METRICS]
    assert state.store is not None and state.flights is not None and state.policy is not None

    def ok() -> bool:
        names = sorted(t.get_name() for t in tasks.pending())
        return (names == STARTUP_TASKS and len(tasks) == len(STARTUP_TASKS) and len(state.flights) == 0  # type: ignore[arg-type]
                and not any(state.store.tmp.iterdir())  # type: ignore[union-attr]
                and metrics.active == 0
                and metrics.flights._value.get() == 0  # noqa: SLF001
                and state.policy is not None and not state.policy.blobs._starting)  # noqa: SLF001 - per-digest start locks must not pile up

    def describe() -> str:
        return (f"tasks {sorted(t.get_name() for t in tasks.pending())}, flights {len(state.flights or [])}, "
                f"tmp {sorted(p.name for p in state.store.tmp.iterdir())}, "  # type: ignore[union-attr]
                f"in_progress {metrics.active}, flights gauge {metrics.flights._value.get()}, "  # noqa: SLF001
                f"start locks {list(state.policy.blobs._starting)}")  # type: ignore[union-attr]  # noqa: SLF001

    await poll(ok, timeout, describe)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ERROR records with a traceback; the tap's own deliberate hang-ups are not edgecache's."""
    found = []
    for r in caplog.records:
        if r.levelno < logging.ERROR or not r.exc_info:
            continue
        exc = r.exc_info[1]
        if isinstance(exc, ConnectionResetError) and str(exc).startswith("tap:"):
            continue  # the tap raising in its own handler to drop a connection on purpose
        found.append(r)
    return found


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = tracebacks(caplog)
    assert bad == [], "\n".join(f"{r.name}: {r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"  # type: ignore[arg-type]
                                for r in bad)


# -- edge, client, blobs ----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_edge(upstream_url: str, cache_dir: Path, **upstream: Any) -> AsyncIterator[Edge]:
    edge = await start_edge(make_config(cache_dir, upstream_url, **upstream))
    try:
        await assert_edge_settled(edge)  # the startup eviction pass has finished
        yield edge
    finally:
        await edge.stop()


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield http


async def get_blob(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as r:
        return r.status, r.headers.get("X-Cache", ""), await r.read()


def assert_not_cached(edge: Edge, digest: str) -> None:
    store = edge.app[STATE].store
    assert store is not None
    assert not store.path(Digest.parse(digest)).exists(), f"{digest} was cached after a failed fill"
    assert list(store.tmp.iterdir()) == []


async def assert_oci_error(r: aiohttp.ClientResponse, status: int, *codes: str) -> dict[str, Any]:
    body = await r.read()
    assert r.status == status, (r.status, body[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    doc = await r.json()
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], doc
    err: dict[str, Any] = doc["errors"][0]
    assert err["code"] in codes, doc
    assert isinstance(err.get("message"), str) and err["message"], doc
    return err


# -- resets mid-body ------------------------------------------------------------------------------------------------


async def test_reset_mid_body_is_resumed_with_range(registry: RegistryProcess, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    base = Usage.now()
    digest = registry.seeded.big_layer_digest
    cut_at = 3 << 20
    async with Tap(registry.url) as tap, running_edge(tap.url, tmp_path / "c") as edge, client() as http:
        tap.cut_next_blob(digest, after_bytes=cut_at)
        status, cache, body = await get_blob(http, f"{edge.url}/v2/team/big/blobs/{digest}")
        assert status == 200 and cache == "MISS"
        assert hashlib.sha256(body).hexdigest() == digest[7:]
        gets = tap.find("GET", "blob", digest)
        assert len(gets) == 2
        assert "Range" not in gets[0].headers
        # resumed from what actually arrived: the tap's hang-up may drop some of its last buffered writes
        resumed_from = int(gets[1].headers["Range"].removeprefix("bytes=").removesuffix("-"))
        assert gets[1].headers["Range"] == f"bytes={resumed_from}-" and 0 < resumed_from <= cut_at
        await assert_edge_settled(edge)
        status, cache, body = await get_blob(http, f"{edge.url}/v2/team/big/blobs/{digest}")
        assert status == 200 and cache == "HIT" and hashlib.sha256(body).hexdigest() == digest[7:]
        assert tap.count("GET", "blob", digest) == 2
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


async def test_reset_on_every_resume_cuts_the_client_and_caches_nothing(
        registry: RegistryProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = Usage.now()
    digest = registry.seeded.big_layer_digest
    async with Tap(registry.url) as tap, running_edge(tap.url, tmp_path / "c") as edge, client() as http:
        tap.cut_next_blob(digest, after_bytes=1 << 20, times=None)  # type: ignore[arg-type]  # every GET is cut
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(f"{edge.url}/v2/team/big/blobs/{digest}") as r:
                assert r.status == 200  # headers went out before the failure could be known
                await r.read()
        await assert_edge_settled(edge)
        assert_not_cached(edge, digest)
        assert await edge.app[STATE].metadata.get_entry(digest) is None  # type: ignore[union-attr]
        cut = tap.count("GET", "blob", digest)
        assert cut == 4  # the first GET and MAX_RESUMES (3) resumes, each cut
        tap.reset()  # healthy again: the next request fetches afresh
        status, cache, body = await get_blob(http, f"{edge.url}/v2/team/big/blobs/{digest}")
        assert status == 200 and cache == "MISS" and hashlib.sha256(body).hexdigest() == digest[7:]
        assert tap.count("GET", "blob", digest) == 1
        await assert_edge_settled(edge)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- stalls past the read timeout -------------------------------------------------------------------------------------


class StallingUpstream:
    """A minimal registry serving one blob, that can stall after the headers or part of the body.

    ``mode``: ``"body"`` sends headers and ``stall_at`` bytes then stalls; ``"headers"`` reads the
    request and never answers; ``"healthy"`` serves the blob. A Range request while stalling is
    answered 200 with the whole body (no resume support), so the edge gives up at once.
    """

    def __init__(self, blob: bytes, repo: str, stall_at: int) -> None:
        self.blob, self.digest, self.stall_at = blob, "sha256:" + hashlib.sha256(blob).hexdigest(), stall_at
        self.path = f"/v2/{repo}/blobs/{self.digest}"
        self.mode = "body"
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.stalled = asyncio.Event()
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> StallingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        # released handlers return by themselves (cancelling them makes asyncio's streams log an error)
        async with asyncio.timeout(5):
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *rest = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
                self.requests.append((method, path, headers))
                if path != self.path:
                    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                if self.mode == "headers":
                    self.stalled.set()
                    await self._release.wait()
                    return
                hdr = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                       b"Docker-Content-Digest: %s\r\nContent-Length: %d\r\n\r\n"
                       % (self.digest.encode(), len(self.blob)))
                if self.mode == "body" and "range" not in headers:
                    writer.write(hdr + self.blob[:self.stall_at])
                    await writer.drain()
                    self.stalled.set()
                    await self._release.wait()
                    return
                writer.write(hdr + (b"" if method == "HEAD" else self.blob))
                await writer.drain()
        finally:
            writer.close()
            self._handlers.discard(task)


@pytest.mark.parametrize("where", ["body", "headers"])
async def test_stall_past_read_timeout(where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stalled upstream is given up after read_timeout; nothing is cached; a healthy upstream is used next."""
    base = Usage.now()
    blob = hashlib.sha256(b"stall").digest() * (1 << 15)  # 1 MiB
    async with StallingUpstream(blob, "team/stall", stall_at=300_000) as up, \
            running_edge(up.url, tmp_path / "c", read_timeout="1s", retries=0) as edge, client() as http:
        up.mode = where
        url = f"{edge.url}/v2/team/stall/blobs/{up.digest}"
        started = time.monotonic()
        if where == "body":
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(url) as r:
                    assert r.status == 200
                    got = await r.content.readexactly(1000)  # bytes flow before the stall ...
                    assert got == blob[:1000]
                    await r.read()  # ... then the stream is cut
        else:
            async with http.get(url) as r:
                err = await assert_oci_error(r, 503, "UNAVAILABLE")
                assert err.get("detail", {}).get("upstream") == "up", err
        elapsed = time.monotonic() - started
        assert up.stalled.is_set()
        assert 0.9 <= elapsed < 5, f"read_timeout=1s but the client waited {elapsed:.2f}s"
        await assert_edge_settled(edge)
        assert_not_cached(edge, up.digest)
        assert await edge.app[STATE].metadata.get_entry(up.digest) is None  # type: ignore[union-attr]
        seen = len(up.requests)
        up.mode = "healthy"
        status, cache, body = await get_blob(http, url)
        assert status == 200 and cache == "MISS" and body == blob
        assert len(up.requests) == seen + 1  # refetched, not served from a half-filled cache
        status, cache, body = await get_blob(http, url)
        assert status == 200 and cache == "HIT" and body == blob
        await assert_edge_settled(edge)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- 5xx bursts ---------------------------------------------------------------------------------------------------------

RETRIES = 2


@pytest.mark.parametrize("burst", [RETRIES, RETRIES + 1])
async def test_5xx_burst(burst: int, registry: RegistryProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A burst of 503s no longer than ``retries`` is retried away; a longer one is 502 UPSTREAM_ERROR."""
    base = Usage.now()
    s = registry.seeded
    digest = s.layers["amd64"][0]
    async with Tap(registry.url) as tap, running_edge(tap.url, tmp_path / "c", retries=RETRIES) as edge, \
            client() as http:
        blob_url = f"{edge.url}/v2/library/multi/blobs/{digest}"
        manifest_url = f"{edge.url}/v2/library/multi/manifests/v1"
        tap.status_next("blob", 503, times=burst, digest=digest)
        tap.status_next("manifest", 503, times=burst)
        if burst <= RETRIES:
            status, cache, body = await get_blob(http, blob_url)
            assert status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
            async with http.get(manifest_url, headers=ACCEPT) as r:
                assert r.status == 200 and await r.read() == s.index_bytes
        else:
            async with http.get(blob_url) as r:
                err = await assert_oci_error(r, 502, "UPSTREAM_ERROR")
                assert "503" in err["message"] and err["detail"]["upstream"] == "up", err
            async with http.get(manifest_url, headers=ACCEPT) as r:
                err = await assert_oci_error(r, 502, "UPSTREAM_ERROR")
                assert err["detail"]["upstream"] == "up", err
            await assert_edge_settled(edge)
            assert_not_cached(edge, digest)
            # the burst is over: the next request succeeds from upstream
            status, cache, body = await get_blob(http, blob_url)
            assert status == 200 and cache == "MISS" and hashlib.sha256(body).hexdigest() == digest[7:]
        assert tap.count("GET", "blob", digest) == (RETRIES + 1 if burst <= RETRIES else RETRIES + 2)
        assert tap.count("GET", "blob", digest, status=503) == burst
        await assert_edge_settled(edge)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- 429 -------------------------------------------------------------------------------------------------------------------


async def test_429_is_passed_on_with_retry_after(registry: RegistryProcess, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    base = Usage.now()
    s = registry.seeded
    digest = s.layers["arm64"][0]
    async with Tap(registry.url) as tap, running_edge(tap.url, tmp_path / "c", retries=2) as edge, client() as http:
        # nothing cached, nothing stale: the client gets the 429 and when to come back (not retried: too long)
        tap.status_next("manifest", 429, {"Retry-After": "3600"})
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            await assert_oci_error(r, 429, "TOOMANYREQUESTS")
            assert r.headers["Retry-After"] == "3600"
        assert tap.count("GET", "manifest") == 1
        tap.status_next("blob", 429, {"Retry-After": "120"}, digest=digest)
        async with http.get(f"{edge.url}/v2/library/multi/blobs/{digest}") as r:
            await assert_oci_error(r, 429, "TOOMANYREQUESTS")
            assert r.headers["Retry-After"] == "120"
        assert tap.count("GET", "blob", digest) == 1
        await assert_edge_settled(edge)
        assert_not_cached(edge, digest)
        # a short Retry-After is waited out once and the request succeeds
        tap.status_next("blob", 429, {"Retry-After": "0"}, digest=digest)
        status, cache, body = await get_blob(http, f"{edge.url}/v2/library/multi/blobs/{digest}")
        assert status == 200 and cache == "MISS" and hashlib.sha256(body).hexdigest() == digest[7:]
        assert tap.count("GET", "blob", digest) == 3
        await assert_edge_settled(edge)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- DNS failure -------------------------------------------------------------------------------------------------------------


async def test_dns_failure_is_a_fast_503_naming_the_upstream(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = Usage.now()
    digest = "sha256:" + "ab" * 32
    async with running_edge("http://does-not-exist.invalid:5000", tmp_path / "c", name="nowhere", retries=1) as edge, \
            client() as http:
        for path, headers in ((f"/v2/library/x/manifests/latest", ACCEPT), (f"/v2/library/x/blobs/{digest}", {}),
                              ("/v2/library/x/tags/list", {}), (f"/v2/library/x/manifests/{digest}", ACCEPT)):
            started = time.monotonic()
            async with http.get(edge.url + path, headers=headers) as r:
                err = await assert_oci_error(r, 503, "UNAVAILABLE")
            elapsed = time.monotonic() - started
            assert elapsed < 3, f"{path}: DNS failure took {elapsed:.2f}s"
            assert "nowhere" in err["message"] and err["detail"]["upstream"] == "nowhere", err
            async with http.head(edge.url + path, headers=headers) as r:
                assert r.status == 503 and r.headers["Content-Type"].startswith("application/json")
        await assert_edge_settled(edge)
        assert_not_cached(edge, digest)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- TLS errors ----------------------------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    cert_file, key_file = self_signed_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@contextlib.asynccontextmanager
async def untrusted_tls_registry(tmp_path: Path) -> AsyncIterator[tuple[str, list[Any]]]:
    """An https server with a self-signed certificate edgecache does not trust; yields (url, paths seen)."""
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed(tmp_path))
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", ["https-to-plain-http", "untrusted-certificate"])
async def test_tls_errors_are_clear_oci_errors(case: str, tmp_path: Path, registry: RegistryProcess,
                                               caplog: pytest.LogCaptureFixture) -> None:
    base = Usage.now()
    digest = registry.seeded.layers["amd64"][0]
    async with contextlib.AsyncExitStack() as stack:
        if case == "https-to-plain-http":
            tap = await stack.enter_async_context(Tap(registry.url))
            url, seen = "https://" + tap.host, tap.records
        else:
            url, seen = await stack.enter_async_context(untrusted_tls_registry(tmp_path))
        edge = await stack.enter_async_context(running_edge(url, tmp_path / "c", retries=1))
        http = await stack.enter_async_context(client())
        for path, headers in ((f"/v2/library/multi/blobs/{digest}", {}), ("/v2/library/multi/manifests/v1", ACCEPT)):
            started = time.monotonic()
            async with http.get(edge.url + path, headers=headers) as r:
                err = await assert_oci_error(r, 503, "UNAVAILABLE", "UPSTREAM_ERROR")
            assert time.monotonic() - started < 5
            assert err["detail"]["upstream"] == "up", err
            # the message says what went wrong: a TLS/SSL failure, not a generic one
            assert any(word in err["message"] for word in ("SSL", "Certificate", "TLS")), err
        assert seen == []  # no request ever got through the failed handshake
        await assert_edge_settled(edge)
        assert_not_cached(edge, digest)
    await assert_back_to(base)
    assert_no_tracebacks(caplog)


# -- the index is closed on stop ---------------------------------------------------------------------------------------


async def test_stopping_the_edge_closes_every_index_descriptor(registry: RegistryProcess, tmp_path: Path) -> None:
    """After ``edge.stop()`` no descriptor of the diskcache index may stay open (without help from the GC).

    Metadata runs diskcache on a 4-thread executor; diskcache keeps one SQLite connection per
    thread, and ``Metadata.close`` closes only the connection of the thread it happens to run on.
    """
    base = Usage.now()
    s = registry.seeded
    cache = tmp_path / "c"
    async with running_edge(registry.url, cache) as edge, client() as http:
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 200
        # a handful of concurrent hits spreads index reads over the metadata executor's threads
        results = await asyncio.gather(*(get_blob(http, f"{edge.url}/v2/library/multi/blobs/{d}")
                                         for d in [*s.layers["amd64"], s.configs["amd64"]] * 4))
        assert all(st == 200 for st, _, _ in results)
    still_open = await _poll_open_under(cache / "index", timeout=2.0)
    assert still_open == [], (f"{len(still_open)} index descriptors still open after the edge stopped "
                              f"(freed only by gc.collect()): {still_open}")
    gc.collect()
    await assert_back_to(base)


async def _poll_open_under(root: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(p for p in open_paths() if p.startswith(str(root)))
        if not found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)
