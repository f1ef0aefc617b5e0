"""The download's writer: upstream bytes written to the partial file and hashed in a thread.

The event loop keeps reading the upstream socket while the previous piece is written; a full disk
evicts, retries once, and otherwise keeps the rest of the blob in memory for the readers already
attached (DESIGN §2 Flight, survival of a full disk).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

from . import errors
from .collapse import Flight

log = logging.getLogger("edgecache.fill")


class DiskFull(Exception):
    """The cache filesystem is full (ENOSPC/EDQUOT) after ``written`` bytes of a write."""

    def __init__(self, written: int) -> None:
        super().__init__(f"cache disk full after {written} bytes")
        self.written = written


class Tee:
    """Writes and hashes the body in a thread while the loop keeps reading the socket.

    One write is in flight at a time (so the hash sees bytes in order); whatever arrives meanwhile
    is written next, as one piece. Readers are told about bytes only once they are in the file.
    When the disk fills up: evict, retry once, and if it is still full keep the rest in memory
    (bounded) so the readers already attached get their download straight through, uncached.
    """

    MAX_BUFFER = 8 << 20  # past this, reading waits for the disk (memory stays bounded)
    MAX_SPILL = 256 << 20  # disk full: at most this much of a blob is held in memory

    def __init__(self, fd: int, hasher: "hashlib._Hash", flight: Flight,
                 free_space: Callable[[int], Awaitable[int]]) -> None:
        self.fd, self.hasher, self.flight = fd, hasher, flight
        self.free_space = free_space
        self.buf: list[bytes] = []
        self.buffered = 0
        self.pending: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.unwritten: bytes | None = None  # the rest of a write that hit a full disk

    async def feed(self, chunk: bytes) -> None:
        if self.error is not None:  # a write failed (EIO...): stop reading instead of buffering the rest
            raise self.error
        if self.flight.spilled_at is not None:
            self._to_memory(chunk)
            return
        self.buf.append(chunk)
        self.buffered += len(chunk)
        if self.unwritten is not None:
            await self._recover()
        elif self.pending is None:
            self._submit()
        elif self.buffered > self.MAX_BUFFER:
            await self._wait_pending()

    def _to_memory(self, data: bytes) -> None:
        if self.flight.memory_bytes + len(data) > self.MAX_SPILL:
            raise errors.ServiceUnavailable("cache disk full and the blob is too large to pass through from memory")
        self.hasher.update(data)
        self.flight.append_memory(data)

    def _submit(self) -> None:
        if self.error is not None or not self.buf or self.unwritten is not None:
            return
        data = b"".join(self.buf) if len(self.buf) > 1 else self.buf[0]
        self.buf.clear()
        self.buffered = 0
        fut = asyncio.get_running_loop().run_in_executor(None, _write_all, self.fd, data, self.hasher)
        self.pending = fut
        fut.add_done_callback(lambda f: self._written(f, data))

    def _written(self, fut: "asyncio.Future[None]", data: bytes) -> None:
        self.pending = None
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, DiskFull):
            self.flight.advance(exc.written)
            self.unwritten = data[exc.written:]
            return
        if fut.cancelled() or exc is not None:
            self.error = exc or asyncio.CancelledError()
            return
        self.flight.advance(len(data))
        self._submit()  # the bytes that arrived meanwhile, even if the upstream now stalls

    async def _recover(self) -> None:
        """Disk full: free space and retry once; else spill the rest to memory."""
        assert self.unwritten is not None
        data, self.unwritten = self.unwritten + b"".join(self.buf), None
        self.buf.clear()
        self.buffered = 0
        remaining = (self.flight.size or 0) - self.flight.written
        freed = await self.free_space(max(remaining, len(data)))
        log.warning("cache disk full: evicted %d bytes for %s", freed, self.flight.key)
        try:
            await asyncio.get_running_loop().run_in_executor(None, _write_all, self.fd, data, self.hasher)
            self.flight.advance(len(data))
        except DiskFull as e:
            self.flight.advance(e.written)
            self.flight.spill()
            log.warning("cache disk still full: %s is served straight through from memory, not cached",
                        self.flight.key)
            self._to_memory(data[e.written:])

    async def _wait_pending(self) -> None:
        while self.pending is not None:
            try:
                await asyncio.shield(self.pending)
            except Exception:
                pass  # recorded by _written
            await asyncio.sleep(0)  # let the done callback run
        if self.error is not None:
            raise self.error

    async def drain(self) -> None:
        """Wait until every byte fed is written (or raise the write error)."""
        await self._wait_pending()
        if self.unwritten is not None:
            await self._recover()
        if self.buf and self.flight.spilled_at is None:
            self._submit()
            await self._wait_pending()
            if self.unwritten is not None:
                await self._recover()
        elif self.buf:
            for chunk in self.buf:
                self._to_memory(chunk)
            self.buf.clear()


def _write_all(fd: int, data: bytes, hasher: "hashlib._Hash") -> None:
    view = memoryview(data)
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, view[done:])
    except OSError as e:
        hasher.update(view[:done])
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(done) from e
        raise
    hasher.update(data)
