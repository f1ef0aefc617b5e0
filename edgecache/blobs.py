"""The blob side of the pull-through policy (DESIGN.md §2 Flight), owned by ``PullThrough``.

A hit is the committed file, opened; a miss joins the download in progress here, tails another
worker's partial file, or leads the cold fill (GET once, tee into the partial file while hashing,
resume with Range, verify, commit). With no room on disk the upstream body is relayed straight
through; a Range far past the download position is fetched directly. Access: :mod:`edgecache.tenancy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import errors, oci
from .collapse import Flight, Flights, RemoteFlight
from .evictor import Evictor
from .fill import Tee
from .metadata import Metadata
from .metrics import Metrics
from .oci import Digest
from .results import BlobResult, Outcome, Target, upstream_failure
from .storage import BlobStore, FillInfo
from .tenancy import Tenancy
from .upstream import UpstreamResponse

log = logging.getLogger("edgecache.pullthrough")  # the policy's logger, as before the blob path had its own module
T = TypeVar("T")

MAX_RESUMES = 3
# A Range that starts this far past the download position is fetched directly.
DIRECT_RANGE_GAP = 64 << 20


async def _request(target: Target, digest: Digest, method: str = "GET",
                   headers: dict[str, str] | None = None) -> UpstreamResponse:
    """The blob from ``target``'s upstream, with the client's credential and the repository's pull scope."""
    return await target.upstream.request(method, f"/v2/{target.repo}/blobs/{digest}", scope=target.scope,
                                         credential=target.credential, headers=headers)


def _hit(key: str, fd: int, size: int) -> BlobResult:
    return BlobResult(key, size, oci.OCTET_STREAM, Outcome.HIT, fd=fd, release=lambda: os.close(fd))


def _close_opened(f: "asyncio.Future[tuple[int, int] | None]") -> None:
    if not f.cancelled() and f.exception() is None:
        opened = f.result()
        if opened is not None:
            os.close(opened[0])


class Blobs:
    """Blob hits, collapsed downloads and the cold fill, over the store and the upstreams."""

    def __init__(self, store: BlobStore, metadata: Metadata, flights: Flights, metrics: Metrics, evictor: Evictor,
                 tenancy: Tenancy, check: Callable[[str], None]) -> None:
        self.store = store
        self.hot = evictor.hot  # the evictor closes what it evicts
        self.metadata = metadata
        self.flights = flights
        self.metrics = metrics
        self.evictor = evictor
        self.tenancy = tenancy
        self._check = check  # the owner's blocklist check, looked up per call (the app replaces the blocklist)
        self._starting: dict[str, asyncio.Future[None]] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def blob(self, target: Target, digest: Digest, head: bool) -> BlobResult:
        key = str(digest)
        self._check(key)
        flight = self.flights.get(key)
        if flight is not None and not head and not self.flights.spilled(key):
            # A download in progress here: attach at once (a cold storm's requests skip the index lookup,
            # which waits behind the index thread, busy with the download's own bookkeeping).
            return await self._follow(target, flight, digest)
        entry = await self.metadata.get_entry(key)
        if entry is not None:
            try:
                await self.tenancy.authorize_cached(target, oci.Kind.BLOB, key)
            except errors.UpstreamUnavailable:
                await self.tenancy.authorize_cached_offline(target, key)
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
        await self.tenancy.authorize_cached(target, oci.Kind.BLOB, key)
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

    async def _straight_through(self, target: Target, digest: Digest) -> BlobResult:
        """No room on disk: relay the upstream body to this client, verified by nobody but the client."""
        resp = await _request(target, digest)
        if resp.status != 200:
            resp.release()
            raise upstream_failure(resp, target, oci.Kind.BLOB, str(digest))
        return BlobResult(str(digest), resp.length, oci.OCTET_STREAM, Outcome.MISS, direct=resp, release=resp.release)

    def far_ahead(self, result: BlobResult, start: int) -> bool:
        """Is a Range start so far past the download position that waiting would be silly?"""
        return isinstance(result.source, Flight) and start - result.source.written > DIRECT_RANGE_GAP

    async def direct_range(self, target: Target, digest: Digest, start: int, end: int) -> UpstreamResponse:
        """Fetch a range straight from upstream (not cached; the flight fills the cache)."""
        resp = await _request(target, digest, headers={"Range": f"bytes={start}-{end}"})
        if resp.status != 206:
            resp.release()
            raise errors.UpstreamError(f"upstream {target.upstream.name} answered {resp.status} to a range request")
        return resp

    async def _head_blob(self, target: Target, digest: Digest) -> BlobResult:
        resp = await _request(target, digest, "HEAD")
        resp.release()
        if resp.status != 200:
            raise upstream_failure(resp, target, oci.Kind.BLOB, str(digest))
        return BlobResult(str(digest), resp.length, oci.OCTET_STREAM, Outcome.MISS)

    async def _follow(self, target: Target, flight: Flight, digest: Digest) -> BlobResult:
        up, repo, cred_key = flight.origin
        same = up == target.upstream.name and repo == target.repo
        if not (same and (target.cfg.auth != "passthrough" or cred_key == target.credential.key)):
            await self.tenancy.authorize_cached(target, oci.Kind.BLOB, str(digest))
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
            await self.tenancy.authorize_cached(target, oci.Kind.BLOB, str(digest))
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
            resp = await _request(target, digest)
            if resp.status != 200:
                resp.release()
                await release(abort=False)
                flight.fail(upstream_failure(resp, target, oci.Kind.BLOB, key))
                return
            size = resp.length
            await asyncio.gather(  # independent bookkeeping: do it at once, headers are waiting on it
                self.metadata.add_link(target.upstream.name, target.repo, key),
                self.tenancy.remember_access(target, f"/v2/{target.repo}/blobs/{digest}"),
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
            resp = await _request(target, digest, headers={"Range": f"bytes={flight.written}-"})
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

