"""A counting, fault-injecting reverse proxy ("tap") in front of a registry or token server.

Runs in the caller's event loop (``await tap.start()`` / ``await tap.stop()``).
Bodies are streamed both ways, never decompressed; hop-by-hop headers are
dropped; a ``Location`` pointing at the upstream is rewritten to the tap.
Every request is recorded (:class:`TapRecord`) and faults can be armed at run
time: hold, corrupt, cut, fixed status, redirect blobs elsewhere, down.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

Kind = Literal["blob", "manifest", "tags", "referrers", "ping", "token", "upload", "catalog", "other"]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host",
})

_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>blobs/uploads|blobs|manifests|tags|referrers)(?:/(?P<ref>[^/]*))?"
                   r"(?:/.*)?$")
_KINDS: dict[str, Kind] = {"blobs/uploads": "upload", "blobs": "blob", "manifests": "manifest", "tags": "tags",
                           "referrers": "referrers"}


def classify(path: str) -> tuple[Kind, str | None, str | None]:
    """(kind, repository name, reference) for a request path."""
    if path in ("/v2", "/v2/"):
        return "ping", None, None
    if path == "/v2/_catalog":
        return "catalog", None, None
    m = _PATH.match(path)
    if m:
        return _KINDS[m["kind"]], m["name"], m["ref"] or None
    if "token" in path or "oauth" in path:
        return "token", None, None
    return "other", None, None


@dataclass
class TapRecord:
    """One request through the tap (``status`` is 0 until the answer is known, -1 if the tap hung up)."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    kind: Kind
    name: str | None
    reference: str | None
    status: int = 0
    bytes_sent: int = 0
    fault: str | None = None

    @property
    def has_auth(self) -> bool:
        return "Authorization" in self.headers

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


class Gate:
    """Holds matching requests (before they reach the upstream) until :meth:`release`."""

    def __init__(self, kind: Kind | None, digest: str | None, count: int | None) -> None:
        self.kind, self.digest, self.remaining = kind, digest, count
        self._open = asyncio.Event()
        self._held = 0
        self._cond = asyncio.Condition()

    @property
    def held(self) -> int:
        return self._held

    def matches(self, rec: TapRecord) -> bool:
        if self._open.is_set() or self.remaining == 0:
            return False
        return (self.kind is None or rec.kind == self.kind) and (self.digest is None or rec.reference == self.digest)

    async def hold(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1
        async with self._cond:
            self._held += 1
            self._cond.notify_all()
        await self._open.wait()

    async def wait_held(self, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` requests are being held."""
        async with asyncio.timeout(timeout):
            async with self._cond:
                await self._cond.wait_for(lambda: self._held >= n)

    def release(self) -> None:
        self._open.set()


@dataclass
class _Fault:
    action: Literal["corrupt", "cut", "status", "redirect"]
    kind: Kind | None = None
    digest: str | None = None
    times: int | None = 1  # None = forever
    methods: frozenset[str] = frozenset({"GET"})
    after_bytes: int = 0
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    target: str = ""

    def take(self, rec: TapRecord) -> bool:
        if self.times == 0 or rec.method not in self.methods:
            return False
        if self.kind is not None and rec.kind != self.kind:
            return False
        if self.digest is not None and rec.reference != self.digest:
            return False
        if self.times is not None:
            self.times -= 1
        return True


class Tap:
    """Reverse proxy on a free 127.0.0.1 port in front of ``upstream_url``."""

    def __init__(self, upstream_url: str, *, bind_host: str = "127.0.0.1", chunk_size: int = 64 * 1024) -> None:
        self.upstream = URL(upstream_url.rstrip("/"))
        self.bind_host, self.chunk_size = bind_host, chunk_size
        self.records: list[TapRecord] = []
        self.down = False
        self._faults: list[_Fault] = []
        self._gates: list[Gate] = []
        self._pauses: list[tuple[Gate, int]] = []  # (gate, body offset) for pause_blob
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._cond: asyncio.Condition | None = None

    # -- addresses -----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> Tap:
        self._cond = asyncio.Condition()
        self._session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind_host, 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for g in self._gates:
            g.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Tap:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- inspection ----------------------------------------------------------------------------------------
    def count(self, method: str | None = None, kind: Kind | None = None, digest: str | None = None, *,
              name: str | None = None, status: int | None = None) -> int:
        """Requests seen so far matching all given filters (``digest`` matches the path reference)."""
        return len(self.find(method, kind, digest, name=name, status=status))

    def find(self, method: str | None = None, kind: Kind | None = None, digest: str | None = None, *,
             name: str | None = None, status: int | None = None) -> list[TapRecord]:
        return [r for r in self.records
                if (method is None or r.method == method) and (kind is None or r.kind == kind)
                and (digest is None or r.reference == digest) and (name is None or r.name == name)
                and (status is None or r.status == status)]

    def reset(self) -> None:
        """Forget records and disarm every fault (held requests are released)."""
        self.records.clear()
        self._faults.clear()
        for g in self._gates:
            g.release()
        self._gates.clear()
        self.down = False

    async def wait_requests(self, n: int, timeout: float = 10.0, *, method: str | None = None,
                            kind: Kind | None = None, digest: str | None = None, name: str | None = None) -> None:
        """Wait until at least ``n`` requests (matching the ``count`` filters) have arrived."""
        assert self._cond is not None, "tap not started"
        async with asyncio.timeout(timeout):
            async with self._cond:
                await self._cond.wait_for(lambda: self.count(method, kind, digest, name=name) >= n)

    # -- faults --------------------------------------------------------------------------------------------
    def hold(self, kind: Kind | None = None, digest: str | None = None, count: int | None = None) -> Gate:
        """Hold matching requests (all, or the first ``count``) until ``gate.release()``."""
        gate = Gate(kind, digest, count)
        self._gates.append(gate)
        return gate

    def hold_first(self, kind: Kind | None = None, digest: str | None = None) -> Gate:
        return self.hold(kind, digest, count=1)

    def pause_blob(self, digest: str | None, at_bytes: int) -> Gate:
        """Stream the next matching blob GET body up to ``at_bytes``, then hold it until ``gate.release()``."""
        gate = Gate("blob", digest, 1)
        self._pauses.append((gate, at_bytes))
        return gate

    def corrupt_next_blob(self, digest: str | None = None, times: int = 1) -> None:
        """Flip one byte in the middle of the next blob GET body (digest=None: any blob)."""
        self._faults.append(_Fault("corrupt", "blob", digest, times))

    def cut_next_blob(self, digest: str | None = None, after_bytes: int = 0, times: int = 1) -> None:
        """Send full headers (real Content-Length), then ``after_bytes`` of body, then drop the connection."""
        self._faults.append(_Fault("cut", "blob", digest, times, after_bytes=after_bytes))

    def status_next(self, kind: Kind | None, status: int, headers: Mapping[str, str] | None = None, *,
                    times: int | None = 1, digest: str | None = None, body: bytes | None = None,
                    methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Answer the next ``times`` matching requests with ``status`` (e.g. 429 + Retry-After, 503)."""
        self._faults.append(_Fault("status", kind, digest, times, frozenset(methods), status=status,
                                   headers=dict(headers or {}), body=body))

    def redirect_blobs_to(self, other_base_url: str, *, times: int | None = None,
                          methods: tuple[str, ...] = ("GET",)) -> None:
        """Answer blob requests with 307 to the same path+query on ``other_base_url``."""
        self._faults.append(_Fault("redirect", "blob", None, times, frozenset(methods),
                                   target=other_base_url.rstrip("/")))

    def set_down(self, down: bool = True) -> None:
        """While down, every connection is closed without an answer."""
        self.down = down

    # -- proxying ------------------------------------------------------------------------------------------
    def _take_fault(self, rec: TapRecord) -> _Fault | None:
        for f in self._faults:
            if f.take(rec):
                return f
        return None

    def _rewrite_location(self, loc: str) -> str:
        u = URL(loc, encoded=True)
        if u.is_absolute() and u.host == self.upstream.host and u.port == self.upstream.port:
            return str(u.with_scheme("http").with_host(self.bind_host).with_port(self._port))
        return loc

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind, name, ref = classify(request.path)
        rec = TapRecord(request.method, request.path, request.query_string, CIMultiDict(request.headers),
                        kind, name, ref)
        self.records.append(rec)
        assert self._cond is not None and self._session is not None
        async with self._cond:
            self._cond.notify_all()

        if self.down:
            rec.status, rec.fault = -1, "down"
            return self._hang_up(request)
        for g in self._gates:
            if g.matches(rec):
                await g.hold()
        if self.down:
            rec.status, rec.fault = -1, "down"
            return self._hang_up(request)

        fault = self._take_fault(rec)
        if fault is not None and fault.action == "status":
            rec.status, rec.fault = fault.status, "status"
            body = fault.body
            if body is None:
                body = json.dumps({"errors": [{"code": "UNAVAILABLE" if fault.status >= 500 else "TOOMANYREQUESTS",
                                               "message": "injected by tap", "detail": None}]}).encode()
            return web.Response(status=fault.status, body=body, headers={"Content-Type": "application/json",
                                                                          **fault.headers})
        if fault is not None and fault.action == "redirect":
            rec.status, rec.fault = 307, "redirect"
            target = fault.target + request.raw_path
            return web.Response(status=307, headers={"Location": target})

        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        if not request.body_exists:
            headers.pop("Content-Length", None)
        url = URL(str(self.upstream) + request.raw_path, encoded=True)  # path and query exactly as sent
        data = request.content if request.body_exists else None
        try:
            upstream = await self._session.request(request.method, url, headers=headers, data=data,
                                                   allow_redirects=False)
        except (aiohttp.ClientError, OSError):
            rec.status, rec.fault = 502, "upstream-error"
            return web.Response(status=502, text="tap: upstream unreachable")
        async with upstream:
            resp_headers = CIMultiDict((k, v) for k, v in upstream.headers.items()
                                       if k.lower() not in HOP_BY_HOP and k.lower() != "content-length")
            if "Location" in resp_headers:
                resp_headers["Location"] = self._rewrite_location(resp_headers["Location"])
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=resp_headers)
            length = upstream.content_length
            if length is not None:
                resp.content_length = length
            rec.status = upstream.status
            await resp.prepare(request)
            if request.method == "HEAD":
                await resp.write_eof()
                return resp
            corrupt_at = cut_at = None
            if fault is not None and fault.action == "corrupt" and upstream.status == 200:
                corrupt_at = (length or 0) // 2
                rec.fault = "corrupt"
            if fault is not None and fault.action == "cut" and upstream.status in (200, 206):
                cut_at = fault.after_bytes
                rec.fault = "cut"
            offset = 0
            pause: tuple[Gate, int] | None = None
            if request.method == "GET" and upstream.status == 200:
                pause = next(((g, at) for g, at in self._pauses if g.matches(rec)), None)
                if pause is not None:
                    pause[0].remaining = 0  # claimed by this request
            async for chunk in upstream.content.iter_chunked(self.chunk_size):
                if pause is not None and offset + len(chunk) >= pause[1]:
                    head, chunk = chunk[:pause[1] - offset], chunk[pause[1] - offset:]
                    if head:
                        await resp.write(head)
                        offset += len(head)
                    rec.bytes_sent = offset
                    gate, _ = pause
                    pause = None
                    gate.remaining = 1
                    await gate.hold()
                    if not chunk:
                        continue
                if cut_at is not None and offset + len(chunk) >= cut_at:
                    chunk = chunk[:cut_at - offset]
                    if chunk:
                        await resp.write(chunk)
                    rec.bytes_sent = cut_at
                    return self._hang_up(request)
                if corrupt_at is not None and offset <= corrupt_at < offset + len(chunk):
                    i = corrupt_at - offset
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                await resp.write(chunk)
                offset += len(chunk)
                rec.bytes_sent = offset
            if cut_at is not None:  # body shorter than the cut point: still hang up before EOF
                return self._hang_up(request)
            await resp.write_eof()
            return resp

    @staticmethod
    def _hang_up(request: web.Request) -> NoReturn:
        transport = request.transport
        if transport is not None:
            transport.close()
        raise ConnectionResetError("tap: connection dropped on purpose")
