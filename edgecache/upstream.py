"""The upstream registry client: one per configured upstream.

Owns the aiohttp session (no automatic decompression: digests are over the
bytes as stored), timeouts, the Bearer/Basic challenge flow with a token cache,
redirects followed by hand (``Authorization`` never crosses to another host),
retries of idempotent requests with backoff honouring ``Retry-After``, and the
mapping of transport failures into :mod:`edgecache.errors` at this boundary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
import orjson
from aiocache import BaseCache

from . import errors
from .config import UpstreamConfig

log = logging.getLogger("edgecache.upstream")

USER_AGENT = "edgecache/0.1 (+https://github.com/edgecache)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_MAX_REDIRECTS = 5
_MAX_RETRY_AFTER = 10.0
_DEFAULT_TOKEN_TTL = 60.0
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@dataclass(frozen=True, slots=True)
class Credential:
    """What a request presents upstream: nothing, Basic user:password, or a Bearer token."""

    scheme: str  # "anonymous" | "basic" | "bearer"
    value: str = ""  # base64 user:password, or the token

    @classmethod
    def from_header(cls, header: str | None) -> Credential:
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "basic" and value:
                return cls("basic", value.strip())
            if scheme.lower() == "bearer" and value:
                return cls("bearer", value.strip())
        return ANONYMOUS

    @classmethod
    def basic(cls, user: str, password: str) -> Credential:
        return cls("basic", base64.b64encode(f"{user}:{password}".encode()).decode())

    @property
    def anonymous(self) -> bool:
        return self.scheme == "anonymous"

    @property
    def key(self) -> str:
        """A hash that identifies the credential without revealing it."""
        if self.anonymous:
            return "anonymous"
        return hashlib.sha256(f"{self.scheme}:{self.value}".encode()).hexdigest()[:32]

    @property
    def header(self) -> str:
        return f"Basic {self.value}" if self.scheme == "basic" else f"Bearer {self.value}"

    def __repr__(self) -> str:  # never print the secret
        return f"Credential({self.scheme}, {self.key[:8]})"


ANONYMOUS = Credential("anonymous")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``WWW-Authenticate: Bearer realm="..",service=".."`` (RFC 7235)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


class UpstreamResponse:
    """An upstream response whose body has not been read yet; release it when done."""

    def __init__(self, resp: aiohttp.ClientResponse, upstream: str) -> None:
        self._resp = resp
        self.upstream = upstream
        self.status = resp.status
        self.headers = resp.headers

    @property
    def length(self) -> int | None:
        """The declared body length; None when absent or not a plain number."""
        value = self.headers.get("Content-Length")
        return int(value) if value and value.isdigit() else None

    async def read(self, limit: int) -> bytes:
        """Read the whole body, refusing more than ``limit`` bytes."""
        declared = self._resp.content_length
        if declared is not None and declared > limit:
            raise errors.SizeInvalid("manifest too large", detail={"size": declared, "limit": limit})
        chunks: list[bytes] = []
        total = 0
        async for chunk in self.iter_chunks():
            total += len(chunk)
            if total > limit:
                raise errors.SizeInvalid("manifest too large", detail={"limit": limit})
            chunks.append(chunk)
        return b"".join(chunks)

    async def iter_chunks(self) -> Any:
        try:
            while True:
                chunk = await self._resp.content.readany()
                if not chunk:
                    break
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise errors.UpstreamError(f"upstream {self.upstream}: body interrupted ({type(e).__name__})") from e
        if self._resp.content_length is not None and not self._resp.content.is_eof():
            raise errors.UpstreamError(f"upstream {self.upstream}: body ended early")

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class KeyedLocks:
    """One asyncio lock per key, kept only while a task holds or awaits it.

    Token fetches are serialised per (scope, credential), and in passthrough mode every client
    brings its own credential: a plain dict of locks would grow with every one ever seen.
    """

    @dataclass(slots=True)
    class _Entry:
        lock: asyncio.Lock
        users: int = 0  # tasks holding or awaiting the lock

    def __init__(self) -> None:
        self._entries: dict[str, KeyedLocks._Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = KeyedLocks._Entry(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:  # also when cancelled while waiting
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]


class UpstreamClient:
    """The one client for one upstream registry."""

    def __init__(self, cfg: UpstreamConfig, tokens: BaseCache, on_request: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._tokens = tokens
        self._session: aiohttp.ClientSession | None = None
        self._token_locks = KeyedLocks()
        self._on_request = on_request  # callback(upstream, method, status|None, seconds, error_kind|None)
        self._config_credential: Credential | None = None
        self.ratelimit_remaining: float | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout)
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False,
            headers={"User-Agent": USER_AGENT}, cookie_jar=aiohttp.DummyCookieJar())
        if self.cfg.auth == "credentials":
            self._config_credential = Credential.basic(self.cfg.username or "", self.cfg.password() or "")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamClient.start() not called"
        return self._session

    def effective_credential(self, client: Credential) -> Credential:
        """The credential a request presents upstream under this upstream's auth mode."""
        if self.cfg.auth == "credentials":
            assert self._config_credential is not None
            return self._config_credential
        if self.cfg.auth == "passthrough":
            return client
        return ANONYMOUS

    async def request(self, method: str, path: str, *, scope: str, credential: Credential,
                      headers: Mapping[str, str] | None = None, query: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send an idempotent request, answering auth challenges and retrying transient failures.

        Returns the response once its headers arrived; 401/403/404/429 come back as
        responses for the policy to interpret; transport failures raise.
        """
        if self.cfg.upstream_ns:  # a tiered edgecache routes by ns= like containerd does
            query = {**(query or {}), "ns": self.cfg.upstream_ns}
        url = self.cfg.url + path + (("?" + urlencode(query)) if query else "")
        attempt = 0
        while True:
            try:
                resp = await self._authorized(method, url, scope, credential, dict(headers or {}))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._record(method, None, 0.0, type(e).__name__)
                if attempt >= self.cfg.retries:
                    raise errors.UpstreamUnavailable(
                        f"upstream {self.name} unreachable: {type(e).__name__}", detail={"upstream": self.name}) from e
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            delay = self._retry_delay(resp, attempt)
            if delay is None:
                return resp
            resp.release()
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, resp: UpstreamResponse, attempt: int) -> float | None:
        if attempt >= self.cfg.retries:
            return None
        if resp.status in _RETRY_STATUS:
            return _backoff(attempt)
        if resp.status == 429:
            after = _retry_after(resp.headers.get("Retry-After"))
            # Only wait briefly here; a long Retry-After goes back to the client (or serves stale).
            if after is not None and after <= _MAX_RETRY_AFTER and attempt == 0:
                return after
        return None

    async def _authorized(self, method: str, url: str, scope: str, credential: Credential,
                          headers: dict[str, str]) -> UpstreamResponse:
        cred = self.effective_credential(credential)
        auth = await self._cached_auth(scope, cred)
        resp = await self._send(method, url, headers, auth)
        if resp.status != 401 or cred.scheme == "bearer":
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        if auth is not None and "insufficient_scope" in challenge:
            return resp  # a valid token without access (RFC 6750 §3.1): a new one would say the same
        if auth is not None:  # the cached token was refused (expired, revoked): forget it, get a new one
            await self._tokens.delete(self._token_key(scope, cred))
        try:
            new_auth = await self._answer_challenge(challenge, scope, cred, refused=auth)
        except BaseException:
            resp.release()
            raise
        if new_auth is None or new_auth == auth:
            return resp  # nothing new to present: the 401 is the answer (no identical resend)
        resp.release()
        return await self._send(method, url, headers, new_auth)

    async def _cached_auth(self, scope: str, cred: Credential) -> str | None:
        if cred.scheme == "bearer":
            return cred.header
        value = await self._tokens.get(self._token_key(scope, cred))
        return value if isinstance(value, str) else None

    def _token_key(self, scope: str, cred: Credential) -> str:
        return f"{self.name}|{scope}|{cred.key}"

    async def _answer_challenge(self, challenge: str, scope: str, cred: Credential, refused: str | None = None) -> str | None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            return cred.header if cred.scheme == "basic" else None
        if scheme != "bearer" or "realm" not in params:
            return None
        key = self._token_key(scope, cred)
        async with self._token_locks.hold(key):  # one token fetch per (scope, credential) at a time
            cached = await self._tokens.get(key)
            if isinstance(cached, str) and cached != refused:  # another request fetched a new one meanwhile
                return cached
            token, ttl = await self.fetch_token(params["realm"], params.get("service"), params.get("scope") or scope, cred)
            header = f"Bearer {token}"
            await self._tokens.set(key, header, ttl=max(1, int(ttl) - 5))
            return header

    def check_realm(self, realm: str) -> None:
        """A realm is followed only over https, or to a host this upstream is configured with."""
        parts = urlsplit(realm)
        allowed_http = {self.cfg.host, *self.cfg.token_realm_hosts}
        if parts.scheme == "https" or (parts.scheme == "http" and parts.netloc in allowed_http):
            return
        raise errors.UpstreamError(f"upstream {self.name}: token realm {parts.scheme}://{parts.netloc} refused "
                                   "(not https and not a configured host)")

    async def fetch_token(self, realm: str, service: str | None, scope: str, cred: Credential) -> tuple[str, float]:
        """GET a token from the realm (Docker token spec), with Basic credentials if we have them."""
        self.check_realm(realm)
        query = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Authorization": cred.header} if cred.scheme == "basic" else {}
        try:
            async with self.session.get(realm, params=query, headers=headers, allow_redirects=False) as r:
                body = await r.read()
                if r.status in (401, 403):
                    raise errors.Unauthorized(f"upstream {self.name}: credentials refused by token server")
                if r.status != 200:
                    raise errors.UpstreamError(f"upstream {self.name}: token server answered {r.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise errors.UpstreamUnavailable(f"upstream {self.name}: token server unreachable ({type(e).__name__})") from e
        return parse_token(body)

    async def _send(self, method: str, url: str, headers: dict[str, str], auth: str | None) -> UpstreamResponse:
        origin = urlsplit(url)[:2]  # scheme and host:port: never to another host, never downgraded to http
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth and urlsplit(url)[:2] == origin:
                h["Authorization"] = auth  # never to another host (S3, CDN)
            started = time.monotonic()
            resp = await self.session.request(method, url, headers=h, allow_redirects=False)
            self._record(method, resp.status, time.monotonic() - started, None)
            self._note_ratelimit(resp.headers)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return UpstreamResponse(resp, self.name)
            resp.release()
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise errors.UpstreamError(f"upstream {self.name}: redirect to unsupported scheme")
        raise errors.UpstreamError(f"upstream {self.name}: too many redirects")

    def _note_ratelimit(self, headers: Mapping[str, str]) -> None:
        value = headers.get("ratelimit-remaining")
        if value:
            try:
                self.ratelimit_remaining = float(value.split(";")[0])
            except ValueError:
                pass

    def _record(self, method: str, status: int | None, seconds: float, error: str | None) -> None:
        if self._on_request is not None:
            self._on_request(self.name, method, status, seconds, error)

    async def challenge_params(self) -> dict[str, str]:
        """The upstream's own auth challenge on ``/v2/`` (realm, service), for the token relay."""
        cache_key = f"{self.name}|challenge"
        cached = await self._tokens.get(cache_key)
        if isinstance(cached, dict):
            return cached
        try:
            ns = {"ns": self.cfg.upstream_ns} if self.cfg.upstream_ns else None
            async with self.session.get(self.cfg.url + "/v2/", params=ns, allow_redirects=False) as r:
                await r.read()
                header = r.headers.get("WWW-Authenticate", "")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise errors.UpstreamUnavailable(f"upstream {self.name} unreachable: {type(e).__name__}") from e
        scheme, params = parse_challenge(header)
        params = params if scheme == "bearer" else {}
        await self._tokens.set(cache_key, params, ttl=300)
        return params

    async def relay_token(self, method: str, query: Mapping[str, str], form: Mapping[str, str] | None,
                          authorization: str | None) -> tuple[int, bytes]:
        """Relay a client's token request to the upstream's realm (passthrough mode)."""
        params = await self.challenge_params()
        realm = params.get("realm")
        if not realm:
            return 200, orjson.dumps({"token": "", "access_token": "", "expires_in": 60})
        self.check_realm(realm)
        q = dict(query)
        if params.get("service"):
            q["service"] = params["service"]
        headers = {"Authorization": authorization} if authorization else {}
        try:
            if method == "POST" and form is not None:
                data = dict(form)
                if params.get("service"):
                    data["service"] = params["service"]
                async with self.session.post(realm, data=data, headers=headers, allow_redirects=False) as r:
                    body = await r.read()
                    if r.status not in (404, 405):
                        return r.status, body
                # The realm has no OAuth2 POST: fall back to GET with Basic (containerd does the same).
                user, pw = data.get("username", ""), data.get("password", "")
                if user:
                    headers["Authorization"] = Credential.basic(user, pw).header
                q.setdefault("scope", data.get("scope", ""))
            async with self.session.get(realm, params=q, headers=headers, allow_redirects=False) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise errors.UpstreamUnavailable(f"upstream {self.name}: token server unreachable ({type(e).__name__})") from e


def parse_token(body: bytes) -> tuple[str, float]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.UpstreamError("token server sent invalid JSON") from None
    if not isinstance(doc, dict):
        raise errors.UpstreamError("token server sent invalid JSON")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise errors.UpstreamError("token server sent no token")
    ttl = doc.get("expires_in")
    return token, (float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else _DEFAULT_TOKEN_TTL)


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * (2.0**attempt)) * (0.5 + random.random() / 2)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
