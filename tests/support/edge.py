"""Run edgecache for tests: in-process on a free loopback port, or as a real process.

In-process instances use the same ``create_app`` as ``edgecache serve`` and a
real listening socket, so real clients (skopeo, ctr) can pull through them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgecache import config as config_mod
from edgecache.app import EdgeRunner, create_app

ROOT = Path(__file__).resolve().parents[2]


def make_config(cache_dir: Path, upstream_url: str, *, name: str = "up", auth: str = "anonymous",
                max_size: str = "10GiB", server: dict[str, Any] | None = None, **upstream: Any) -> config_mod.Config:
    """A config with one default upstream (plus any extra tables in ``extra_upstreams``)."""
    extra = upstream.pop("extra_upstreams", {})
    top = upstream.pop("top", {})
    host = upstream_url.split("://", 1)[1]
    table: dict[str, Any] = {"url": upstream_url, "namespaces": [host], "prefix": name, "default": True,
                             "auth": auth, "retries": 1, "connect_timeout": "2s", "read_timeout": "5s"}
    table.update(upstream)
    data: dict[str, Any] = {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", **(server or {})},
        "cache": {"dir": str(cache_dir), "max_size": max_size},
        "upstreams": {name: table, **extra},
        **top,
    }
    return config_mod.from_mapping(data)


@dataclass
class Edge:
    url: str
    host: str
    app: web.Application
    runner: EdgeRunner
    config: config_mod.Config

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_edge(cfg: config_mod.Config) -> Edge:
    app = create_app(cfg)
    runner = EdgeRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Edge(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", app, runner, cfg)


EdgeFactory = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def edge_factory(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    """Start edgecache instances (each with its own cache dir unless given one); all stopped at the end."""
    edges: list[Edge] = []
    counter = 0

    async def factory(upstream_url: str, *, cache_dir: Path | None = None, **kw: Any) -> Edge:
        nonlocal counter
        counter += 1
        cfg = make_config(cache_dir or tmp_path / f"cache{counter}", upstream_url, **kw)
        edge = await start_edge(cfg)
        edges.append(edge)
        return edge

    yield factory
    for e in reversed(edges):
        await e.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to edgecache (no decompression, no cookie jar)."""
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


class EdgeProcess:
    """edgecache as a real process (``python -m edgecache serve``) for signals, workers and restarts."""

    def __init__(self, config_file: Path, log_file: Path, env: dict[str, str] | None = None) -> None:
        self.config_file, self.log_file = config_file, log_file
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, url: str, deadline: float = 20.0) -> None:
        self.start_nowait()
        wait_ready(url, deadline, self.proc)

    def start_nowait(self) -> None:
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgecache", "serve", "--config", str(self.config_file)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()


def wait_ready(url: str, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll /healthz until it answers, with a deadline (never a fixed sleep)."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + deadline
    delay = 0.02
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"edgecache exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(delay)
        delay = min(0.2, delay * 2)
    raise TimeoutError(f"edgecache at {url} not ready after {deadline}s")


def write_config(tmp_path: Path, upstream_url: str, port: int, extra: str = "", *, cache: Path | None = None,
                 shutdown_timeout: str = "20s") -> Path:
    """A config file for an :class:`EdgeProcess`: one default upstream, ``extra`` lines in [server]."""
    host = upstream_url.split("://", 1)[1]
    cfg = tmp_path / "edgecache.toml"
    cfg.write_text(f"""
version = 1
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout = "{shutdown_timeout}"
{extra}
[cache]
dir = "{cache or tmp_path / 'cache'}"
[upstreams.up]
url = "{upstream_url}"
namespaces = ["{host}"]
prefix = "up"
default = true
""")
    return cfg


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, written as cert.pem and key.pem."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def run(*argv: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command (skopeo, ctr, edgecache) without blocking the event loop; returns (code, output)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, **(env or {})})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


async def start_workers(tmp_path: Path, upstream_url: str, workers: int = 2) -> tuple[EdgeProcess, str]:
    """edgecache as ``workers`` processes on one port over one cache dir; returns once every worker answers."""
    port = _free_port()
    cfg = tmp_path / "edgecache.toml"
    cfg.write_text(f"""
version = 1
[server]
listen = "127.0.0.1:{port}"
workers = {workers}
[cache]
dir = "{tmp_path / 'cache'}"
[upstreams.up]
url = "{upstream_url}"
namespaces = ["{upstream_url.split('://', 1)[1]}"]
default = true
""")
    proc = EdgeProcess(cfg, tmp_path / "edge.log")
    url = f"http://127.0.0.1:{port}"
    await asyncio.get_running_loop().run_in_executor(None, proc.start, url)
    pids: set[int] = set()
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        while len(pids) < workers:  # each worker answers /healthz with its pid
            if time.monotonic() > deadline:
                proc.stop()
                raise TimeoutError(f"only workers {pids} came up")
            async with http.get(url + "/healthz") as r:
                pids.add((await r.json())["pid"])
    return proc, url


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
