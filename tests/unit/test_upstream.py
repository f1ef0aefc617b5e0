"""The upstream client's token locks: one per (scope, credential) while in use, none left after."""

from __future__ import annotations

import asyncio

import pytest
from aiocache import Cache

from edgecache import errors
from edgecache.config import UpstreamConfig
from edgecache.upstream import Credential, UpstreamClient

CHALLENGE = 'Bearer realm="https://auth.example/token",service="registry.example"'


async def test_token_locks_do_not_grow_with_distinct_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passthrough sees every client's credential: a lock per credential must go when nobody holds or
    awaits it, including after a refused or cancelled token fetch."""
    client = UpstreamClient(UpstreamConfig("up", "https://registry.example"), Cache(Cache.MEMORY))
    creds = [Credential.basic(f"user{i}", "pw") for i in range(300)]
    refused = {c.key for c in creds[::3]}
    all_fetching, release = asyncio.Event(), asyncio.Event()
    fetches: list[str] = []

    async def fetch_token(realm: str, service: str | None, scope: str, cred: Credential) -> tuple[str, float]:
        fetches.append(cred.key)
        if len(fetches) == len(creds):
            all_fetching.set()
        await release.wait()
        if cred.key in refused:
            raise errors.Unauthorized("credentials refused by token server")
        return f"token-for-{cred.key}", 60.0

    monkeypatch.setattr(client, "fetch_token", fetch_token)
    calls = [asyncio.ensure_future(client._answer_challenge(CHALLENGE, "repository:r:pull", c))
             for c in creds for _ in range(2)]  # two requests per credential: one fetches, one waits
    await asyncio.wait_for(all_fetching.wait(), 10)
    assert len(client._token_locks) == len(creds)  # in use: one lock per credential, shared by both
    cancelled = calls[1]  # a waiter whose client went away
    cancelled.cancel()
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert len(fetches) == len(creds) + len(refused) - 1  # a refusal is not shared: the waiter asks again
    assert sum(isinstance(r, errors.Unauthorized) for r in results) == 2 * len(refused) - 1
    assert results[2] == results[3] == f"Bearer token-for-{creds[1].key}"  # one fetch, shared
    assert len(client._token_locks) == 0
    await client._tokens.close()
