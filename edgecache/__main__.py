"""Command line: argv -> config -> logging -> event loop -> run. No logic of its own beyond wiring."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from . import config as config_mod
from . import log as log_mod


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in ("listen", "workers", "cache_dir", "upstream")}


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = getattr(args, "config", None)
    if path is None and os.path.exists("config/edgecache.toml") and getattr(args, "upstream", None) is None:
        path = "config/edgecache.toml"
    return path


def load_config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(_config_path(args), os.environ, _flags(args))


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
    from .serve import serve

    return serve(cfg, (_config_path(args), _flags(args)))


if __name__ == "__main__":
    sys.exit(main())
