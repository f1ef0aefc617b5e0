"""The edge around every handler: client access control, OCI error rendering, the headers every
answer carries, access log, metrics."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import logging
import time
import uuid

import bcrypt
from aiohttp import web

from . import errors
from .oci import Kind
from .requestinfo import INFO, Handler, RequestInfo, Wrap, info, stamp
from .log import access_log, request_id
from .metrics import Metrics

log = logging.getLogger("edgecache.edge")


def render_error(request: web.BaseRequest, err: errors.OCIError) -> web.Response:
    headers = {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0",
               "X-Cache": info(request).cache or "MISS", **err.headers}
    upstream = getattr(err, "challenge", None)
    if err.status == 401 and upstream is not None and "WWW-Authenticate" not in headers:
        headers["WWW-Authenticate"] = token_challenge(request, upstream)
    body = b"" if request.method == "HEAD" else err.body()
    resp = web.Response(status=err.status, body=body, headers=headers)
    if request.method == "HEAD":
        resp.headers["Content-Length"] = str(len(err.body()))
    return resp


PUBLIC_URL = web.AppKey("public_url", str)


def token_challenge(request: web.BaseRequest, upstream: str) -> str:
    """Point the client at our token endpoint (passthrough, DESIGN §4), in the client's own terms.

    The scope names the repository as the client asked for it, and the realm carries the request's
    ``ns=``: our token endpoint then translates the name to the upstream's exactly once, with the
    same routing as ``/v2/`` (a prefix is stripped only when there is no ``ns``). Clients that build
    their scope from their own request name, as containerd and Docker do, agree with it. Both values
    were validated by the edge before any 401 is raised (name grammar, ``ns`` pattern)."""
    base = info(request).app[PUBLIC_URL] or f"{request.scheme}://{request.host}"
    ns = request.query.get("ns")
    realm = f"{base}/_edgecache/token/{upstream}" + (f"?ns={ns}" if ns else "")
    value = f'Bearer realm="{realm}",service="edgecache"'
    api = info(request).api
    if api is not None and api.name:
        value += f',scope="repository:{api.name}:pull"'
    return value


class Htpasswd:
    """bcrypt htpasswd file (``user:$2y$...``), the format ``htpasswd -B`` writes."""

    def __init__(self, path: str) -> None:
        self.users: dict[str, bytes] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                user, sep, hashed = line.strip().partition(":")
                if sep and hashed.startswith("$2"):
                    self.users[user] = hashed.replace("$2y$", "$2b$", 1).encode()

    def check(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            bcrypt.checkpw(b"x", bcrypt.hashpw(b"y", bcrypt.gensalt(4)))  # even out timing
            return False
        return bcrypt.checkpw(password.encode(), hashed)


def make_edge(app: web.Application, metrics: Metrics, allow_cidrs: tuple[str, ...], htpasswd: Htpasswd | None,
              access_logging: bool) -> Wrap:
    """What every request goes through: client checks, OCI errors, request id, metrics, access log.

    A wrapper put around each handler rather than an aiohttp middleware: the middleware chain costs
    about as much per request as a whole cached-manifest answer (measured in loadtests/), and the
    dispatcher (:func:`edgecache.routes.make_dispatch`) sends unknown paths through the same wrapper,
    so nothing escapes it.
    """
    networks = [ipaddress.ip_network(c, strict=False) for c in allow_cidrs]
    # Request ids: a random per-process prefix and a counter (os.urandom per request is slow on some VMs).
    prefix = uuid.uuid4().hex[:8]
    counter = itertools.count(1)
    auth_cache: dict[str, bool] = {}
    check = bool(networks) or htpasswd is not None
    monotonic = time.monotonic

    def wrap(handler: Handler, route_label: str, methods: tuple[str, ...] | None) -> Handler:
        guarded = check and route_label not in _PROBES  # probes answer anyone (kubelet, load balancers)

        async def edge(request: web.BaseRequest) -> web.StreamResponse:
            # The hot path of every request: keep it to dict and attribute work (metrics are batched).
            rid = request.headers.get("X-Request-Id", "")
            if not (rid.isalnum() and len(rid) <= 64):
                rid = f"{prefix}{next(counter):x}"
            token = request_id.set(rid)
            ri = request[INFO] = RequestInfo(app, rid)
            started = monotonic()
            status = 500
            metrics.active += 1
            try:
                try:
                    if guarded:
                        _check_client(request, networks, htpasswd, auth_cache)
                    if methods is not None and request.method not in methods:
                        raise errors.Unsupported("method not allowed")
                    resp = await handler(request)
                except errors.OCIError as e:
                    ri.error = e.code
                    resp = render_error(request, e)
                except web.HTTPException as e:
                    if e.status >= 400:
                        resp = render_error(request, _http_error(e))
                    else:
                        raise
                except asyncio.CancelledError:
                    status = 499  # client went away
                    raise
                except Exception as e:  # a bug: still answer OCI JSON, log the traceback once
                    log.exception("unhandled error on %s %s", request.method, request.path[:200])
                    ri.error = type(e).__name__
                    resp = render_error(request, errors.OCIError("internal error"))
                if not resp.prepared:  # a streamed answer was stamped as it started (edgecache.send)
                    stamp(request, resp)
                status = resp.status
                return resp
            finally:
                metrics.active -= 1
                seconds = monotonic() - started
                api = ri.api
                if api is not None:
                    route = api.route
                    outcome = ri.cache if status < 400 and api.kind in _CONTENT else None
                else:
                    route, outcome = route_label, None
                metrics.request_done(route, request.method, status, seconds, outcome)
                if ri.bytes and ri.source is not None:
                    metrics.served(ri.source, ri.bytes)
                if access_logging:
                    _access(request, ri, route, status, seconds)
                request_id.reset(token)

        return edge

    return wrap


_CONTENT = frozenset((Kind.MANIFEST, Kind.BLOB))
_PROBES = ("/healthz", "/readyz")


def _http_error(e: web.HTTPException) -> errors.OCIError:
    if e.status == 404:
        return errors.NotFound("not found")
    if e.status == 405:
        return errors.Unsupported("method not allowed")
    err = errors.OCIError(e.reason)
    err.status = e.status
    err.code = "UNSUPPORTED" if e.status < 500 else "UNKNOWN"
    return err


def _check_client(request: web.BaseRequest, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                  htpasswd: Htpasswd | None, cache: dict[str, bool]) -> None:
    if networks:
        peer = request.remote or ""
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            raise errors.Denied("client address not allowed") from None
        if not any(addr in n for n in networks):
            raise errors.Denied("client address not allowed")
    if htpasswd is not None:
        header = request.headers.get("Authorization", "")
        key = header
        ok = cache.get(key)
        if ok is None:
            ok = htpasswd.check(header)
            if len(cache) > 1024:
                cache.clear()
            cache[key] = ok
        if not ok:
            raise errors.Unauthorized("mirror credentials required", headers={"WWW-Authenticate": 'Basic realm="edgecache"'})


def _access(request: web.BaseRequest, ri: RequestInfo, route: str, status: int, seconds: float) -> None:
    api = ri.api
    access_log.info("", extra={"access": {
        "method": request.method,
        "route": route,
        "repository": ri.repository,
        "reference": str(api.reference) if api is not None and api.reference is not None else None,
        "status": status,
        "bytes": ri.bytes,
        "duration_ms": round(seconds * 1000, 3),
        "cache": ri.cache,
        "upstream": ri.upstream,
        "error": ri.error,
        "remote": request.remote,
    }})
