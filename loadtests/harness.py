"""Load-test harness: real processes on 127.0.0.1, nothing from the internet.

* :class:`Registry`   - CNCF distribution (``docker-registry serve``), plain or proxy mode,
  with its access log kept in a file so upstream requests can be counted.
* :func:`seed_image`  - push a multi-platform OCI image (index + linux/amd64 + linux/arm64
  manifests, configs, random incompressible layers) through the registry HTTP API.
* :class:`Edge`       - edgecache as a subprocess, config written to a temp dir.
* :class:`Nginx`      - nginx serving a directory with sendfile on.
* :class:`RssSampler` - peak RSS (process + children) and open fds, sampled in a thread.

Standard library + psutil only, so it can be imported by run.py, bench.py and tests.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
# What containerd 1.7 sends when resolving a tag.
CONTAINERD_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
                     "application/vnd.docker.distribution.manifest.list.v2+json, "
                     "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, deadline: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
              ok: tuple[int, ...] = (200, 401)) -> None:
    """Poll ``url`` until it answers one of ``ok`` (bounded; never a fixed sleep)."""
    end = time.monotonic() + deadline
    delay = 0.02
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(delay)
        delay = min(0.2, delay * 2)
    raise TimeoutError(f"{url} not ready after {deadline}s")


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------------------------
# distribution
# --------------------------------------------------------------------------------------------

_ACCESS_RE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/\S*) HTTP/[0-9.]+" (\d{3}) (\d+|-)')


class Registry:
    """``docker-registry serve`` with its own config and storage in a temp dir."""

    def __init__(self, workdir: Path, name: str = "registry", proxy_remote: str | None = None,
                 port: int | None = None) -> None:
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.proxy_remote = proxy_remote
        self.log_path = self.dir / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def write_config(self) -> Path:
        cfg = self.dir / "config.yml"
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  cache:",
            "    blobdescriptor: inmemory",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: loadtest-not-a-secret",
        ]
        if self.proxy_remote:
            lines += ["proxy:", f"  remoteurl: {self.proxy_remote}"]
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, deadline: float = 20.0) -> Registry:
        cfg = self.write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.dir, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
        wait_http(self.url + "/v2/", deadline, self.proc)
        return self

    def stop(self) -> None:
        _terminate(self.proc, 15)
        if self._log:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # access log -------------------------------------------------------------------------
    def log_mark(self) -> int:
        """A position in the access log; :meth:`requests` counts lines after it."""
        if self._log:
            self._log.flush()
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path, status) of every /v2/ request logged after ``since``."""
        time.sleep(0.2)  # the registry writes its access log line after the body; let it land
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3))) for m in _ACCESS_RE.finditer(text)]

    def count(self, since: int = 0, method: str = "GET", kind: str = "blobs", digest: str | None = None) -> int:
        n = 0
        for m, path, _status in self.requests(since):
            if m == method and f"/{kind}/" in path and (digest is None or path.split("?")[0].endswith(digest)):
                n += 1
        return n


# --------------------------------------------------------------------------------------------
# seeding through the registry HTTP API
# --------------------------------------------------------------------------------------------

def _conn(url: str) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=120, blocksize=1 << 20)


def push_blob(registry_url: str, repo: str, data: bytes | Path, digest: str | None = None) -> tuple[str, int]:
    """Monolithic upload (POST then PUT ?digest=); ``data`` is bytes or a file path. Returns (digest, size)."""
    if isinstance(data, Path):
        size = data.stat().st_size
        if digest is None:
            digest = "sha256:" + file_sha256(data)
    else:
        size = len(data)
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
    c = _conn(registry_url)
    try:
        c.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        r = c.getresponse()
        r.read()
        if r.status == 200:
            return digest, size
        c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload start for {repo}: {r.status}")
        loc = r.getheader("Location") or ""
        u = urlsplit(loc)
        target = (u.path or loc) + ("?" + u.query + "&" if u.query else "?") + f"digest={digest}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(data, Path):
            with open(data, "rb") as f:
                c.request("PUT", target, body=f, headers=headers)
                r = c.getresponse()
        else:
            c.request("PUT", target, body=data, headers=headers)
            r = c.getresponse()
        body = r.read()
        if r.status != 201:
            raise RuntimeError(f"upload of {digest} to {repo}: {r.status} {body[:300]!r}")
    finally:
        c.close()
    return digest, size


def push_manifest(registry_url: str, repo: str, ref: str, body: bytes, media_type: str) -> str:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    c = _conn(registry_url)
    try:
        c.request("PUT", f"/v2/{repo}/manifests/{ref}", body=body, headers={"Content-Type": media_type})
        r = c.getresponse()
        text = r.read()
        if r.status != 201:
            raise RuntimeError(f"manifest {repo}:{ref}: {r.status} {text[:300]!r}")
    finally:
        c.close()
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> str:
    """Write ``size`` incompressible bytes to ``path``; returns the sha256 digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(8 * MiB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class Image:
    repo: str
    tag: str
    index_digest: str
    index_body: bytes
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # "os/arch" -> (digest, body)
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size (configs and layers)

    def as_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "tag": self.tag, "index": self.index_digest,
                "manifests": {p: d for p, (d, _) in self.manifests.items()}, "blobs": self.blobs}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def seed_image(registry_url: str, repo: str, tag: str, layer_sizes: list[int], salt: str = "",
               push_tag: bool = True) -> Image:
    """Push index + one manifest per platform (its own config and random layers). Returns what was pushed."""
    blobs: dict[str, int] = {}
    manifests: dict[str, tuple[str, bytes]] = {}
    entries = []
    for os_name, arch in PLATFORMS:
        layers = []
        for size in layer_sizes:
            data = os.urandom(size)
            d, n = push_blob(registry_url, repo, data)
            blobs[d] = n
            layers.append({"mediaType": OCI_LAYER, "digest": d, "size": n})
        config = _json({"architecture": arch, "os": os_name, "created": "2024-01-01T00:00:00Z",
                        "config": {"Env": [f"SALT={salt}{os.urandom(8).hex()}"]},
                        "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}})
        cd, cn = push_blob(registry_url, repo, config)
        blobs[cd] = cn
        manifest = _json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cn}, "layers": layers})
        md = push_manifest(registry_url, repo, "sha256:" + hashlib.sha256(manifest).hexdigest(), manifest, OCI_MANIFEST)
        manifests[f"{os_name}/{arch}"] = (md, manifest)
        entries.append({"mediaType": OCI_MANIFEST, "digest": md, "size": len(manifest),
                        "platform": {"os": os_name, "architecture": arch}})
    index = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    idx = "sha256:" + hashlib.sha256(index).hexdigest()
    push_manifest(registry_url, repo, tag if push_tag else idx, index, OCI_INDEX)
    return Image(repo, tag, idx, index, manifests, blobs)


def move_tag(registry_url: str, image: Image, tag: str | None = None) -> None:
    """Point ``tag`` (default the image's own) at ``image``'s index (tag churn)."""
    push_manifest(registry_url, image.repo, tag or image.tag, image.index_body, OCI_INDEX)


# --------------------------------------------------------------------------------------------
# edgecache
# --------------------------------------------------------------------------------------------

class Edge:
    """edgecache as a real process (``python -m edgecache serve --config FILE``)."""

    def __init__(self, workdir: Path, upstream: Registry | str, name: str = "edge", workers: int = 1,
                 event_loop: str = "asyncio", tag_ttl: str = "5m", cache_dir: Path | None = None,
                 tls: tuple[Path, Path] | None = None, max_size: str = "20GiB", port: int | None = None) -> None:
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir or self.dir / "cache"
        self.port = port or free_port()
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.upstream_url = upstream.url if isinstance(upstream, Registry) else upstream
        self.workers, self.event_loop, self.tag_ttl, self.tls, self.max_size = workers, event_loop, tag_ttl, tls, max_size
        self.config_path = self.dir / "edgecache.toml"
        self.log_path = self.dir / "edgecache.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def write_config(self) -> Path:
        host = urlsplit(self.upstream_url).netloc
        tls = ""
        if self.tls:
            tls = f'tls_cert = "{self.tls[0]}"\ntls_key = "{self.tls[1]}"\n'
        self.config_path.write_text(f"""version = 1
[server]
listen = "127.0.0.1:{self.port}"
workers = {self.workers}
event_loop = "{self.event_loop}"
access_log = false
{tls}
[cache]
dir = "{self.cache_dir}"
max_size = "{self.max_size}"

[upstreams.up]
url = "{self.upstream_url}"
namespaces = ["{host}"]
prefix = "up"
default = true
auth = "anonymous"
tag_ttl = "{self.tag_ttl}"
max_stale = "24h"
""")
        return self.config_path

    def start(self, deadline: float = 30.0) -> Edge:
        self.write_config()
        self._log = open(self.log_path, "ab")
        argv = [PYTHON, "-m", "edgecache"]
        self.proc = subprocess.Popen(argv + ["serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if self.tls:
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"edgecache exited with {self.proc.returncode}; see {self.log_path}")
                rc = subprocess.run(["curl", "-skf", "-o", "/dev/null", self.url + "/healthz"]).returncode
                if rc == 0:
                    return self
                time.sleep(0.1)
            raise TimeoutError("edgecache (TLS) not ready")
        wait_http(self.url + "/healthz", deadline, self.proc, ok=(200,))
        if self.workers > 1:  # every worker should be listening before we measure
            time.sleep(1.0)
        return self

    def stop(self) -> int | None:
        _terminate(self.proc, 40)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value} (sums over workers in multiprocess mode)."""
        if self.tls:
            text = subprocess.run(["curl", "-sk", self.url + "/metrics"], capture_output=True, timeout=10).stdout.decode()
        else:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                out[key] = out.get(key, 0.0) + float(value)
            except ValueError:
                pass
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------

class Nginx:
    """nginx serving ``root`` (sendfile on, access log off), everything in a temp prefix."""

    def __init__(self, workdir: Path, root: Path, name: str = "nginx", workers: int = 1, port: int | None = None) -> None:
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> Nginx:
        d = self.dir
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read files in our 0700 temp dirs
        (d / "nginx.conf").write_text(f"""{user}worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    server {{
        listen 127.0.0.1:{self.port} reuseport backlog=1024;
        root {self.root};
        location / {{ }}
    }}
}}
""")
        self._log = open(d / "stderr.log", "ab")
        self.proc = subprocess.Popen([NGINX_BIN, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/", 10, self.proc, ok=(200, 403, 404))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------------------------
# resource sampling
# --------------------------------------------------------------------------------------------

class RssSampler:
    """Peak RSS (process + all children, summed) and open fds, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0  # all processes summed
        self.peak_single = 0  # the largest one process reached
        self.samples = 0
        self.first: tuple[int, int] | None = None  # (rss, fds)
        self.last: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss-{pid}")

    def snapshot(self) -> tuple[int, int]:
        try:
            p = psutil.Process(self.pid)
            procs = [p] + p.children(recursive=True)
        except psutil.Error:
            return 0, 0
        rss = fds = 0
        for q in procs:
            try:
                one = q.memory_info().rss
                rss += one
                fds += q.num_fds()
                self.peak_single = max(self.peak_single, one)
            except psutil.Error:
                pass
        return rss, fds

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = self.snapshot()
            if snap[0]:
                self.first = self.first or snap
                self.last = snap
                self.peak = max(self.peak, snap[0])
                self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def machine_info() -> dict[str, str]:
    import platform

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = subprocess.run([PYTHON, "-c", "import sys, aiohttp; print(sys.version.split()[0], aiohttp.__version__)"],
                              capture_output=True, text=True).stdout.split()
    try:
        uvloop_v = subprocess.run([PYTHON, "-c", "import uvloop; print(uvloop.__version__)"], capture_output=True,
                                  text=True).stdout.strip()
    except OSError:
        uvloop_v = "?"
    nginx_v = subprocess.run([NGINX_BIN, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": versions[0] if versions else "?", "aiohttp": versions[1] if len(versions) > 1 else "?",
            "uvloop": uvloop_v, "nginx": nginx_v, "mem_gib": f"{psutil.virtual_memory().total / 2**30:.1f}"}


def tempdir(prefix: str = "edgecache-load-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
