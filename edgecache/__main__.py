"""Command line: argv -> config -> logging -> event loop -> run. No logic of its own beyond wiring."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import ssl
import sys
import tempfile
from typing import Any

from aiohttp import web

from . import config as config_mod
from . import log as log_mod


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in ("listen", "workers", "cache_dir", "upstream")}


def load_config(args: argparse.Namespace) -> config_mod.Config:
    path = args.config
    if path is None and os.path.exists("config/edgecache.toml") and getattr(args, "upstream", None) is None:
        path = "config/edgecache.toml"
    return config_mod.load(path, os.environ, _flags(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecache", description="Pull-through caching mirror for OCI registries")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the mirror")
    s.add_argument("--config", help="TOML config file (default config/edgecache.toml if present)")
    s.add_argument("--listen", help="HOST:PORT")
    s.add_argument("--cache-dir", dest="cache_dir")
    s.add_argument("--upstream", help="a single passthrough upstream URL (replaces the upstream table)")
    s.add_argument("--workers", type=int)
    c = sub.add_parser("check-config", help="validate a config file and print the upstream table")
    c.add_argument("file")
    w = sub.add_parser("warm", help="pre-pull images into a running mirror")
    w.add_argument("images", nargs="+", metavar="IMAGE[:TAG|@DIGEST]")
    w.add_argument("--url", default="http://127.0.0.1:5000", help="the running mirror")
    w.add_argument("--platform", action="append", default=[], help="os/arch[/variant] (repeatable; default all)")
    w.add_argument("--ns", help="containerd-style ns= value selecting the upstream")
    w.add_argument("--quiet", action="store_true")
    for name, helptext in (("purge", "forget tags, a repository, or everything"), ("stats", "cache usage")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--config")
        q.add_argument("--cache-dir", dest="cache_dir")
        if name == "purge":
            g = q.add_mutually_exclusive_group(required=True)
            g.add_argument("--all", action="store_true", help="delete every cached entry")
            g.add_argument("--repo", help="UPSTREAM/REPOSITORY: forget its tags, links and answers")
            g.add_argument("--tag", help="UPSTREAM/REPOSITORY:TAG: forget this tag")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = config_mod.load(args.file, os.environ, {})
            print(config_mod.summary(cfg))
            return 0
        if args.command == "warm":
            from .warm import warm

            return asyncio.run(warm(args.url, args.images, args.platform, args.ns, args.quiet))
        cfg = load_config(args)
    except config_mod.ConfigError as e:
        print(f"edgecache: config error: {e}", file=sys.stderr)
        return 2
    log_mod.setup(cfg.log_level)
    if args.command in ("purge", "stats"):
        from .admin import purge, stats

        return asyncio.run(purge(cfg, args) if args.command == "purge" else stats(cfg))
    return serve(cfg, list(argv) if argv is not None else sys.argv[1:])


def serve(cfg: config_mod.Config, argv: list[str] | None = None) -> int:
    if cfg.server.workers == 1:
        return run_worker(cfg, False, argv)
    metrics_dir = tempfile.mkdtemp(prefix="edgecache-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(cfg, True, argv), name=f"edgecache-worker-{i}") for i in range(cfg.server.workers)]
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


def run_worker(cfg: config_mod.Config, reuse_port: bool, reload_args: list[str] | None = None) -> int:
    log_mod.setup(cfg.log_level)
    if cfg.server.event_loop == "uvloop":
        import uvloop

        return uvloop.run(_serve(cfg, reuse_port, reload_args))
    return asyncio.run(_serve(cfg, reuse_port, reload_args))


async def _serve(cfg: config_mod.Config, reuse_port: bool, reload_args: list[str] | None) -> int:
    from .app import TASKS, create_app, drain, reload

    import logging

    log = logging.getLogger("edgecache.serve")
    app = create_app(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.server.shutdown_timeout,
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
            new = load_config(build_parser().parse_args(reload_args or ["serve"]))
        except config_mod.ConfigError as e:
            log.error("SIGHUP: config error, keeping the running config: %s", e)
            return
        app[TASKS].spawn(reload(app, new), "reload")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", cfg.server.shutdown_timeout)
    drain(app)
    await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
