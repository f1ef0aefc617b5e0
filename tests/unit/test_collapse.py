"""Flights and single-flight calls, driven by events (no sleeps)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgecache.collapse import Flight, FlightFailed, Flights, RemoteFlight, SingleFlight, State
from edgecache.tasks import TaskOwner


async def collect(flight: Any, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    return [span async for span in flight.spans(start, end)]


async def test_reader_sees_bytes_as_they_land_and_ends_after_commit() -> None:
    f = Flight("k", ("up", "repo", "anon"))
    f.start(10, "application/octet-stream")
    reader = asyncio.ensure_future(collect(f))
    f.advance(4)
    await asyncio.sleep(0)
    f.advance(6)
    await asyncio.sleep(0)
    assert not reader.done()  # all bytes landed but not verified yet
    f.finish()
    spans = await reader
    assert sum(n for _, n in spans) == 10 and spans[0][0] == 0


async def test_failure_cuts_every_reader() -> None:
    f = Flight("k", ("up", "repo", "anon"))
    f.start(10, "x")
    readers = [asyncio.ensure_future(collect(f)) for _ in range(3)]
    f.advance(5)
    await asyncio.sleep(0)
    f.fail(RuntimeError("digest mismatch"))
    for r in readers:
        with pytest.raises(FlightFailed):
            await r


async def test_range_reader_stops_at_its_end() -> None:
    f = Flight("k", ("up", "repo", "anon"))
    f.start(100, "x")
    f.advance(50)
    assert await collect(f, 10, 19) == [(10, 10)]


async def test_wait_ready_reraises_upstream_error() -> None:
    f = Flight("k", ("up", "repo", "anon"))
    f.fail(KeyError("404"))
    with pytest.raises(KeyError):
        await f.wait_ready()


async def test_flights_registry_runs_once_and_clears() -> None:
    owner = TaskOwner()
    flights = Flights(owner.spawn)
    gate = asyncio.Event()

    async def run(f: Flight) -> None:
        f.start(1, "x")
        await gate.wait()
        f.advance(1)
        f.finish()

    f = flights.start("d", ("u", "r", "c"), run)
    assert flights.get("d") is f
    gate.set()
    await owner.drain("flight:", 5)
    assert flights.get("d") is None and f.state is State.DONE
    await owner.close()


async def test_remote_flight_polls_until_committed() -> None:
    on_disk = [0]
    alive = [True]

    async def probe() -> tuple[int, bool]:
        on_disk[0] = min(on_disk[0] + 3, 9)
        return on_disk[0], alive[0]

    spans = await collect(RemoteFlight(9, probe))
    assert sum(n for _, n in spans) == 9


async def test_remote_flight_fails_when_writer_dies() -> None:
    async def probe() -> tuple[int, bool]:
        return 4, False

    with pytest.raises(FlightFailed):
        await collect(RemoteFlight(9, probe))


async def test_single_flight_collapses() -> None:
    sf: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    tasks = [asyncio.ensure_future(sf.do("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [42] * 10
    assert calls == 1 and sf.collapsed == 9


async def test_single_flight_shares_errors() -> None:
    sf: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def boom() -> int:
        await gate.wait()
        raise ValueError("upstream down")

    tasks = [asyncio.ensure_future(sf.do("k", boom)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
