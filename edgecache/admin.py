"""Operator commands on the cache directory: ``edgecache purge`` and ``edgecache stats``."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
from pathlib import Path

import diskcache
import orjson

from .caches import make_shared_tags
from .config import Config
from .metadata import Metadata
from .storage import BlobStore


async def purge(cfg: Config, args: argparse.Namespace) -> int:
    """Forget a tag, a repository, or everything.

    Running instances notice a ``--tag``/``--repo`` purge within a couple of seconds (the index's purge
    counter, read with the access-time flush) and forget what they remember of tags and links.
    ``--all`` removes the cache directory's contents (not Redis-shared tags): stop the instances first.
    """
    root = Path(cfg.cache.dir)
    if args.all:
        store = BlobStore(root)
        await asyncio.get_running_loop().run_in_executor(None, _wipe, store)
        print(f"purged everything under {root}")
        return 0
    # Redis-shared tags live only in Redis: the purge must reach them there, as the instances read them.
    shared_tags = make_shared_tags(cfg.redis_url)
    metadata = Metadata(root / "index", shared_tags=shared_tags)
    await metadata.open()
    try:
        if args.tag:
            repo, sep, tag = args.tag.rpartition(":")
            if not sep or "/" not in repo:
                print("edgecache: --tag takes UPSTREAM/REPOSITORY:TAG")
                return 2
            upstream, _, name = repo.partition("/")
            n = await metadata.purge(f"{upstream}|{_stored_name(cfg, upstream, name)}|{tag}|")
        else:
            if "/" not in args.repo:
                print("edgecache: --repo takes UPSTREAM/REPOSITORY")
                return 2
            upstream, _, name = args.repo.partition("/")
            n = await metadata.purge(f"{upstream}|{_stored_name(cfg, upstream, name)}|")
    except (sqlite3.OperationalError, diskcache.Timeout) as e:
        print(f"edgecache: purge failed, nothing was purged: the index is unavailable ({e})")
        return 1
    finally:
        await metadata.close()
        if shared_tags is not None:
            await shared_tags.close()
    print(f"purged {n} records")
    return 0


def _stored_name(cfg: Config, upstream: str, name: str) -> str:
    """The repository as the index names it: ``nginx`` on a Docker Hub-style upstream is ``library/nginx``."""
    up = next((u for u in cfg.upstreams if u.name == upstream), None)
    return up.repository(name) if up is not None else name


def _wipe(store: BlobStore) -> None:
    for d in (store.blobs, store.tmp, store.root / "index"):
        shutil.rmtree(d, ignore_errors=True)


async def stats(cfg: Config) -> int:
    """Usage, entries and hit ratio, as one JSON document."""
    metadata = Metadata(Path(cfg.cache.dir) / "index")
    await metadata.open()
    try:
        counters = await metadata.counters()
        used = await metadata.total_bytes()
        entries = await metadata.count_entries()
    finally:
        await metadata.close()
    served = sum(counters.get(k, 0) for k in ("hit", "miss", "stale", "collapsed"))
    doc = {
        "cache_dir": cfg.cache.dir,
        "bytes_used": used,
        "budget_bytes": cfg.cache.max_size,
        "entries": entries,
        "requests": counters,
        "hit_ratio": round(counters.get("hit", 0) / served, 4) if served else None,
    }
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    return 0
