"""Running it in production: metrics, readiness, graceful shutdown, warm, purge, stats, logs, client access."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecache.app import STATE
from tests.support.edge import EdgeFactory, EdgeProcess, run, self_signed_cert, write_config
from tests.support.registry import RegistryProcess, free_port
from tests.support.tap import Tap

ACCEPT = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"}


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_metrics_count_exactly(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    index_len = len(s.index_bytes)
    digest = s.big_layer_digest
    blob_len = len(s.blobs[digest])
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
                await r.read()
            async with http.get(f"{edge.url}/v2/team/big/blobs/{digest}") as r:
                await r.read()
        async with http.get(f"{edge.url}/v2/library/multi/manifests/nope", headers=ACCEPT) as r:
            assert r.status == 404
        async with http.get(edge.url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    assert sample(text, "edgecache_cache_outcomes_total", outcome="hit") == 2
    assert sample(text, "edgecache_cache_outcomes_total", outcome="miss") == 2
    assert sample(text, "edgecache_served_bytes_total", source="cache") == index_len + blob_len
    assert sample(text, "edgecache_served_bytes_total", source="upstream") == index_len + blob_len
    assert sample(text, "edgecache_requests_total", route="/v2/{name}/manifests/{reference}", status="200") == 2
    assert sample(text, "edgecache_requests_total", route="/v2/{name}/manifests/{reference}", status="404") == 1
    # the latency histogram (applied in batches) counts every request once, in a bucket and in +Inf
    man = "/v2/{name}/manifests/{reference}"
    assert sample(text, "edgecache_request_duration_seconds_count", route=man) == 3
    assert sample(text, "edgecache_request_duration_seconds_bucket", route=man, le="+Inf") == 3
    assert 0 < sample(text, "edgecache_request_duration_seconds_sum", route=man) < 30
    assert sample(text, "edgecache_requests_in_progress") == 1  # the scrape itself
    assert sample(text, "edgecache_upstream_requests_total", upstream="up", method="GET") == tap.count("GET")
    assert sample(text, "edgecache_upstream_bytes_total", upstream="up") == blob_len
    assert sample(text, "edgecache_flights_in_progress") == 0
    assert sample(text, "edgecache_open_blob_files") == 1  # the blob's hit kept its descriptor (8 MiB: small)
    assert "nope" not in text and "team/big" not in text  # route patterns, never raw paths


async def test_readiness_follows_the_cache_dir(edge_factory: EdgeFactory, tap: Tap) -> None:
    edge = await edge_factory(tap.url)
    store = edge.app[STATE].store
    assert store is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(edge.url + "/readyz") as r:
            assert r.status == 200
        shutil.rmtree(store.tmp)
        store.tmp.write_text("not a directory")  # root ignores permissions; a file in the way does not
        async with http.get(edge.url + "/readyz") as r:
            assert r.status == 503
            assert "cache directory not writable" in (await r.json())["problems"]
        async with http.get(edge.url + "/healthz") as r:
            assert r.status == 200  # alive, just not ready
        store.tmp.unlink()
        store.tmp.mkdir()
        async with http.get(edge.url + "/readyz") as r:
            assert r.status == 200


async def test_sigterm_lets_a_cold_download_finish(tmp_path: Path, tap: Tap, registry: RegistryProcess) -> None:
    port = free_port()
    proc = EdgeProcess(write_config(tmp_path, tap.url, port, 'drain_delay = "1s"'), tmp_path / "edge.log")
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.start, url)
    digest = registry.seeded.big_layer_digest
    pause = tap.pause_blob(digest, 2 << 20)
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"{url}/v2/team/big/blobs/{digest}")
            assert resp.status == 200
            await pause.wait_held(1)
            proc.signal(signal.SIGTERM)
            deadline = loop.time() + 5
            while True:  # the signal is handled asynchronously: poll until readiness turns false
                async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 503:
                        assert "draining" in (await r.json())["problems"]
                        break
                assert loop.time() < deadline, "readiness never turned false"
                await asyncio.sleep(0.02)
            pause.release()
            body = await resp.read()
            resp.release()
        assert hashlib.sha256(body).hexdigest() == digest[7:]
        assert await loop.run_in_executor(None, proc.wait, 30) == 0
    finally:
        proc.stop()
    lines = [orjson.loads(line) for line in (tmp_path / "edge.log").read_text().splitlines()]  # every line is JSON
    assert any(d.get("message") == "stopped" for d in lines)
    assert (tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


async def test_warm_then_skopeo_copy_needs_no_upstream_blob(edge_factory: EdgeFactory, tap: Tap,
                                                            registry: RegistryProcess, tmp_path: Path) -> None:
    edge = await edge_factory(tap.url)
    code, out = await run(sys.executable, "-m", "edgecache", "warm", "--url", edge.url, "--platform", "linux/amd64",
                          "--quiet", "library/multi:v1")
    assert code == 0, out
    assert "warmed 1/1 images" in out
    gets = tap.count("GET", "blob")
    assert gets == 1 + len(registry.seeded.layers["amd64"])  # config and layers of linux/amd64 only
    code, out = await run("skopeo", "copy", "--src-tls-verify=false", "--override-arch", "amd64", "--override-os",
                          "linux", f"docker://{edge.host}/library/multi:v1", f"oci:{tmp_path / 'layout'}:v1")
    assert code == 0, out
    assert tap.count("GET", "blob") == gets


async def test_purge_and_stats(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    edge = await edge_factory(tap.url, cache_dir=cache)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
                assert r.status == 200
    await edge.stop()
    env = {"EDGECACHE_CACHE_DIR": str(cache)}
    code, out = await run(sys.executable, "-m", "edgecache", "stats", "--config", "/dev/null", env=env)
    assert code == 2  # an empty file is not a valid config (no version): said clearly
    cfg = tmp_path / "e.toml"
    cfg.write_text(f'version = 1\n[cache]\ndir = "{cache}"\n')
    code, out = await run(sys.executable, "-m", "edgecache", "stats", "--config", str(cfg))
    assert code == 0, out
    doc = orjson.loads(out[out.index("{"):])
    assert doc["entries"] >= 1 and doc["bytes_used"] >= len(registry.seeded.index_bytes)
    assert doc["requests"]["hit"] == 2 and doc["requests"]["miss"] == 1 and doc["hit_ratio"] == pytest.approx(2 / 3, 0.01)
    code, out = await run(sys.executable, "-m", "edgecache", "purge", "--config", str(cfg), "--tag", "up/library/multi:v1")
    assert code == 0 and "purged" in out
    tap.reset()
    edge = await edge_factory(tap.url, cache_dir=cache)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 200
    assert tap.count("GET", "manifest") == 1  # the purged tag was resolved upstream again


async def test_check_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[server]\nlisten = "127.0.0.1:5000"\nworkrs = 2\n')
    code, out = await run(sys.executable, "-m", "edgecache", "check-config", str(bad))
    assert code == 2 and "workrs" in out
    root = Path(__file__).resolve().parents[2]
    code, out = await run(sys.executable, "-m", "edgecache", "check-config", str(root / "config" / "edgecache.toml"))
    assert code == 0 and "registry-1.docker.io" in out


async def test_client_basic_auth_and_cidr(edge_factory: EdgeFactory, tap: Tap, tmp_path: Path) -> None:
    import base64

    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ops:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode() + "\n")
    edge = await edge_factory(tap.url, server={"htpasswd": str(htpasswd)})
    good = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode(), **ACCEPT}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ops:nope").decode(), **ACCEPT}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=bad) as r:
            assert r.status == 401
        async with http.get(f"{edge.url}/v2/library/multi/manifests/v1", headers=good) as r:
            assert r.status == 200
        async with http.get(f"{edge.url}/healthz") as r:
            assert r.status == 200
    denied = await edge_factory(tap.url, server={"allow_cidrs": ["10.0.0.0/8"]})
    allowed = await edge_factory(tap.url, server={"allow_cidrs": ["127.0.0.0/8"]})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{denied.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 403 and (await r.json())["errors"][0]["code"] == "DENIED"
        async with http.get(f"{allowed.url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 200


async def test_tls_serving(tmp_path: Path, tap: Tap, registry: RegistryProcess) -> None:
    cert_file, key_file = self_signed_cert(tmp_path)
    port = free_port()
    extra = f'tls_cert = "{cert_file}"\ntls_key = "{key_file}"'
    proc = EdgeProcess(write_config(tmp_path, tap.url, port, extra), tmp_path / "edge.log")
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    loop = asyncio.get_running_loop()
    import urllib.request

    def ready() -> None:
        import time

        proc.start_nowait()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", context=ctx, timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    await loop.run_in_executor(None, ready)
    try:
        digest = registry.seeded.big_layer_digest
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            for expected in ("MISS", "HIT"):
                async with http.get(f"{url}/v2/team/big/blobs/{digest}") as r:
                    assert r.status == 200 and r.headers["X-Cache"] == expected
                    assert hashlib.sha256(await r.read()).hexdigest() == digest[7:]
    finally:
        proc.stop()


async def test_slowloris_clients_are_cut_off(tmp_path: Path, tap: Tap) -> None:
    """Clients trickling a request head byte by byte are disconnected after header_timeout; others are served."""
    port = free_port()
    proc = EdgeProcess(write_config(tmp_path, tap.url, port, 'header_timeout = "1s"'), tmp_path / "edge.log")
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.start, url)
    cut_after: list[float] = []

    async def slow() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = loop.time()
        try:
            for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                if reader.at_eof():
                    break
                try:
                    if await asyncio.wait_for(reader.read(1), 0.25) == b"":
                        break
                except asyncio.TimeoutError:
                    pass
            cut_after.append(loop.time() - started)
        except ConnectionError:
            cut_after.append(loop.time() - started)
        finally:
            writer.close()

    try:
        slow_tasks = [asyncio.ensure_future(slow()) for _ in range(20)]
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                t0 = loop.time()
                async with http.get(url + "/healthz") as r:
                    assert r.status == 200
                assert loop.time() - t0 < 1.0  # not starved
        await asyncio.wait_for(asyncio.gather(*slow_tasks), 30)
        assert len(cut_after) == 20
        assert max(cut_after) < 10  # 1 s timeout, swept every 0.25 s: cut long before the 200 bytes (>50 s)
    finally:
        proc.stop()


async def test_sighup_reloads_the_upstream_table(tmp_path: Path, tap: Tap, make_tap: object,
                                                 registry: RegistryProcess) -> None:
    """SIGHUP swaps in a new upstream table without dropping the connection in use."""
    port = free_port()
    cfg = write_config(tmp_path, tap.url, port)
    proc = EdgeProcess(cfg, tmp_path / "edge.log")
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.start, url)
    second = await make_tap(registry.url)  # type: ignore[operator]
    try:
        async with aiohttp.ClientSession() as http:  # one keep-alive connection throughout
            async with http.get(f"{url}/v2/library/multi/manifests/v1?ns=second.example", headers=ACCEPT) as r:
                assert r.status == 404  # not configured yet
            cfg.write_text(cfg.read_text() + f"""
[upstreams.second]
url = "{second.url}"
namespaces = ["second.example"]
prefix = "second"
""")
            proc.signal(signal.SIGHUP)
            deadline = loop.time() + 10
            while True:  # the reload is asynchronous: poll with a deadline
                async with http.get(f"{url}/v2/library/multi/manifests/v1?ns=second.example", headers=ACCEPT) as r:
                    if r.status == 200:
                        break
                assert loop.time() < deadline, "reload did not take effect"
                await asyncio.sleep(0.05)
            assert second.count("GET", "manifest") == 1
            async with http.get(f"{url}/v2/library/multi/manifests/v1", headers=ACCEPT) as r:
                assert r.status == 200  # the old default upstream still works
        cfg.write_text("version = 1\n[server]\nbogus = 1\n")
        proc.signal(signal.SIGHUP)  # a broken file is refused and the running table kept
        async with aiohttp.ClientSession() as http:
            deadline = loop.time() + 10
            while "config error" not in (tmp_path / "edge.log").read_text():
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
            async with http.get(f"{url}/v2/library/multi/manifests/v1?ns=second.example", headers=ACCEPT) as r:
                assert r.status == 200
    finally:
        assert proc.stop() == 0
