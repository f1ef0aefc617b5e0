"""The pull-through policy: hit, miss, stale, negative, collapse and tenancy checks.

The ``local`` side is the blob store plus the metadata index; the ``remote``
side is the upstream client. The edge (routes, send) calls only this module. See
DESIGN.md §2 (Policy, Flight) and §4 (tenancy).

:class:`PullThrough` owns the manifest path itself (by digest, by tag with revalidation, stale
answers, negative caching, the blocklist and scan gate) and delegates to two collaborators it
builds: :class:`~edgecache.tenancy.Tenancy` (who may read what is cached) and
:class:`~edgecache.blobs.Blobs` (hits, collapsed downloads, the cold fill). The values it
answers with live in :mod:`edgecache.results` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson
from aiocache import BaseCache

from . import errors, oci
from .blobs import Blobs
from .collapse import Flights, SingleFlight
from .evictor import Evictor
from .metadata import Metadata, TagEntry
from .metrics import Metrics
from .oci import Digest
from .policy import Blocklist, Scanner
from .results import BlobResult as BlobResult, ManifestResult as ManifestResult, Outcome as Outcome
from .results import Target as Target, upstream_failure
from .storage import BlobStore
from .tenancy import Tenancy
from .upstream import UpstreamClient, UpstreamResponse

log = logging.getLogger("edgecache.pullthrough")
T = TypeVar("T")

HOT_MANIFEST_BYTES = 32 << 20


class PullThrough:
    """The policy over a local store and remote upstreams."""

    def __init__(self, store: BlobStore, metadata: Metadata, flights: Flights, access: BaseCache,
                 metrics: Metrics, evictor: Evictor, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.metadata = metadata
        self.evictor = evictor
        self.clock = clock
        self.blocklist = Blocklist(None)
        self.scanners: dict[str, Scanner] = {}  # upstream name -> scan gate
        self._hot: OrderedDict[str, bytes] = OrderedDict()  # manifest bytes by digest, bounded
        self._hot_bytes = 0
        self._tags: SingleFlight[ManifestResult] = SingleFlight()
        self._manifests: SingleFlight[ManifestResult] = SingleFlight()
        self.tenancy = Tenancy(metadata, access)
        self.blobs = Blobs(store, metadata, flights, metrics, evictor, self.tenancy,
                           lambda key: self.blocklist.check(key))  # the blocklist the app set, at each call

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # manifests ------------------------------------------------------------------
    async def manifest(self, target: Target, ref: oci.Reference, accept: str) -> ManifestResult:
        if ref.digest is not None:
            self.blocklist.check(str(ref.digest), *await self.metadata.parents(str(ref.digest)))
            result = await self._manifest_by_digest(target, ref.digest, accept)
        else:
            assert ref.tag is not None
            result = await self._manifest_by_tag(target, ref.tag, accept)
        await self._gate(target, str(ref), result)
        return result

    async def _gate(self, target: Target, reference: str, result: ManifestResult) -> None:
        """Blocklist (the manifest and any index it was reached through) and the scan gate."""
        self.blocklist.check(result.digest, *await self.metadata.parents(result.digest))
        scanner = self.scanners.get(target.upstream.name)
        if scanner is not None:
            ns = target.cfg.namespaces[0] if target.cfg.namespaces else target.cfg.host
            await scanner.check(f"{ns}/{target.repo}", reference, result.digest, result.media_type)

    async def _note_children(self, digest: str, media_type: str, data: bytes) -> None:
        """An index's children remember it, so blocking the index blocks pulls through it."""
        if media_type not in oci.INDEX_TYPES:
            return
        try:
            doc = orjson.loads(data)
            children = [str(m["digest"]) for m in doc.get("manifests", []) if isinstance(m, dict) and "digest" in m]
        except (ValueError, TypeError, AttributeError):
            return
        if children:
            await self.metadata.add_parent(children, digest)

    async def _cached_manifest(self, digest: str) -> tuple[bytes, str] | None:
        entry = await self.metadata.get_entry(digest)
        if entry is None:
            return None
        self.metadata.touch(digest)
        hot = self._hot.get(digest)
        if hot is not None:
            return hot, entry.media_type
        data = await self._run(self.store.read, Digest.parse(digest))
        if data is None:
            await self.metadata.drop_entry(digest)
            return None
        self._remember_manifest(digest, data)
        return data, entry.media_type

    def _remember_manifest(self, digest: str, data: bytes) -> None:
        """Keep small documents in memory: manifests are read far more often than they change (never)."""
        if digest in self._hot:
            self._hot.move_to_end(digest)
            return
        self._hot[digest] = data
        self._hot_bytes += len(data)
        while self._hot_bytes > HOT_MANIFEST_BYTES:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    async def _manifest_by_digest(self, target: Target, digest: Digest, accept: str) -> ManifestResult:
        cached = await self._cached_manifest(str(digest))
        if cached is not None:
            await self.tenancy.authorize_cached(target, oci.Kind.MANIFEST, str(digest), accept)
            return ManifestResult(str(digest), cached[1], cached[0], Outcome.HIT)
        key = f"{target.upstream.name}|{target.repo}|{digest}|{target.credential.key}"
        collapsed = self._manifests.in_flight(key)
        result = await self._manifests.do(key, lambda: self._fetch_manifest(target, str(digest), accept, digest))
        return ManifestResult(result.digest, result.media_type, result.data,
                              Outcome.COLLAPSED if collapsed else Outcome.MISS)

    async def _fetch_manifest(self, target: Target, ref: str, accept: str, expect: Digest | None) -> ManifestResult:
        """GET a manifest upstream, verify it, store it; raises the mapped OCI error otherwise."""
        path = f"/v2/{target.repo}/manifests/{ref}"
        # Per credential: registries answer 404 to callers who may not see a private repository
        # (ghcr.io, Docker Hub), and that answer must not reach a caller the upstream lets in.
        cred = target.upstream.effective_credential(target.credential)
        neg_key = f"{target.upstream.name}|{target.repo}|{ref}|{cred.key}"
        if await self.metadata.get_negative(neg_key):
            raise errors.ManifestUnknown("manifest unknown (cached upstream 404)",
                                         detail={"upstream": target.upstream.name, "reference": ref})
        headers = {"Accept": accept} if accept else {}
        resp = await target.upstream.request("GET", path, scope=target.scope, credential=target.credential,
                                             headers=headers)
        try:
            if resp.status != 200:
                if resp.status == 404:
                    await self.metadata.set_negative(neg_key, target.cfg.negative_ttl)
                raise upstream_failure(resp, target, oci.Kind.MANIFEST, ref)
            data = await resp.read(oci.MAX_MANIFEST_BYTES)
            media_type = resp.headers.get("Content-Type", oci.OCI_MANIFEST).split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.release()
        digest = self._verify_manifest(target, data, expect, header_digest)
        self.blocklist.check(str(digest))
        await self._note_children(str(digest), media_type, data)
        await self._run(self.store.write_verified, digest, data)
        self._remember_manifest(str(digest), data)
        await self.metadata.put_entry(str(digest), len(data), media_type)
        await self.metadata.add_link(target.upstream.name, target.repo, str(digest))
        await self.tenancy.remember_access(target, path)
        self.evictor.kick()
        return ManifestResult(str(digest), media_type, data, Outcome.MISS)

    def _verify_manifest(self, target: Target, data: bytes, expect: Digest | None, header: str | None) -> Digest:
        algo = expect.algorithm if expect else "sha256"
        if expect is None and header:
            try:
                algo = Digest.parse(header).algorithm
            except errors.OCIError:
                pass
        actual = Digest.of(data, algo)
        for wanted in (expect, _maybe_digest(header)):
            if wanted is not None and wanted.algorithm == algo and wanted != actual:
                raise errors.DigestMismatch(f"upstream {target.upstream.name} sent a manifest that does not match "
                                            f"its digest", detail={"expected": str(wanted), "actual": str(actual)})
        return actual

    @property
    def generation(self) -> int:
        """Changes whenever an answer may change without its TTL running out: a blocklist reload, a purge
        (in this process, or by ``edgecache purge``, noticed through the index's purge counter)."""
        self.blocklist.maybe_reload()  # replayed answers skip check(): look at the file on its schedule
        return self.blocklist.generation + self.metadata.generation

    def answered(self, outcome: Outcome, digest: str | None = None) -> None:
        """An answer went out: count its outcome (``edgecache stats``); a replayed hit also keeps its
        entry's place in the LRU order (the policy path touches it itself)."""
        self.metadata.count(outcome.lower())
        if digest is not None:
            self.metadata.touch(digest)

    def memoisable(self, target: Target) -> bool:
        """May the edge replay a HIT answer for ``target`` for a moment without asking this policy?
        Not where access is decided per credential (passthrough) or a scanner gives verdicts."""
        return target.cfg.auth != "passthrough" and target.upstream.name not in self.scanners

    def _tag_key(self, target: Target, tag: str, accept: str) -> str:
        return f"{target.upstream.name}|{target.repo}|{tag}|{oci.accept_key(accept)}"

    async def _manifest_by_tag(self, target: Target, tag: str, accept: str) -> ManifestResult:
        key = self._tag_key(target, tag, accept)
        entry = await self.metadata.get_tag(key)
        now = self.clock()
        pinned = bool(target.cfg.pinned_tags) and any(
            fnmatch.fnmatchcase(f"{target.repo}:{tag}", p) for p in target.cfg.pinned_tags)
        ttl = target.cfg.ttl_for(target.repo, tag)
        if entry is not None and not pinned and now - entry.fetched_at >= ttl:
            entry = await self.metadata.get_tag(key, cached=False)  # another worker may have revalidated
        if entry is not None and (pinned or now - entry.fetched_at < ttl):
            cached = await self._cached_manifest(entry.digest)
            if cached is not None:
                await self.tenancy.authorize_cached(target, oci.Kind.MANIFEST, entry.digest, accept)
                # Shared (Redis) tags can be moved by another instance at any moment: never replayed.
                fresh_until = now if self.metadata.shared_tags else math.inf if pinned else entry.fetched_at + ttl
                return ManifestResult(entry.digest, cached[1], cached[0], Outcome.HIT, fresh_until)
            # Fresh answer (shared via Redis, or evicted here): fetch that digest, never re-ask the tag,
            # so every instance serves the digest the region agreed on.
            return await self._manifest_by_digest(target, Digest.parse(entry.digest), accept)
        flight_key = f"{key}|{target.credential.key}"
        collapsed = self._tags.in_flight(flight_key)
        result = await self._tags.do(flight_key, lambda: self._revalidate_tag(target, tag, accept, key, entry, pinned))
        if collapsed and result.outcome is not Outcome.STALE:
            return ManifestResult(result.digest, result.media_type, result.data, Outcome.COLLAPSED)
        return result

    async def _revalidate_tag(self, target: Target, tag: str, accept: str, key: str,
                              entry: TagEntry | None, pinned: bool = False) -> ManifestResult:
        try:
            if entry is not None:
                fresh = await self._head_tag(target, tag, accept, entry)
                if fresh is not None:
                    return fresh
            result = await self._fetch_manifest(target, tag, accept, None)
        except (errors.UpstreamError, errors.TooManyRequests) as e:
            stale = await self._stale(target, tag, entry, e)
            if stale is None:
                raise
            return stale
        fetched = TagEntry(result.digest, result.media_type, len(result.data), self.clock())
        if not pinned:
            await self.metadata.set_tag(key, fetched)
            return result
        # A pinned tag is never re-read: if another process pinned it first (the tag moved upstream
        # between its fetch and ours), serve its digest, so that every process serves one.
        held = await self.metadata.add_tag(key, fetched)
        if held.digest == result.digest:
            return result
        return await self._manifest_by_digest(target, Digest.parse(held.digest), accept)

    async def _head_tag(self, target: Target, tag: str, accept: str, entry: TagEntry) -> ManifestResult | None:
        """Revalidate with one HEAD (free against Docker Hub's pull limit); None when it changed."""
        resp = await target.upstream.request("HEAD", f"/v2/{target.repo}/manifests/{tag}", scope=target.scope,
                                             credential=target.credential, headers={"Accept": accept} if accept else {})
        resp.release()
        if resp.status != 200:
            raise upstream_failure(resp, target, oci.Kind.MANIFEST, tag)
        if resp.headers.get("Docker-Content-Digest") != entry.digest:
            return None
        cached = await self._cached_manifest(entry.digest)
        if cached is None:
            return None
        await self.metadata.set_tag(self._tag_key(target, tag, accept),
                                    TagEntry(entry.digest, entry.media_type, entry.size, self.clock()))
        await self.metadata.add_link(target.upstream.name, target.repo, entry.digest)
        await self.tenancy.remember_access(target, f"/v2/{target.repo}/manifests/{tag}")
        return ManifestResult(entry.digest, cached[1], cached[0], Outcome.MISS)

    async def _stale(self, target: Target, tag: str, entry: TagEntry | None, why: Exception) -> ManifestResult | None:
        if entry is None or self.clock() - entry.fetched_at > target.cfg.ttl_for(target.repo, tag) + target.cfg.max_stale:
            return None
        cached = await self._cached_manifest(entry.digest)
        if cached is None:
            return None
        await self.tenancy.authorize_cached_offline(target, entry.digest)
        log.warning("serving stale tag %s/%s:%s (%s): %s", target.upstream.name, target.repo, tag,
                    entry.digest, why)
        return ManifestResult(entry.digest, cached[1], cached[0], Outcome.STALE)

    # blobs ------------------------------------------------------------------------
    async def blob(self, target: Target, digest: Digest, head: bool) -> BlobResult:
        return await self.blobs.blob(target, digest, head)

    def far_ahead(self, result: BlobResult, start: int) -> bool:
        """Is a Range start so far past the download position that waiting would be silly?"""
        return self.blobs.far_ahead(result, start)

    async def direct_range(self, target: Target, digest: Digest, start: int, end: int) -> UpstreamResponse:
        """Fetch a range straight from upstream (not cached; the flight fills the cache)."""
        return await self.blobs.direct_range(target, digest, start, end)

    # listings and tokens ----------------------------------------------------------
    async def listing(self, target: Target, kind: oci.Kind, path: str, query: dict[str, str], accept: str,
                      passed: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
        """Tags list and referrers: always the upstream's answer (not cached), with the headers that matter."""
        resp = await target.upstream.request("GET", path, scope=target.scope, credential=target.credential,
                                             headers={"Accept": accept}, query=query)
        try:
            if resp.status != 200:
                raise upstream_failure(resp, target, kind, "")
            body = await resp.read(oci.MAX_MANIFEST_BYTES)
            return body, {name: resp.headers[name] for name in passed if name in resp.headers}
        finally:
            resp.release()

    async def relay_token(self, client: UpstreamClient, method: str, query: Mapping[str, str],
                          form: Mapping[str, str] | None, authorization: str | None) -> tuple[int, bytes]:
        """Passthrough mode: the client's token request, relayed to the upstream's realm."""
        return await client.relay_token(method, query, form, authorization)


def _maybe_digest(text: str | None) -> Digest | None:
    if not text:
        return None
    try:
        return Digest.parse(text)
    except errors.OCIError:
        return None
