"""Rules decided before (or instead of) an upstream request (DESIGN §5b).

* repository allow and deny globs per upstream (checked at the edge, see routes);
* a digest blocklist file, re-read when it changes (or on SIGHUP);
* an optional scanner webhook whose verdicts are cached;
* pinned tags (in the pull-through policy: a pinned tag is never revalidated).

A refusal is ``DENIED`` (403) naming the rule.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from . import errors
from .oci import DIGEST_RE

log = logging.getLogger("edgecache.policy")


class Blocklist:
    """A file of digests (one per line, ``#`` comments) that are never served, cached or not."""

    def __init__(self, path: str | None, clock: Callable[[], float] = time.monotonic, check_every: float = 1.0) -> None:
        self.path = path
        self._digests: frozenset[str] = frozenset()
        self._mtime: float | None = None
        self._checked = float("-inf")
        self._clock = clock
        self._every = check_every
        self.generation = 0  # bumped by every reload: answers memoised before it are void

    def reload(self) -> None:
        """Re-read the file now (SIGHUP); a missing file is an empty list, a bad line is logged and skipped."""
        if self.path is None:
            return
        self.generation += 1
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            self._digests, self._mtime = frozenset(), None
            return
        good = set()
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if DIGEST_RE.fullmatch(text) is None:
                log.warning("blocklist %s line %d: not a digest, skipped", self.path, n)
                continue
            good.add(text)
        self._digests, self._mtime = frozenset(good), st.st_mtime
        log.info("blocklist %s: %d digests", self.path, len(good))

    def maybe_reload(self) -> None:
        """Re-read the file if it changed (looked at once per ``check_every`` seconds)."""
        now = self._clock()
        if self.path is None or now - self._checked < self._every:
            return
        self._checked = now
        try:
            mtime: float | None = os.stat(self.path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self.reload()

    def check(self, *digests: str) -> None:
        """Raise DENIED if any of ``digests`` (a manifest and the indexes it was reached through) is blocked."""
        self.maybe_reload()
        for d in digests:
            if d in self._digests:
                raise errors.Denied(f"digest {d} is blocked by the blocklist", detail={"rule": "blocklist", "digest": d})


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str


class Scanner:
    """The scan gate: POST {image, reference, digest, mediaType} to a webhook, get {allow, reason}.

    Verdicts are cached for ``ttl`` seconds per digest (in the index, so they survive restarts and are
    shared by workers). When the scanner cannot be reached, ``fail_open`` decides.
    """

    def __init__(self, url: str, ttl: float, fail_open: bool, timeout: float, session: aiohttp.ClientSession,
                 cache_get: Callable[[str], Any], cache_set: Callable[[str, Any, float], Any]) -> None:
        self.url, self.ttl, self.fail_open, self.timeout = url, ttl, fail_open, timeout
        self._session = session
        self._get, self._set = cache_get, cache_set

    async def verdict(self, image: str, reference: str, digest: str, media_type: str) -> Verdict:
        cached = await self._get(f"scan|{digest}")
        if isinstance(cached, dict):
            return Verdict(bool(cached["allow"]), str(cached["reason"]))
        body = {"image": image, "reference": reference, "digest": digest, "mediaType": media_type}
        try:
            async with self._session.post(self.url, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                doc = orjson.loads(await r.read()) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError) as e:
            log.warning("scanner %s unreachable for %s (%s): failing %s", self.url, digest, type(e).__name__,
                        "open" if self.fail_open else "closed")
            return Verdict(self.fail_open, "scanner unavailable")
        if not isinstance(doc, dict) or not isinstance(doc.get("allow"), bool):
            log.warning("scanner %s gave no verdict for %s: failing %s", self.url, digest,
                        "open" if self.fail_open else "closed")
            return Verdict(self.fail_open, "scanner gave no verdict")
        verdict = Verdict(doc["allow"], str(doc.get("reason", "")))
        await self._set(f"scan|{digest}", {"allow": verdict.allow, "reason": verdict.reason}, self.ttl)
        return verdict

    async def check(self, image: str, reference: str, digest: str, media_type: str) -> None:
        v = await self.verdict(image, reference, digest, media_type)
        if not v.allow:
            raise errors.Denied(f"image {image}@{digest} blocked by the scanner: {v.reason}",
                                detail={"rule": "scanner", "reason": v.reason})
