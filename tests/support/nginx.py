"""Run the regional-tier load balancer (deploy/nginx/regional-lb.conf) with real nginx on free ports.

The config is the deploy file itself with only the addresses rewritten: the three
``server 127.0.0.1:510N`` backends and the ``listen`` ports of the main entry (5100)
and the per-origin entries (5110..5113). The hash key map, the ``upstream`` block and
every proxy setting stay byte-for-byte as shipped. nginx runs in the foreground
(``daemon off``) with its prefix, pid and temp files in a private directory.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tests.support.registry import free_port

ROOT = Path(__file__).resolve().parents[2]
LB_CONF = ROOT / "deploy" / "nginx" / "regional-lb.conf"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"

BACKEND_PORTS = (5101, 5102, 5103)
MAIN_PORT = 5100
ORIGIN_PORTS = {"docker.io": 5110, "ghcr.io": 5111, "quay.io": 5112, "registry.k8s.io": 5113}


def derive_config(text: str, backends: Sequence[int], listen: Mapping[int, int]) -> str:
    """Rewrite only the backend ``server`` ports and the ``listen`` ports; fail if the file changed shape."""
    assert len(backends) == len(BACKEND_PORTS)
    for old, new in zip(BACKEND_PORTS, backends):
        text, n = re.subn(rf"(\bserver 127\.0\.0\.1:){old}\b", rf"\g<1>{new}", text)
        assert n == 1, f"regional-lb.conf: expected one 'server 127.0.0.1:{old}', found {n}"
    for old, new in listen.items():
        text, n = re.subn(rf"(\blisten 127\.0\.0\.1:){old};", rf"\g<1>{new};", text)
        assert n == 1, f"regional-lb.conf: expected one 'listen 127.0.0.1:{old};', found {n}"
    return text


class NginxLB:
    """nginx with the deploy LB config in front of ``backends`` (127.0.0.1 ports)."""

    def __init__(self, workdir: Path, backends: Sequence[int]) -> None:
        self.workdir = workdir
        self.backends = tuple(backends)
        self.main_port = free_port()
        self.origin_ports = {ns: free_port() for ns in ORIGIN_PORTS}
        self.conf_file = workdir / "nginx.conf"
        self.log_file = workdir / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The main entry (clients that send ``ns=`` or a prefix themselves)."""
        return f"http://127.0.0.1:{self.main_port}"

    def origin_url(self, ns: str) -> str:
        """The per-origin entry that adds ``ns=<ns>`` (the node tier's upstream in deploy's tiered config)."""
        return f"http://127.0.0.1:{self.origin_ports[ns]}"

    def write_config(self) -> str:
        listen = {MAIN_PORT: self.main_port, **{ORIGIN_PORTS[ns]: p for ns, p in self.origin_ports.items()}}
        text = derive_config(LB_CONF.read_text(), self.backends, listen)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(text)
        return text

    def _argv(self, *extra: str) -> list[str]:
        return [NGINX_BIN, "-p", str(self.workdir), "-e", "stderr", "-c", str(self.conf_file),
                "-g", f"daemon off; pid {self.workdir / 'nginx.pid'};", *extra]

    def start(self, deadline: float = 15.0) -> None:
        self.write_config()
        check = subprocess.run(self._argv("-t"), capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self._argv(), stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(deadline)

    def _wait_ready(self, deadline: float) -> None:
        """Poll /healthz through the LB (reaches a backend) with a deadline."""
        assert self.proc is not None
        end = time.monotonic() + deadline
        delay = 0.02
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        raise TimeoutError(f"nginx LB at {self.url} not ready after {deadline}s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def access_lines(self) -> list[str]:
        """Access log lines (format ``edgecache_lb``: ... key=<hash key> upstream=<backend> ...)."""
        return [line for line in self.log_text().splitlines() if " key=" in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
