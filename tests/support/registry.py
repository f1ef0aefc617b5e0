"""Run CNCF distribution 2.8 (Debian's ``docker-registry``) on a free loopback port.

The registry gets its own JSON config (YAML is a superset of JSON) in a private
temp dir; nothing under /etc/docker is read.  Readiness is polled on ``GET /v2/``
(200, or 401 when token auth is on) with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TokenAuthConfig:
    """The ``auth: token:`` section of a distribution config."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class ProxyConfig:
    """The ``proxy:`` section (distribution's own pull-through mode, for benchmarks)."""

    remoteurl: str
    username: str | None = None
    password: str | None = None


class RegistryProcess:
    """A ``docker-registry serve <config>`` child process with private storage and port."""

    def __init__(self, workdir: Path | None = None, *, token_auth: TokenAuthConfig | None = None,
                 proxy: ProxyConfig | None = None, port: int | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="edgecache-registry-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.config_file = self.workdir / "config.yml"
        self.log_file = self.workdir / "registry.log"
        self.token_auth = token_auth
        self.proxy = proxy
        self._port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.seeded: Any = None  # set by fixtures after seeding

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": self.host, "secret": "edgecache-test-secret"},
        }
        if self.token_auth is not None:
            cfg["auth"] = {"token": {
                "realm": self.token_auth.realm,
                "service": self.token_auth.service,
                "issuer": self.token_auth.issuer,
                "rootcertbundle": str(self.token_auth.rootcertbundle),
            }}
        if self.proxy is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy.remoteurl}
            if self.proxy.username is not None:
                proxy["username"] = self.proxy.username
                proxy["password"] = self.proxy.password or ""
            cfg["proxy"] = proxy
        return cfg

    def start(self, deadline: float = 15.0) -> None:
        if self.running:
            return
        self.config_file.write_text(json.dumps(self.config(), indent=2))
        # REGISTRY_* variables override the config file; never inherit them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log = open(self.log_file, "ab")
        self._proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config_file)],
                                      stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        end = time.monotonic() + deadline
        delay = 0.01
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self._proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 401:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"docker-registry at {self.url} not ready after {deadline}s:\n{self.log_text()}")
            time.sleep(delay)
            delay = min(0.1, delay * 2)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, deadline: float = 15.0) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start(deadline)

    def cleanup(self) -> None:
        """Stop and remove the temp dir (only if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> RegistryProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
