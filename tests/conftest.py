"""Root fixtures: real registries (plain and token-auth), the token server and taps.

Session fixtures are synchronous; async seeding runs via :func:`run_async`
(``asyncio.run`` in a helper thread, so it works whether or not a loop runs).
edgecache fixtures live in ``tests/support/edge.py`` and are imported where needed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.registry import ProxyConfig, RegistryProcess, TokenAuthConfig
from tests.support.seed import seed_auth_images, seed_images, token_for_user
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a coroutine to completion on a fresh loop in a helper thread."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, name="run-async")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError("run_async: coroutine did not finish")
    if error:
        raise error[0]
    return result[0]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A plain (no auth) registry, seeded once; ``registry.seeded`` is a :class:`tests.support.seed.Seeded`."""
    reg = RegistryProcess(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        reg.seeded = run_async(seed_images(reg.url))
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """The Docker token server (users alice/bob/mallory) in its own thread."""
    ts = TokenServer(tmp_path_factory.mktemp("token"))
    ts.start()
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[RegistryProcess]:
    """Token-auth registry seeded as alice; ``.seeded`` is an :class:`tests.support.seed.AuthSeeded`."""
    auth = TokenAuthConfig(token_server.realm, token_server.service, token_server.issuer, token_server.cert_file)
    reg = RegistryProcess(tmp_path_factory.mktemp("token-registry"), token_auth=auth)
    reg.start()
    try:
        reg.seeded = run_async(seed_auth_images(reg.url, token_for_user(reg.url, "alice", "alicepw")))
        token_server.clear()
        yield reg
    finally:
        reg.stop()


RegistryFactory = Callable[..., RegistryProcess]


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Start throwaway registries (e.g. to stop/restart, or distribution's proxy mode); stopped at the end.

    ``registry_factory(token_auth=None, proxy=None)`` or ``registry_factory(proxy=ProxyConfig(url))``.
    """
    started: list[RegistryProcess] = []

    def factory(*, token_auth: TokenAuthConfig | None = None, proxy: ProxyConfig | None = None) -> RegistryProcess:
        reg = RegistryProcess(tmp_path / f"registry{len(started)}", token_auth=token_auth, proxy=proxy)
        started.append(reg)
        reg.start()
        return reg

    yield factory
    for reg in reversed(started):
        reg.stop()


TapFactory = Callable[[str], Awaitable[Tap]]


@pytest.fixture
async def make_tap() -> AsyncIterator[TapFactory]:
    """``await make_tap(upstream_url)`` -> a started :class:`Tap`; all stopped at teardown."""
    taps: list[Tap] = []

    async def factory(upstream_url: str) -> Tap:
        tap = await Tap(upstream_url).start()
        taps.append(tap)
        return tap

    yield factory
    for tap in reversed(taps):
        await tap.stop()


@pytest.fixture
async def tap(make_tap: TapFactory, registry: RegistryProcess) -> Tap:
    """A tap in front of the seeded plain registry."""
    return await make_tap(registry.url)
