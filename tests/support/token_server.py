"""A small Docker registry token server (https://distribution.github.io/distribution/spec/auth/token/).

Runs an aiohttp app on a free loopback port in a background thread with its own
event loop, so it can live in a session-scoped fixture.  Tokens are ES256 JWTs
signed with a fresh P-256 key; the matching self-signed certificate is written
to ``cert_file`` for the registry's ``rootcertbundle``.  The JWT header carries
``kid`` in libtrust format, which is what distribution 2.8 looks up.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVICE = "edgecache-test-registry"
ISSUER = "edgecache-test-token-issuer"
USERS: dict[str, str] = {"alice": "alicepw", "bob": "bobpw", "mallory": "mallorypw"}


def libtrust_kid(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust key ID: base32(sha256(DER SPKI)[:30]) in 4-char groups joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def allowed_actions(username: str | None, repo: str) -> set[str]:
    """The access policy: public/ and library/ pull for all, push for alice; private/ for alice+bob."""
    if repo.startswith(("public/", "library/")):
        return {"pull", "push"} if username == "alice" else {"pull"}
    if repo.startswith("private/"):
        return {"pull", "push"} if username in ("alice", "bob") else set()
    return set()


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server saw."""

    method: str
    has_basic: bool
    username: str | None
    scope: tuple[str, ...]
    status: int
    grant_type: str | None = None


class TokenServer:
    """Docker token server; ``start()``/``stop()`` are synchronous (it runs in its own thread)."""

    def __init__(self, workdir: Path | None = None, *, service: str = SERVICE, issuer: str = ISSUER,
                 users: Mapping[str, str] | None = None, expires_in: int = 300) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgecache-token-"))
        self.service, self.issuer = service, issuer
        self.users = dict(users or USERS)
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        # Repositories whose anonymous pull was revoked (a public repository made private); tests set it.
        self.anonymous_denied: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._refresh: dict[str, str] = {}
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = libtrust_kid(self._key.public_key())
        self.cert_file = self.workdir / "token-cert.pem"
        self._write_cert()
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- addresses -----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    # -- keys ----------------------------------------------------------------------------------------------
    def _write_cert(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgecache test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, username: str | None, scopes: list[str], *, expires_in: int | None = None,
              audience: str | None = None) -> str:
        """A signed token granting (policy ∩ requested) for each repository scope."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            wanted = {a for a in actions.split(",") if a}
            if "*" in wanted:
                wanted = {"pull", "push"}
            allowed = set() if username is None and name in self.anonymous_denied else allowed_actions(username, name)
            granted = sorted(wanted & allowed)
            access.append({"type": typ, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": username or "", "aud": audience or self.service,
            "exp": now + (expires_in if expires_in is not None else self.expires_in),
            "nbf": now - 5, "iat": now, "jti": secrets.token_hex(16), "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"})

    # -- HTTP ----------------------------------------------------------------------------------------------
    def _record(self, rec: TokenRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _answer(self, username: str | None, scopes: list[str], *, refresh: bool = False) -> web.Response:
        token = self.issue(username, scopes)
        body: dict[str, Any] = {
            "token": token, "access_token": token, "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        if refresh and username is not None:
            rt = secrets.token_urlsafe(24)
            self._refresh[rt] = username
            body["refresh_token"] = rt
        return web.json_response(body)

    async def _get_token(self, request: web.Request) -> web.Response:
        scopes = [s for v in request.query.getall("scope", []) for s in v.split(" ") if s]
        header = request.headers.get("Authorization", "")
        username: str | None = request.query.get("account") if not header else None
        has_basic = header.lower().startswith("basic ")
        status = 200
        if has_basic:
            try:
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, pw = "", ""
            username = user
            if self.users.get(user) != pw:
                status = 401
        elif header:
            status = 401
        if status == 200 and username is not None and not has_basic:
            username = None  # ``account`` alone authenticates nobody
        self._record(TokenRequest("GET", has_basic, username, tuple(scopes), status))
        if status != 200:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                                     status=401, headers={"WWW-Authenticate": 'Basic realm="token"'})
        return self._answer(username, scopes, refresh=request.query.get("offline_token") == "true")

    async def _post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        scopes = [s for s in str(form.get("scope", "")).split(" ") if s]
        username: str | None = None
        status = 200
        if grant == "password":
            username = str(form.get("username", ""))
            if self.users.get(username) != str(form.get("password", "")):
                status = 401
        elif grant == "refresh_token":
            found = self._refresh.get(str(form.get("refresh_token", "")))
            username = found
            if found is None:
                status = 401
        else:
            status = 400
        self._record(TokenRequest("POST", "Authorization" in request.headers, username, tuple(scopes), status,
                                  grant or None))
        if status == 400:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if status == 401:
            return web.json_response({"error": "invalid_grant"}, status=401)
        return self._answer(username, scopes, refresh=grant == "password" and form.get("access_type") == "offline")

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, deadline: float = 10.0) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._astart())
            except BaseException as e:  # pragma: no cover - startup failure
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="token-server", daemon=True)
        self._thread.start()
        if not ready.wait(deadline):
            raise TimeoutError("token server did not start")
        if errors:
            raise errors[0]

    async def _astart(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._get_token)
        app.router.add_post("/token", self._post_token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> TokenServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
