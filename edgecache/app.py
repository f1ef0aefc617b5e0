"""The composition root: :func:`create_app` builds and owns every collaborator."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any
from pathlib import Path

import aiohttp
import orjson
from aiocache import BaseCache
from aiohttp import web

from . import routes
from .caches import make_cache, make_shared_tags
from .collapse import Flights
from .config import Config
from .metadata import Metadata
from .metrics import FLUSH_SECONDS, Metrics
from .log import quiet_parse_errors
from .middleware import PUBLIC_URL, Htpasswd, make_edge
from .oci import MANIFEST_TYPES, MAX_MANIFEST_BYTES, OCTET_STREAM, Digest
from .policy import Blocklist, Scanner
from .evictor import Evictor
from .pullthrough import PullThrough
from .replicate import Replicator
from .storage import BlobStore, HotFiles
from .requestinfo import Handler
from .tasks import TaskOwner
from .upstream import UpstreamClient

log = logging.getLogger("edgecache.app")

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
TASKS = web.AppKey("tasks", TaskOwner)
DISPATCH: web.AppKey[Handler] = web.AppKey("dispatch")
MAX_REQUEST_BODY = 64 * 1024  # token requests are the only ones with a body

TOUCH_FLUSH_SECONDS = 2.0
HOT_FILES_SWEEP_SECONDS = 5.0  # an unlinked file we hold open keeps its space at most this long
PRUNE_SECONDS = 600.0  # expired negative and visibility records linger in the index at most this long


class AppState:
    """Mutable runtime state: draining flag, collaborators built at startup."""

    def __init__(self) -> None:
        self.draining = False
        self.metadata: Metadata | None = None
        self.store: BlobStore | None = None
        self.clients: dict[str, UpstreamClient] = {}
        self.policy: PullThrough | None = None
        self.flights: Flights | None = None
        self.tokens: BaseCache | None = None


STATE = web.AppKey("state", AppState)


def create_app(config: Config) -> web.Application:
    quiet_parse_errors()
    metrics = Metrics()
    htpasswd = Htpasswd(config.server.htpasswd) if config.server.htpasswd else None
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = metrics
    app[TASKS] = TaskOwner()
    app[STATE] = AppState()
    app[PUBLIC_URL] = (config.server.public_url or "").rstrip("/")
    app.cleanup_ctx.append(_lifecycle)
    dispatch = app[DISPATCH] = routes.make_dispatch(make_edge(app, metrics, config.server.allow_cidrs, htpasswd,
                                                              config.server.access_log))

    async def routed(request: web.Request) -> web.StreamResponse:
        return await dispatch(request)

    # Served by another runner (web.AppRunner, TestServer, gunicorn's aiohttp worker), every request still
    # goes through the dispatcher and its edge, only slower (aiohttp's router first).
    app.router.add_route("*", r"/{tail:[\s\S]*}", routed)
    return app


class EdgeRunner(web.BaseRunner):
    """Serves an app made by :func:`create_app`: its lifecycle as ``web.AppRunner`` runs it (startup,
    shutdown, cleanup), its requests through its own dispatcher (``DISPATCH``) on aiohttp's low-level
    server, without aiohttp's URL router and per-request application layer (measured: about 13% of
    the instructions of a replayed manifest answer, see loadtests/RESULTS.md)."""

    __slots__ = ("app",)

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app

    async def shutdown(self) -> None:
        await self.app.shutdown()

    async def _make_server(self) -> web.Server:
        self.app.on_startup.freeze()
        await self.app.startup()
        self.app.freeze()
        loop = asyncio.get_running_loop()

        def request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=MAX_REQUEST_BODY)

        return web.Server(self.app[DISPATCH], request_factory=request, max_field_size=16384, max_line_size=16384,
                          **self._kwargs)

    async def _cleanup_server(self) -> None:
        await self.app.cleanup()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, state, tasks, metrics = app[CONFIG], app[STATE], app[TASKS], app[METRICS]
    cache_dir = Path(config.cache.dir)
    store = BlobStore(cache_dir)
    await asyncio.get_running_loop().run_in_executor(None, store.create_dirs)
    shared_tags = make_shared_tags(config.redis_url)
    metadata = Metadata(cache_dir / "index", shared_tags=shared_tags)
    await metadata.open()
    await _recover(store, metadata)
    tokens = make_cache(config.redis_url, "tokens")
    access = make_cache(None, "access")  # credential confirmations stay in this process's memory
    clients = {u.name: UpstreamClient(u, tokens, metrics.on_upstream) for u in config.upstreams}
    for c in clients.values():
        await c.start()
    flights = Flights(tasks.spawn)
    hot = HotFiles(config.cache.open_files)
    evictor = Evictor(store, metadata, metrics, config.cache.max_size, config.cache.high_watermark,
                      config.cache.low_watermark, tasks.spawn, hot=hot)
    policy = PullThrough(store, metadata, flights, access, metrics, evictor)
    policy.blocklist = Blocklist(config.blocklist)
    policy.blocklist.reload()
    scan_session = aiohttp.ClientSession()
    policy.scanners = {u.name: Scanner(u.scanner_url, u.scanner_ttl, u.scanner_fail_open, u.scanner_timeout,
                                       scan_session, metadata.get_value, metadata.set_value)
                       for u in config.upstreams if u.scanner_url}
    state.store, state.metadata, state.clients, state.policy, state.flights = store, metadata, clients, policy, flights

    async def readiness() -> list[str]:
        return await _readiness(state, store)

    def refresh() -> None:
        metrics.open_blob_files.set(len(hot))
        for c in clients.values():
            if c.ratelimit_remaining is not None:
                metrics.ratelimit_remaining.labels(c.name).set(c.ratelimit_remaining)

    app[routes.CTX] = routes.EdgeContext(routes.Router(clients), policy, metrics, readiness, refresh)
    state.tokens = tokens
    replicator = Replicator(policy, lambda: state.clients, metrics)
    for i, item in enumerate(config.replicate):
        tasks.spawn(replicator.run_forever(item), f"replicate:{i}")
    tasks.spawn(_flush_touches(metadata), "flush-touches")
    tasks.spawn(_flush_metrics(metrics), "flush-metrics")
    tasks.spawn(_sweep_hot_files(hot, metrics), "sweep-hot-files")
    tasks.spawn(_prune_metadata(metadata, state), "prune-metadata")
    tasks.spawn(evictor.evict(0), "evict-startup")
    log.info("edgecache ready: cache %s, %d upstreams", cache_dir, len(clients))
    try:
        yield
    finally:
        state.draining = True
        await tasks.drain("flight:", config.server.shutdown_timeout)
        await tasks.close()
        # Close each resource on its own, so one failure cannot leave the index unflushed.
        closers = [c.close for c in state.clients.values()]
        closers += [lambda: _close_cache(tokens), lambda: _close_cache(access), scan_session.close, metadata.close]
        if shared_tags is not None:
            closers.append(lambda: _close_cache(shared_tags))

        async def close_hot_files() -> None:
            hot.close()

        closers.append(close_hot_files)
        for close in closers:
            try:
                await close()
            except Exception:
                log.exception("error while closing")


async def _close_cache(cache: BaseCache) -> None:
    # aiocache 0.12's Redis backend calls redis-py's deprecated close(); the warning is theirs, not ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
        await cache.close()


async def _flush_metrics(metrics: Metrics) -> None:
    """Batched per-request figures reach prometheus (and, with workers, the shared files) within
    ``FLUSH_SECONDS``; a scrape flushes the answering process at once."""
    try:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                metrics.flush()
            except Exception:  # e.g. the multiprocess directory went away: keep serving, keep trying
                log.exception("flushing metrics failed")
    finally:
        metrics.flush()


async def _sweep_hot_files(hot: HotFiles, metrics: Metrics) -> None:
    """Return the space of files unlinked by other processes (eviction, purge) that we still hold open."""
    while True:
        await asyncio.sleep(HOT_FILES_SWEEP_SECONDS)
        hot.sweep()
        metrics.open_blob_files.set(len(hot))  # with workers, each one's share of the summed gauge


async def _flush_touches(metadata: Metadata) -> None:
    """Write access times in batches; notice purges made by other processes (``edgecache purge``)."""
    while True:
        await asyncio.sleep(TOUCH_FLUSH_SECONDS)
        try:
            await metadata.flush_touches()
        except Exception:  # the index may be briefly locked by another worker; try again next round
            log.exception("flushing access times failed")
        try:
            if await metadata.notice_purges():
                log.info("a purge happened in another process: forgot remembered tags and links")
        except Exception:
            log.exception("reading the purge counter failed")


async def _prune_metadata(metadata: Metadata, state: AppState, every: float = PRUNE_SECONDS) -> None:
    """Delete expired negative and visibility records: one per caller that saw a 404 adds up."""
    while True:
        await asyncio.sleep(every)
        # The live upstream table: a reload may raise max_stale, and a stale answer must outlive it.
        max_stale = max((c.cfg.max_stale for c in state.clients.values()), default=0.0)
        try:
            removed = await metadata.prune_expired(time.time(), keep_stale_for=max_stale)
        except Exception:  # keep the loop: the next pass may find the index in better shape
            log.exception("pruning the index failed")
            continue
        if removed:
            log.info("pruned %d expired index records", removed)


async def _recover(store: BlobStore, metadata: Metadata) -> None:
    """On start: drop leftover partials, reconcile index and files (DESIGN §2 Store)."""
    loop = asyncio.get_running_loop()
    removed = await loop.run_in_executor(None, store.clean_tmp)
    files = await loop.run_in_executor(None, lambda: [(str(d), s) for d, s in store.walk()])

    def adopt(digest: str, size: int) -> str | None:
        """A file without an entry: keep it only if it still hashes to its name."""
        d = Digest.parse(digest)
        h = d.hasher()
        with open(store.path(d), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != d.hex:
            store.remove(d)
            return None
        return _sniff_media_type(store.path(d), size)

    dropped, adopted = await metadata.reconcile(files, adopt)
    if removed or dropped or adopted:
        log.info("recovered cache: %d partial files removed, %d entries dropped, %d files adopted",
                 removed, dropped, adopted)


def _sniff_media_type(path: Path, size: int) -> str:
    """An adopted file is a manifest if it is a small JSON document naming a manifest media type."""
    if size <= MAX_MANIFEST_BYTES:
        try:
            doc = orjson.loads(path.read_bytes())
        except (orjson.JSONDecodeError, OSError):
            return OCTET_STREAM
        if isinstance(doc, dict) and doc.get("mediaType") in MANIFEST_TYPES:
            return str(doc["mediaType"])
    return OCTET_STREAM


async def _readiness(state: AppState, store: BlobStore) -> list[str]:
    problems = []
    if state.draining:
        problems.append("draining")
    if state.metadata is None or not state.metadata.is_open:
        problems.append("index not open")

    def writable() -> bool:
        try:
            with tempfile.NamedTemporaryFile(dir=store.tmp, prefix=".ready-"):
                return True
        except OSError:
            return False

    if not await asyncio.get_running_loop().run_in_executor(None, writable):
        problems.append("cache directory not writable")
    st = await asyncio.get_running_loop().run_in_executor(None, os.statvfs, store.root)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if free < min(64 << 20, total // 20):
        problems.append(f"cache disk full ({free} bytes free)")
    return problems


async def reload(app: web.Application, new: Config) -> list[str]:
    """SIGHUP: swap in a new upstream table and TTLs without dropping connections.

    Unchanged upstreams keep their client (sessions, tokens); changed or removed
    ones are closed after the drain deadline, so requests using them finish.
    Cache settings and the listen address need a restart. Returns what changed.
    """
    state, tasks, metrics = app[STATE], app[TASKS], app[METRICS]
    assert state.tokens is not None
    old_clients = state.clients
    clients: dict[str, UpstreamClient] = {}
    changed = []
    for cfg in new.upstreams:
        old = old_clients.get(cfg.name)
        if old is not None and old.cfg == cfg:
            clients[cfg.name] = old
            continue
        client = UpstreamClient(cfg, state.tokens, metrics.on_upstream)
        await client.start()
        clients[cfg.name] = client
        changed.append(cfg.name)
    retired = [c for name, c in old_clients.items() if clients.get(name) is not c]
    changed += [c.name for c in retired if c.name not in clients]
    state.clients = clients
    app[routes.CTX].router = routes.Router(clients)
    if state.policy is not None:
        state.policy.blocklist.reload()

    async def retire() -> None:
        await asyncio.sleep(new.server.shutdown_timeout)  # let requests that hold the old client finish
        for c in retired:
            await c.close()

    if retired:
        tasks.spawn(retire(), "retire-upstreams")
    log.info("reloaded upstream table: %s", ", ".join(changed) or "no changes")
    return changed


def drain(app: web.Application) -> None:
    """Mark the app as draining (SIGTERM): readiness turns false."""
    app[STATE].draining = True
