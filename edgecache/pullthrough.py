"""The pull-through policy: hit, miss, stale, negative, collapse and tenancy checks.

The ``local`` side is the blob store plus the metadata index; the ``remote``
side is the upstream client. The edge (routes) calls only this module. See
DESIGN.md §2 (Policy, Flight) and §4 (tenancy).
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiocache import BaseCache

from . import errors, oci
from .collapse import Flight, Flights, RemoteFlight, SingleFlight, Source
from .config import UpstreamConfig
from .evictor import Evictor
from .fill import Tee
from .metadata import Metadata, TagEntry
from .metrics import Metrics
from .oci import Digest
from .policy import Blocklist, Scanner
from .storage import BlobStore, FillInfo
from .upstream import Credential, UpstreamClient, UpstreamResponse

log = logging.getLogger("edgecache.pullthrough")
T = TypeVar("T")

MAX_RESUMES = 3
# A Range that starts this far past the download position is fetched directly.
DIRECT_RANGE_GAP = 64 << 20
HOT_MANIFEST_BYTES = 32 << 20


class Outcome(enum.StrEnum):
    """How an answer was made: its ``X-Cache`` value (a str, used as one on the hot path)."""

    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"
    COLLAPSED = "COLLAPSED"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the upstream, its repository name there, the client's credential."""

    upstream: UpstreamClient
    repo: str
    credential: Credential

    @property
    def cfg(self) -> UpstreamConfig:
        return self.upstream.cfg

    @property
    def scope(self) -> str:
        return f"repository:{self.repo}:pull"


@dataclass(slots=True)
class ManifestResult:
    digest: str
    media_type: str
    data: bytes
    outcome: Outcome
    fresh_until: float = math.inf  # (policy clock) a tag answer holds until then; by digest: forever

    def fresh_for(self, now: float) -> float:
        """Seconds this answer stays right without asking anyone (0: not at all)."""
        return max(0.0, self.fresh_until - now) if self.outcome is Outcome.HIT else 0.0


@dataclass(slots=True)
class BlobResult:
    digest: str
    size: int | None
    media_type: str
    outcome: Outcome
    fd: int | None = None  # committed file, open (release() closes it): serve with sendfile
    source: Source | None = None  # fill in progress: serve spans as they land
    open_partial: Callable[[], Awaitable[int]] | None = None
    release: Callable[[], None] = field(default=lambda: None)
    direct: UpstreamResponse | None = None  # disk full: relay this upstream body as it comes


def _hit(key: str, fd: int, size: int) -> BlobResult:
    return BlobResult(key, size, oci.OCTET_STREAM, Outcome.HIT, fd=fd, release=lambda: os.close(fd))


def _close_opened(f: "asyncio.Future[tuple[int, int] | None]") -> None:
    if not f.cancelled() and f.exception() is None:
        opened = f.result()
        if opened is not None:
            os.close(opened[0])


def unauthorized(target: Target, message: str = "authentication required") -> errors.OCIError:
    err = errors.Unauthorized(message, detail={"upstream": target.upstream.name, "repository": target.repo})
    err.challenge = target.upstream.name  # type: ignore[attr-defined]  # the edge words it for the client
    return err


def upstream_failure(resp: UpstreamResponse, target: Target, kind: oci.Kind, ref: str) -> errors.OCIError:
    """Map an upstream status to the OCI error the client sees."""
    detail = {"upstream": target.upstream.name, "repository": target.repo, "reference": ref}
    if resp.status == 401:
        return unauthorized(target)
    if resp.status == 403:
        return errors.Denied("access denied by upstream", detail=detail)
    if resp.status == 404:
        if kind is oci.Kind.BLOB:
            return errors.BlobUnknown("blob unknown to upstream", detail=detail)
        return errors.ManifestUnknown("manifest unknown to upstream", detail=detail)
    if resp.status == 429:
        headers = {"Retry-After": resp.headers["Retry-After"]} if "Retry-After" in resp.headers else {}
        return errors.TooManyRequests(f"upstream {target.upstream.name} rate limit", detail=detail, headers=headers)
    return errors.UpstreamError(f"upstream {target.upstream.name} answered {resp.status}", detail=detail)


class PullThrough:
    """The policy over a local store and remote upstreams."""

    def __init__(self, store: BlobStore, metadata: Metadata, flights: Flights, access: BaseCache,
                 metrics: Metrics, evictor: Evictor, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.hot = evictor.hot  # the evictor closes what it evicts
        self.metadata = metadata
        self.flights = flights
        self.access = access  # (upstream, repo, credential key) -> confirmed, with a TTL
        self.metrics = metrics
        self.evictor = evictor
        self.clock = clock
        self.blocklist = Blocklist(None)
        self.scanners: dict[str, Scanner] = {}  # upstream name -> scan gate
        self._hot: OrderedDict[str, bytes] = OrderedDict()  # manifest bytes by digest, bounded
        self._hot_bytes = 0
        self._tags: SingleFlight[ManifestResult] = SingleFlight()
        self._manifests: SingleFlight[ManifestResult] = SingleFlight()
        self._probes: SingleFlight[bool | None] = SingleFlight()
        self._starting: dict[str, asyncio.Future[None]] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # tenancy ------------------------------------------------------------------
    async def _remember_access(self, target: Target, path: str) -> None:
        """After an upstream success with ``target``'s credential: record visibility and access."""
        up, repo = target.upstream.name, target.repo
        if target.cfg.auth != "passthrough":
            return
        cred = target.upstream.effective_credential(target.credential)
        if target.cfg.access_ttl > 0:  # as a float: aiocache keeps a ttl of 0 (int("500ms")) forever
            await self.access.set(f"{up}|{repo}|{cred.key}", True, ttl=target.cfg.access_ttl)
        known = await self.metadata.visibility(up, repo)
        if cred.anonymous:
            if known != "public":
                await self.metadata.set_visibility(up, repo, "public", target.cfg.visibility_ttl)
            return
        if known is None:  # never asked, or the answer expired: repositories change visibility
            public = await self._probes.do(f"{up}|{repo}", lambda: self._probe_public(target, path))
            if public is not None:  # an erring probe (429, 5xx, timeout) decides nothing
                await self.metadata.set_visibility(up, repo, "public" if public else "private",
                                                   target.cfg.visibility_ttl)

    async def _probe_public(self, target: Target, path: str) -> bool | None:
        """Would an anonymous client be let in? One HEAD per repository, remembered; None: no answer."""
        from .upstream import ANONYMOUS  # local: the sentinel, not a second client

        anon = Target(target.upstream, target.repo, ANONYMOUS)
        try:
            resp = await anon.upstream.request("HEAD", path, scope=anon.scope, credential=ANONYMOUS)
        except errors.OCIError:
            return None
        resp.release()
        if resp.status == 200:
            return True
        return False if resp.status in (401, 403, 404) else None

    async def authorize_cached(self, target: Target, kind: oci.Kind, digest: str, accept: str | None = None) -> None:
        """Decide whether ``target`` may read cached ``digest``, asking upstream only when we must."""
        up, repo = target.upstream.name, target.repo
        path = f"/v2/{repo}/{'blobs' if kind is oci.Kind.BLOB else 'manifests'}/{digest}"
        linked = await self.metadata.has_link(up, repo, digest)
        if linked and target.cfg.auth != "passthrough":
            return
        if linked:
            visibility = await self.metadata.visibility(up, repo)
            if visibility == "public":
                return
            cred = target.upstream.effective_credential(target.credential)
            if await self.access.get(f"{up}|{repo}|{cred.key}"):
                return
            if cred.anonymous and visibility == "private":
                raise unauthorized(target)
        headers = {"Accept": accept} if accept else {}
        resp = await target.upstream.request("HEAD", path, scope=target.scope, credential=target.credential,
                                             headers=headers)
        resp.release()
        if resp.status != 200:
            if resp.status in (401, 403) and target.cfg.auth == "passthrough" and target.credential.anonymous:
                # Not (or no longer) public: the next anonymous callers are refused without asking.
                await self.metadata.set_visibility(up, repo, "private", target.cfg.visibility_ttl)
            raise upstream_failure(resp, target, kind, digest)
        await self.metadata.add_link(up, repo, digest)
        await self._remember_access(target, path)

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
            await self.authorize_cached(target, oci.Kind.MANIFEST, str(digest), accept)
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
        await self._remember_access(target, path)
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
        in this process (``edgecache purge`` runs in its own; replayed answers live a second at most)."""
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
                await self.authorize_cached(target, oci.Kind.MANIFEST, entry.digest, accept)
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
        await self._remember_access(target, f"/v2/{target.repo}/manifests/{tag}")
        return ManifestResult(entry.digest, cached[1], cached[0], Outcome.MISS)

    async def _stale(self, target: Target, tag: str, entry: TagEntry | None, why: Exception) -> ManifestResult | None:
        if entry is None or self.clock() - entry.fetched_at > target.cfg.ttl_for(target.repo, tag) + target.cfg.max_stale:
            return None
        cached = await self._cached_manifest(entry.digest)
        if cached is None:
            return None
        await self.authorize_cached_offline(target, entry.digest)
        log.warning("serving stale tag %s/%s:%s (%s): %s", target.upstream.name, target.repo, tag,
                    entry.digest, why)
        return ManifestResult(entry.digest, cached[1], cached[0], Outcome.STALE)

    async def authorize_cached_offline(self, target: Target, digest: str) -> None:
        """With upstream down, serve only what this credential was already shown (public, or confirmed)."""
        up, repo = target.upstream.name, target.repo
        if not await self.metadata.has_link(up, repo, digest):  # never seen there: maybe another repo's secret
            if target.cfg.auth == "passthrough":
                raise unauthorized(target, "upstream unavailable and this content was never seen in this repository")
            raise errors.UpstreamUnavailable(f"upstream {up} unavailable and this content was never seen in {repo}",
                                             detail={"upstream": up})
        if target.cfg.auth != "passthrough":
            return
        # Upstream down: the last "public" answer holds a while longer, as stale tags do (max_stale).
        if await self.metadata.visibility(up, repo, stale_ok=target.cfg.max_stale) == "public":
            return
        cred = target.upstream.effective_credential(target.credential)
        if not await self.access.get(f"{up}|{repo}|{cred.key}"):
            raise unauthorized(target, "upstream unavailable and this credential is not confirmed")

    # blobs ------------------------------------------------------------------------
    async def blob(self, target: Target, digest: Digest, head: bool) -> BlobResult:
        key = str(digest)
        self.blocklist.check(key)
        flight = self.flights.get(key)
        if flight is not None and not head and not self.flights.spilled(key):
            # A download in progress here: attach at once (a cold storm's requests skip the index lookup,
            # which waits behind the index thread, busy with the download's own bookkeeping).
            return await self._follow(target, flight, digest)
        entry = await self.metadata.get_entry(key)
        if entry is not None:
            try:
                await self.authorize_cached(target, oci.Kind.BLOB, key)
            except errors.UpstreamUnavailable:
                await self.authorize_cached_offline(target, key)
            opened = await self._open_hit(digest)  # last: the open file is what gets sent
            if opened is not None:
                self.metadata.touch(key)
                return _hit(key, *opened)
            # Listed here but gone: another worker's eviction (or ``edgecache purge``) unlinked it.
            # A miss, never a 404: forget the entry unless the digest was committed again meanwhile.
            path = self.store.path(digest)
            if await self.metadata.drop_entry(key, only_if=lambda _stored: not path.exists()):
                log.info("%s was cached but its file is gone (evicted by another process): fetching it again", key)
        if head:
            return await self._head_blob(target, digest)
        if self.flights.spilled(key):  # disk full: this download cannot be joined from byte 0
            return await self._straight_through(target, digest)
        flight = self.flights.get(key)
        if flight is not None:
            return await self._follow(target, flight, digest)
        # One request per digest decides between leading and following (so that requests in this
        # process never mistake our own leader for another worker's); the others wait for that
        # decision all together (a lock would hand over one by one: a convoy in a cold storm).
        claim = self._starting.get(key)
        if claim is not None:
            await asyncio.shield(claim)
            return await self.blob(target, digest, head)
        claim = self._starting[key] = asyncio.get_running_loop().create_future()
        try:
            decided = await self._lead_or_follow_remote(target, digest)
        finally:
            del self._starting[key]
            claim.set_result(None)
        return await self._as_result(decided, digest)

    async def _open_hit(self, digest: Digest) -> tuple[int, int] | None:
        """A descriptor of the committed file (the caller closes it) and its size; None when it is gone.
        Small hot blobs come from :class:`HotFiles` without an executor round trip."""
        key = str(digest)
        found = self.hot.dup(key)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self.store.open_blob, digest)
        try:
            opened = await asyncio.shield(pending)
        except asyncio.CancelledError:  # the open still completes: close what it opens
            pending.add_done_callback(_close_opened)
            raise
        if opened is None:
            return None
        fd, size = opened
        return self.hot.offer(key, fd, size), size

    async def _committed_hit(self, target: Target, digest: Digest, size: int) -> BlobResult:
        """The verified file is there (another worker committed it): a hit, without re-entering blob()
        (we may hold this digest's lead decision, and blob() would wait for it)."""
        key = str(digest)
        self.metadata.forget_front(key)
        entry = await self.metadata.get_entry(key)
        if entry is None:
            await self.metadata.put_entry(key, size, oci.OCTET_STREAM)
        await self.authorize_cached(target, oci.Kind.BLOB, key)
        opened = await self._open_hit(digest)
        if opened is None:  # evicted the moment it was committed: let the client retry
            raise errors.UpstreamError("cached file vanished while being opened", detail={"digest": key})
        self.metadata.touch(key)
        return _hit(key, *opened)

    async def _as_result(self, decided: BlobResult | Flight, digest: Digest) -> BlobResult:
        if isinstance(decided, Flight):  # we lead: wait for the upstream's headers like any reader
            await decided.wait_ready()
            return self._flight_result(decided, digest, Outcome.MISS)
        return decided

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

    async def _straight_through(self, target: Target, digest: Digest) -> BlobResult:
        """No room on disk: relay the upstream body to this client, verified by nobody but the client."""
        resp = await target.upstream.request("GET", f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                             credential=target.credential)
        if resp.status != 200:
            resp.release()
            raise upstream_failure(resp, target, oci.Kind.BLOB, str(digest))
        length = resp.headers.get("Content-Length")
        return BlobResult(str(digest), int(length) if length and length.isdigit() else None, oci.OCTET_STREAM,
                          Outcome.MISS, direct=resp, release=resp.release)

    def far_ahead(self, result: BlobResult, start: int) -> bool:
        """Is a Range start so far past the download position that waiting would be silly?"""
        return isinstance(result.source, Flight) and start - result.source.written > DIRECT_RANGE_GAP

    async def direct_range(self, target: Target, digest: Digest, start: int, end: int) -> UpstreamResponse:
        """Fetch a range straight from upstream (not cached; the flight fills the cache)."""
        resp = await target.upstream.request("GET", f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                             credential=target.credential, headers={"Range": f"bytes={start}-{end}"})
        if resp.status != 206:
            resp.release()
            raise errors.UpstreamError(f"upstream {target.upstream.name} answered {resp.status} to a range request")
        return resp

    async def _head_blob(self, target: Target, digest: Digest) -> BlobResult:
        resp = await target.upstream.request("HEAD", f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                             credential=target.credential)
        resp.release()
        if resp.status != 200:
            raise upstream_failure(resp, target, oci.Kind.BLOB, str(digest))
        length = resp.headers.get("Content-Length")
        return BlobResult(str(digest), int(length) if length and length.isdigit() else None,
                          oci.OCTET_STREAM, Outcome.MISS)

    async def _follow(self, target: Target, flight: Flight, digest: Digest) -> BlobResult:
        up, repo, cred_key = flight.origin
        same = up == target.upstream.name and repo == target.repo
        if not (same and (target.cfg.auth != "passthrough" or cred_key == target.credential.key)):
            await self.authorize_cached(target, oci.Kind.BLOB, str(digest))
        await flight.wait_ready()
        return self._flight_result(flight, digest, Outcome.COLLAPSED)

    def _flight_result(self, flight: Flight, digest: Digest, outcome: Outcome) -> BlobResult:
        flight.readers += 1

        def release() -> None:
            flight.readers -= 1

        async def open_partial() -> int:
            if flight.read_fd is not None:
                return os.dup(flight.read_fd)  # no path lookup, no executor hop: a dup of the leader's fd
            return await self._run(self._open_fill, digest)

        return BlobResult(str(digest), flight.size, oci.OCTET_STREAM, outcome, source=flight,
                          open_partial=open_partial, release=release)

    def _open_fill(self, digest: Digest) -> int:
        """Open the growing file, or the committed one if the fill already finished."""
        fd = self.store.open_partial(digest)
        if fd is not None:
            return fd
        try:
            return os.open(self.store.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise errors.UpstreamError("download failed", detail={"digest": str(digest)}) from None

    async def _lead_or_follow_remote(self, target: Target, digest: Digest) -> BlobResult | Flight:
        lock = self.store.lock(digest)
        if await self._run(lock.try_acquire):
            size = await self._run(self.store.size, digest)
            if size is not None:  # committed meanwhile (another worker), verified before its rename
                await self._run(lock.release)
                return await self._committed_hit(target, digest, size)
            origin = (target.upstream.name, target.repo, target.credential.key)
            flight = self.flights.start(str(digest), origin, lambda f: self._download(f, target, digest, lock))
            self.metrics.flights.inc()
            return flight
        return await self._follow_remote(target, digest, lock)

    async def _follow_remote(self, target: Target, digest: Digest, lock: Any) -> BlobResult:
        """Another worker process downloads this digest: tail its partial file."""
        deadline = time.monotonic() + target.cfg.connect_timeout + target.cfg.read_timeout
        delay = 0.001
        while True:
            info = await self._run(self.store.fill_info, digest)
            fd = await self._run(self.store.open_partial, digest) if info else None
            if info is not None and fd is not None:
                break
            committed = await self._run(self.store.size, digest)
            if committed is not None:
                return await self._committed_hit(target, digest, committed)
            if await self._run(lock.try_acquire):  # the other worker gave up before starting
                await self._run(lock.release)
                return await self._as_result(await self._lead_or_follow_remote(target, digest), digest)
            if time.monotonic() > deadline:
                raise errors.UpstreamUnavailable("timed out waiting for another worker's download")
            await asyncio.sleep(delay)
            delay = min(0.02, delay * 2)
        try:
            await self.authorize_cached(target, oci.Kind.BLOB, str(digest))
        except BaseException:
            await self._run(os.close, fd)
            raise
        final = self.store.path(digest)
        if info.size < 0:  # the upstream sent no length: wait for the verified file, then serve it
            await self._run(os.close, fd)
            return await self._await_remote_commit(target, digest, lock, deadline)

        def probe() -> tuple[int, bool]:
            st = os.fstat(fd)
            if st.st_nlink == 0:  # the writer deleted it: failed (never hand out the last byte)
                return min(st.st_size, max(0, info.size - 1)), False
            try:
                committed = os.stat(final).st_ino == st.st_ino
            except FileNotFoundError:
                committed = False
            if committed:
                return st.st_size, True
            # Hold back the last byte until the writer verified and committed it.
            if lock.try_acquire():
                lock.release()
                return min(st.st_size, max(0, info.size - 1)), False
            return min(st.st_size, max(0, info.size - 1)), True

        source = RemoteFlight(info.size, lambda: self._run(probe))

        async def reopen() -> int:
            return await self._run(os.dup, fd)

        return BlobResult(str(digest), info.size, oci.OCTET_STREAM, Outcome.COLLAPSED, source=source,
                          open_partial=reopen, release=lambda: os.close(fd))

    async def _await_remote_commit(self, target: Target, digest: Digest, lock: Any, deadline: float) -> BlobResult:
        delay = 0.005
        while await self._run(self.store.size, digest) is None:
            if await self._run(lock.try_acquire):  # the writer is gone and nothing was committed
                await self._run(lock.release)
                if await self._run(self.store.size, digest) is None:
                    raise errors.UpstreamError("another worker's download failed", detail={"digest": str(digest)})
                break
            if time.monotonic() > deadline + 3600:
                raise errors.UpstreamUnavailable("timed out waiting for another worker's download")
            await asyncio.sleep(delay)  # cross-process: no event to wait on; bounded backoff
            delay = min(0.1, delay * 2)
        size = await self._run(self.store.size, digest)
        if size is None:
            raise errors.UpstreamError("another worker's download failed", detail={"digest": str(digest)})
        return await self._committed_hit(target, digest, size)

    async def _download(self, flight: Flight, target: Target, digest: Digest, lock: Any) -> None:
        """The app-owned fill: GET once, tee into the partial file while hashing, verify, commit.

        The lock is released and the partial removed *before* readers learn the result, so a
        request arriving right after a failure starts a fresh fill instead of joining a dead one.
        """
        key = str(digest)
        fd: int | None = None
        released = False

        async def release(abort: bool) -> None:
            nonlocal fd, released
            if abort:
                await self._run(self.store.abort_fill, digest)
            if fd is not None:
                await self._run(os.close, fd)
                fd = None
            if flight.read_fd is not None:
                os.close(flight.read_fd)  # readers hold their own dups
                flight.read_fd = None
            if not released:
                released = True
                await self._run(lock.release)
                self.metrics.flights.dec()

        try:
            resp = await target.upstream.request("GET", f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                                 credential=target.credential)
            if resp.status != 200:
                resp.release()
                await release(abort=False)
                flight.fail(upstream_failure(resp, target, oci.Kind.BLOB, key))
                return
            length = resp.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            await asyncio.gather(  # independent bookkeeping: do it at once, headers are waiting on it
                self.metadata.add_link(target.upstream.name, target.repo, key),
                self._remember_access(target, f"/v2/{target.repo}/blobs/{digest}"),
                self.evictor.make_room(size or 0))
            fd = await self._run(self.store.begin_fill, digest,
                                 FillInfo(size if size is not None else -1, oci.OCTET_STREAM))
            flight.read_fd = await self._run(self.store.open_partial, digest)
            flight.start(size, oci.OCTET_STREAM)
            hasher = digest.hasher()
            await self._stream_body(flight, target, digest, resp, fd, hasher, size)
            if (size is not None and flight.written != size) or hasher.hexdigest() != digest.hex:
                raise errors.DigestMismatch(f"upstream {target.upstream.name} sent bytes that do not match "
                                            f"{digest}", detail={"digest": key, "received": flight.written})
            if flight.spilled_at is not None:  # verified, delivered, but there was no room to keep it
                await release(abort=True)
                flight.size = flight.written
                flight.finish()
                return
            await self._run(os.fsync, fd)
            await self._run(self.store.commit_fill, digest)
            await self.metadata.put_entry(key, flight.written, oci.OCTET_STREAM)
            await release(abort=False)
            flight.size = flight.written
            flight.finish()
            self.evictor.kick()
        except Exception as e:
            log.warning("download of %s from %s failed: %s", key, target.upstream.name, e)
            await release(abort=True)
            flight.fail(e)
        except BaseException:  # cancelled at shutdown
            await asyncio.shield(release(abort=True))
            flight.fail(errors.ServiceUnavailable("shutting down"))
            raise

    async def _stream_body(self, flight: Flight, target: Target, digest: Digest, resp: UpstreamResponse,
                           fd: int, hasher: "hashlib._Hash", size: int | None) -> None:
        """Copy the body to the file; on an interrupted body resume with Range where the upstream allows."""
        resumes = 0
        while True:
            try:
                await self._copy(flight, target, resp, fd, hasher)
                return
            except errors.UpstreamError:
                if size is None or flight.written >= size or resumes >= MAX_RESUMES:
                    raise
            finally:
                resp.release()
            resumes += 1
            log.info("resuming %s from byte %d (attempt %d)", digest, flight.written, resumes)
            resp = await target.upstream.request("GET", f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                                 credential=target.credential,
                                                 headers={"Range": f"bytes={flight.written}-"})
            if resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {flight.written}-"):
                resp.release()
                raise errors.UpstreamError(f"upstream {target.upstream.name} cannot resume {digest}")

    async def _copy(self, flight: Flight, target: Target, resp: UpstreamResponse, fd: int,
                    hasher: "hashlib._Hash") -> None:
        counter = self.metrics.upstream_bytes.labels(target.upstream.name)
        tee = Tee(fd, hasher, flight, self.evictor.free)
        try:
            async for chunk in resp.iter_chunks():
                counter.inc(len(chunk))
                await tee.feed(chunk)
        finally:
            await tee.drain()


def _maybe_digest(text: str | None) -> Digest | None:
    if not text:
        return None
    try:
        return Digest.parse(text)
    except errors.OCIError:
        return None
