"""Serving: one worker process, or a supervisor of N workers sharing one port (SO_REUSEPORT).

Workers are started with the ``spawn`` method so each gets a fresh interpreter
(and its own event loop); prometheus-client's multiprocess mode sums their metrics.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import ssl
import tempfile
from typing import Any

from aiohttp import web

from . import config as config_mod
from . import log as log_mod
from .app import TASKS, EdgeRunner, create_app, drain, reload

log = logging.getLogger("edgecache.serve")
Source = tuple[str | None, dict[str, Any]]  # config file and flags, re-read on SIGHUP


def serve(cfg: config_mod.Config, source: Source) -> int:
    if cfg.server.workers == 1:
        return run_worker(cfg, False, source)
    metrics_dir = tempfile.mkdtemp(prefix="edgecache-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(cfg, True, source), name=f"edgecache-worker-{i}") for i in range(cfg.server.workers)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = []
    for p in procs:
        p.join()
        codes.append(p.exitcode or 0)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max(codes)


def run_worker(cfg: config_mod.Config, reuse_port: bool, source: Source) -> int:
    log_mod.setup(cfg.log_level)
    _raise_fd_limit()
    if cfg.server.event_loop == "uvloop":
        import uvloop

        return uvloop.run(_serve(cfg, reuse_port, source))
    return asyncio.run(_serve(cfg, reuse_port, source))


def _raise_fd_limit() -> None:
    """Use the whole descriptor allowance: clients, upstream connections and open hot files all take one
    (the soft limit is often 1024 while the hard one is far higher)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d: %s", soft, e)


async def _serve(cfg: config_mod.Config, reuse_port: bool, source: Source) -> int:
    app = create_app(cfg)
    runner = EdgeRunner(app, access_log=None, shutdown_timeout=cfg.server.shutdown_timeout,
                           handle_signals=False)
    await runner.setup()
    host, port = cfg.server.listen
    ssl_ctx = None
    if cfg.server.tls_cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_ctx, backlog=1024)
    await site.start()
    log.info("listening on %s:%d (pid %d, loop %s)", host, port, os.getpid(), type(asyncio.get_running_loop()).__module__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    def on_hup() -> None:
        try:
            new = config_mod.load(source[0], os.environ, source[1])
        except config_mod.ConfigError as e:
            log.error("SIGHUP: config error, keeping the running config: %s", e)
            return
        app[TASKS].spawn(reload(app, new), "reload")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sweeper = loop.create_task(_sweep_slow_connections(runner, cfg.server.header_timeout), name="sweep-connections")
    await stop.wait()
    sweeper.cancel()
    log.info("shutting down: draining for up to %.0fs", cfg.server.shutdown_timeout)
    drain(app)
    if cfg.server.drain_delay:
        await asyncio.sleep(cfg.server.drain_delay)  # /readyz answers 503 meanwhile; new requests still served
    await _graceful_stop(runner, cfg.server.shutdown_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


async def _graceful_stop(runner: web.BaseRunner, timeout: float) -> None:
    """Stop listening, close idle keep-alive connections, let requests in progress finish.

    aiohttp's own shutdown waits the whole timeout on an idle connection whose next request
    arrives after shutdown began (it ignores the bytes), so close idle connections ourselves.
    """
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        busy = 0
        for conn in list(server.connections):
            if conn._request_in_progress:  # noqa: SLF001 - no public flag in aiohttp 3.x
                busy += 1
            else:
                conn.force_close()
        if not busy or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.05)


async def _sweep_slow_connections(runner: web.BaseRunner, timeout: float) -> None:
    """Close connections that have not delivered a complete request head within ``timeout``.

    aiohttp has no header timeout: a slowloris client trickling one byte at a time would hold its
    connection (and a file descriptor) forever. Idle keep-alive connections count too, so this also
    bounds how long an idle client keeps a descriptor.
    """
    idle_since: dict[Any, float] = {}
    loop = asyncio.get_running_loop()
    interval = max(0.05, min(5.0, timeout / 4))
    while True:
        await asyncio.sleep(interval)
        server = runner.server
        if server is None:
            continue
        now = loop.time()
        live = set()
        for conn in list(server.connections):
            live.add(conn)
            if conn._request_in_progress:  # noqa: SLF001 - no public flag in aiohttp 3.x
                idle_since.pop(conn, None)
                continue
            since = idle_since.setdefault(conn, now)
            if now - since > timeout:
                conn.force_close()
                idle_since.pop(conn, None)
        for conn in list(idle_since):
            if conn not in live:
                del idle_since[conn]
