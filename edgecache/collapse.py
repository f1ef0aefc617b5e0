"""One download per digest, however many readers: flights and single-flight calls.

A :class:`Flight` is the shared state of one fill in progress: how many bytes
have landed in the growing ``.partial`` file, whether it ended and how. The
download itself is an app-owned task (the policy provides its body); readers
only wait for bytes with :meth:`Flight.spans`. A :class:`RemoteFlight` gives
the same interface for a fill run by another worker process, learned by
polling the shared file (DESIGN §2 Flight). :class:`SingleFlight` collapses
concurrent coroutine calls with the same key (tag revalidation, manifests).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
MIN_SPAN = 1 << 20


class State(enum.Enum):
    STARTING = "starting"  # upstream asked, headers not yet back
    RUNNING = "running"  # bytes are landing in the partial file
    DONE = "done"  # verified and committed
    FAILED = "failed"


class FlightFailed(Exception):
    """The fill this reader was attached to failed; its stream must be cut."""


class Source(Protocol):
    """What a reader needs from a fill, local or in another process."""

    size: int | None

    def spans(self, start: int, end: int | None) -> AsyncIterator[tuple[int, int]]: ...

    def memory(self, offset: int, count: int) -> bytes | None: ...


class Flight:
    """The state of one in-process fill, shared by every reader."""

    def __init__(self, key: str, origin: tuple[str, str, str]) -> None:
        self.key = key
        self.origin = origin  # (upstream, repository, credential key) of the request that started it
        self.state = State.STARTING
        self.size: int | None = None
        self.media_type = "application/octet-stream"
        self.written = 0
        self.error: BaseException | None = None
        self.readers = 0
        self.read_fd: int | None = None  # the leader's read-only fd of the partial file; readers dup it
        # Disk full mid-download: bytes from ``spilled_at`` on are kept in memory (bounded) and the
        # fill is served straight through to the readers already attached, never committed.
        self.spilled_at: int | None = None
        self._tail = bytearray()
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()

    # writer side -------------------------------------------------------------
    def start(self, size: int | None, media_type: str) -> None:
        self.size, self.media_type, self.state = size, media_type, State.RUNNING
        self._ready.set()
        self._wake()

    def advance(self, n: int) -> None:
        self.written += n
        self._wake()

    def spill(self) -> None:
        """The disk is full: from here on, bytes live in memory only (see :meth:`memory`)."""
        if self.spilled_at is None:
            self.spilled_at = self.written

    def append_memory(self, data: bytes) -> None:
        self._tail += data
        self.advance(len(data))

    @property
    def memory_bytes(self) -> int:
        return len(self._tail)

    def memory(self, offset: int, count: int) -> bytes | None:
        """The bytes of a span past the spill point (None: read them from the file)."""
        if self.spilled_at is None or offset < self.spilled_at:
            return None
        i = offset - self.spilled_at
        return bytes(self._tail[i:i + count])

    def finish(self) -> None:
        self.state = State.DONE
        self._ready.set()
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.state, self.error = State.FAILED, error
        self._ready.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # reader side ---------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Wait until headers are known (size, media type) or the fill failed; re-raise its error."""
        await self._ready.wait()
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error

    async def spans(self, start: int, end: int | None) -> AsyncIterator[tuple[int, int]]:
        """Yield (offset, count) spans of the file as they land, from ``start`` to ``end`` inclusive."""
        pos = start
        while True:
            limit = self.written if end is None else min(self.written, end + 1)
            if self.state is not State.DONE:
                # Hold back the last byte until the whole blob is verified: a corrupt fill must
                # never reach a client as a complete body (DESIGN §2 Flight).
                limit = min(limit, (self.size if self.size is not None else self.written) - 1)
            if self.spilled_at is not None and pos < self.spilled_at:
                limit = min(limit, self.spilled_at)  # a span is all file or all memory
            # After the first bytes (time to first byte matters), send in spans of at least MIN_SPAN:
            # every span is one sendfile call per reader, and 32 readers x 64 KiB chunks is a lot of calls.
            more_coming = self.state is State.RUNNING and (self.size is None or limit < self.size - 1)
            at_spill = self.spilled_at is not None and limit == self.spilled_at
            if pos < limit and (at_spill or not (pos > start and limit - pos < MIN_SPAN and more_coming
                                                 and (end is None or limit <= end))):
                yield pos, limit - pos
                pos = limit
                continue
            if self.state is State.FAILED:
                raise FlightFailed(str(self.error))
            if self.state is State.DONE or (end is not None and pos > end):
                return
            await self._changed.wait()


class RemoteFlight:
    """A fill run by another worker process, followed by polling the shared file.

    ``probe`` returns (bytes on disk, still alive): alive is False once the
    writer deleted the file (nlink 0) or died (its lock became free) before
    the end.
    """

    POLL_MIN, POLL_MAX = 0.001, 0.02

    def __init__(self, size: int | None, probe: Callable[[], Awaitable[tuple[int, bool]]]) -> None:
        self.size = size
        self._probe = probe

    def memory(self, offset: int, count: int) -> bytes | None:
        return None

    async def spans(self, start: int, end: int | None) -> AsyncIterator[tuple[int, int]]:
        pos, delay = start, self.POLL_MIN
        stop = (self.size if end is None else end + 1) if self.size is not None else None
        while stop is None or pos < stop:
            on_disk, alive = await self._probe()
            limit = on_disk if stop is None else min(on_disk, stop)
            if pos < limit:
                yield pos, limit - pos
                pos, delay = limit, self.POLL_MIN
                continue
            if not alive:
                if self.size is None and on_disk == pos:
                    return
                raise FlightFailed("the fill in another worker failed")
            await asyncio.sleep(delay)  # cross-process: no event to wait on; bounded backoff
            delay = min(self.POLL_MAX, delay * 2)


class Flights:
    """The in-process registry of fills, one per key; the tasks are app-owned."""

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]) -> None:
        self._spawn = spawn
        self._flights: dict[str, Flight] = {}

    def get(self, key: str) -> Flight | None:
        """The running flight for ``key``; an ended one is never joined (its task may still be cleaning up)."""
        flight = self._flights.get(key)
        return flight if flight is not None and flight.state in (State.STARTING, State.RUNNING) else None

    def spilled(self, key: str) -> bool:
        """A fill for ``key`` runs but no longer lands on disk: a new reader cannot join it."""
        flight = self.get(key)
        return flight is not None and flight.spilled_at is not None

    def __len__(self) -> int:
        return len(self._flights)

    def start(self, key: str, origin: tuple[str, str, str], run: Callable[[Flight], Coroutine[Any, Any, None]]) -> Flight:
        """Register a new flight and spawn its download; it is removed when the download ends."""
        assert self.get(key) is None
        flight = Flight(key, origin)
        self._flights[key] = flight

        async def owned() -> None:
            try:
                await run(flight)
            except BaseException as e:  # the runner should have failed the flight; make sure
                if flight.state not in (State.DONE, State.FAILED):
                    flight.fail(e if isinstance(e, Exception) else FlightFailed("cancelled"))
                if not isinstance(e, Exception):
                    raise
            finally:
                if flight.state not in (State.DONE, State.FAILED):
                    flight.fail(FlightFailed("download ended without a result"))
                if self._flights.get(key) is flight:
                    del self._flights[key]

        self._spawn(owned(), f"flight:{key}")
        return flight


class SingleFlight(Generic[T]):
    """Collapse concurrent calls with the same key into one (golang's singleflight)."""

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[T]] = {}
        self.collapsed = 0

    def in_flight(self, key: str) -> bool:
        return key in self._calls

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        fut = self._calls.get(key)
        if fut is not None:
            self.collapsed += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._calls[key] = fut
        try:
            result = await fn()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: followers may be none
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            self._calls.pop(key, None)
