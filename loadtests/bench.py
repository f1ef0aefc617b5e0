#!/usr/bin/env python3
"""Side-by-side benchmarks: edgecache vs nginx (sendfile) vs distribution's proxy mode.

    python loadtests/bench.py              # full run (~5-10 min on 2 cores), appends to loadtests/RESULTS.md
    python loadtests/bench.py --quick      # small sizes, sanity only
    python loadtests/bench.py --only a,d   # some sections

Sections (see loadtests/README.md):
  a  warm 512 MiB blob, 1 and 8 curl clients: MB/s, edgecache (asyncio, uvloop) vs nginx  (target >= 90%)
  b  1,000 x 1 MiB blobs, wrk -c32 rotating paths: req/s edgecache vs nginx                (target >= 65%)
  c  manifest by digest and by fresh tag, wrk -t2 -c64 -d10s: edgecache workers=1/2 and
     distribution proxy mode                                                                (target >= 15,000 req/s)
  d  cold storm: 32 curl clients x one 128 MiB blob on an empty cache: upstream GETs, TTFB,
     total time, sha256 of every body; vs distribution proxy mode and vs nginx
     (targets: exactly 1 upstream GET, TTFB p50 <= 50 ms, total <= 1.25x nginx)
  e  peak RSS of every edgecache instance during the run                                    (target <= 100 MiB)
  f  TLS: edgecache with tls_cert/tls_key, 512 MiB, 1 client (curl -k) vs plain

Clients are the same for every server: curl processes for a/d/f, wrk for b/c. Everything on
127.0.0.1, every loop bounded. Client and server share the 2 cores: these are relative figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support
import harness  # noqa: E402
from harness import MiB, Edge, Nginx, Registry, RssSampler  # noqa: E402
from tests.support.edge import self_signed_cert  # noqa: E402  (the one certificate helper)

HERE = Path(__file__).resolve().parent
MB = 1e6
OCI_MANIFEST = harness.OCI_MANIFEST


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Row:
    section: str
    measure: str
    edge: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rss: dict[str, tuple[float, float]] = field(default_factory=dict)  # instance -> (peak sum, peak one process) MiB

    def add(self, *a: Any, **kw: Any) -> None:
        r = Row(*a, **kw)
        self.rows.append(r)
        log(f"{r.section} {r.measure}: edgecache {r.edge} | ref {r.reference} | ratio {r.ratio} | target {r.target} {r.met}")


def target(loop: str, wanted: str, ok: bool) -> tuple[str, str]:
    """The target columns: the default event loop is held to the target; the uvloop option is shown for
    information (uvloop has no loop.sendfile, so blobs go through Python; see loadtests/README.md)."""
    if loop == "uvloop":
        return f"(option; {wanted} is for the default loop)", ""
    return wanted, yes(ok)


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


# --------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------

def curl_parallel(urls: list[str], insecure: bool = False, timeout: float = 300) -> dict[str, Any]:
    """One curl process per URL, started together; aggregate MB/s = all bytes / wall time."""
    fmt = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", fmt] + (["-k"] if insecure else [])
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd + [u], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for u in urls]
    outs = [p.communicate(timeout=timeout)[0].decode().split() for p in procs]
    wall = time.monotonic() - t0
    codes = [o[0] if o else "?" for o in outs]
    total = sum(int(o[1]) for o in outs if len(o) == 4)
    return {"wall": wall, "bytes": total, "mbps": total / wall / MB, "codes": codes,
            "ok": all(c == "200" for c in codes)}


def curl_best(urls: list[str], reps: int, insecure: bool = False) -> dict[str, Any]:
    """``reps`` runs; the median MB/s (and whether every response was a 200 of the full size)."""
    runs = [curl_parallel(urls, insecure) for _ in range(reps)]
    return {"mbps": statistics.median(r["mbps"] for r in runs), "ok": all(r["ok"] for r in runs),
            "runs": [round(r["mbps"]) for r in runs], "bytes": runs[0]["bytes"]}


def storm(url: str, n: int, size: int, digest: str, timeout: float = 300) -> dict[str, Any]:
    """n clients at once, each piping the body into sha256sum: TTFB, total time, digest of every body.

    The clients are started first and released together: each is ``curl -K -`` waiting for its URL
    on stdin, already piped into its sha256sum. Spawning 96 processes (bash, curl, sha256sum) inside
    the measured window would load the 2 cores for the first ~200 ms and time the start-ups, not the
    servers (that variant gave every server a TTFB p50 several times higher, edgecache most of all,
    since its first answer needs the upstream too).
    """
    fmt = "%{stderr}%{http_code} %{time_starttransfer} %{time_total} %{size_download}\\n"
    script = f"set -o pipefail; curl -sS -K - -w '{fmt}' | sha256sum"
    procs = [subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(n)]
    time.sleep(1.0)  # every curl is up and blocked reading its config
    config = f'url = "{url}"\n'.encode()
    t0 = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(config)
        p.stdin.close()
    results = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()  # a line each: no pipe fills up
        p.wait(timeout=timeout)
        results.append((p.returncode, out.decode().split()[0] if out.strip() else "", err.decode().strip()))
    total = time.monotonic() - t0
    ttfb, bad = [], []
    for rc, sha, err in results:
        parts = err.splitlines()[-1].split() if err else []
        if rc != 0 or len(parts) != 4 or parts[0] != "200" or int(parts[3]) != size or "sha256:" + sha != digest:
            bad.append(f"rc={rc} curl={err[-200:]!r} sha={sha[:12]}")
            continue
        ttfb.append(float(parts[1]))
    return {"total": total, "ttfb_p50": statistics.median(ttfb) if ttfb else float("nan"),
            "ttfb_max": max(ttfb) if ttfb else float("nan"), "ok": len(ttfb), "bad": bad}


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_REQS = re.compile(r"(\d+) requests in")


def wrk(url: str, conns: int, seconds: int, headers: dict[str, str] | None = None, script: Path | None = None,
        script_args: list[str] | None = None) -> dict[str, Any]:
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if script:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if script_args:
        cmd += ["--"] + script_args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = _WRK_RPS.search(out)
    errors = int(_WRK_NON2XX.search(out).group(1)) if _WRK_NON2XX.search(out) else 0
    se = _WRK_SOCKERR.search(out)
    sock = sum(int(x) for x in se.groups()) if se else 0
    reqs = int(_WRK_REQS.search(out).group(1)) if _WRK_REQS.search(out) else 0
    return {"rps": float(m.group(1)) if m else 0.0, "non2xx": errors, "sockerr": sock, "requests": reqs, "raw": out}


WRK_ROTATE = """-- rotate through the paths listed in the file given after --
local counter = 1
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  paths = {}
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  i = ((id or 1) - 1) * math.floor(#paths / 2)
end
function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=300) as r:
        body = r.read() if method == "GET" else b""
        return r.status, dict(r.headers), body


def wait_hit(url: str, deadline: float = 60) -> None:
    """Until HEAD answers X-Cache: HIT (the fill is committed), bounded."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        _, h, _ = fetch(url, method="HEAD")
        if h.get("X-Cache") == "HIT":
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} never became a HIT")


def drain_get(url: str) -> None:
    subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True, timeout=300)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.only = set(args.only.split(",")) if args.only else set("abcdef")
        q = args.quick
        self.big_size = (64 if q else 512) * MiB
        self.small_count = 100 if q else 1000
        self.storm_size = (16 if q else 128) * MiB
        self.storm_clients = 32
        self.reps = 2 if q else 3
        self.wrk_seconds = 3 if q else 10
        self.work = harness.tempdir("edgecache-bench-")
        self.files = self.work / "files"
        self.files.mkdir()
        os.chmod(self.work, 0o755)
        self.res = Results()
        self.procs: list[Any] = []

    def started(self, thing: Any) -> Any:
        self.procs.append(thing)
        return thing

    def stop(self, thing: Any) -> None:
        thing.stop()
        if thing in self.procs:
            self.procs.remove(thing)

    def edge(self, name: str, **kw: Any) -> tuple[Edge, RssSampler]:
        e = self.started(Edge(self.work, self.registry, name=name, **kw).start())
        return e, RssSampler(e.pid).start()

    def stop_edge(self, name: str, e: Edge, s: RssSampler) -> None:
        s.stop()
        self.res.rss[name] = (s.peak / MiB, s.peak_single / MiB)
        self.stop(e)

    def seed(self) -> None:
        t0 = time.monotonic()
        self.registry = self.started(Registry(self.work, "upstream").start())
        need_big = self.only & set("af")
        need_small = "b" in self.only
        need_storm = "d" in self.only
        if need_big:
            self.big_digest = harness.random_file(self.files / "big.bin", self.big_size)
            harness.push_blob(self.registry.url, "bench/big", self.files / "big.bin", self.big_digest)
        if need_storm:
            self.storm_digest = harness.random_file(self.files / "storm.bin", self.storm_size)
            harness.push_blob(self.registry.url, "bench/storm", self.files / "storm.bin", self.storm_digest)
        self.small: list[str] = []
        if need_small:
            (self.files / "small").mkdir()

            def one(i: int) -> str:
                data = os.urandom(MiB)
                d, _ = harness.push_blob(self.registry.url, "bench/small", data)
                (self.files / "small" / f"{i}.bin").write_bytes(data)
                return d

            with ThreadPoolExecutor(4) as ex:
                self.small = list(ex.map(one, range(self.small_count)))
        # (c): a single-platform OCI manifest under a tag, and the multi-platform image
        self.img = harness.seed_image(self.registry.url, "bench/man", "multi", [4096, 4096])
        _, body = self.img.manifests["linux/amd64"]
        self.man_digest = harness.push_manifest(self.registry.url, "bench/man", "single", body, OCI_MANIFEST)
        self.man_body = body
        self.nginx = self.started(Nginx(self.work, self.files).start())
        self.shared_cache = self.work / "shared-cache"
        log(f"seeded in {time.monotonic() - t0:.1f}s (work dir {self.work})")

    # a, b, c for one edgecache instance --------------------------------------------------------
    def edge_suite(self, name: str, loop: str) -> None:
        e, s = self.edge(name, event_loop=loop, cache_dir=self.shared_cache)
        try:
            if self.only & set("af"):
                url = f"{e.url}/v2/up/bench/big/blobs/{self.big_digest}"
                drain_get(url)
                wait_hit(url)
                got = subprocess.run(f"curl -s {shlex.quote(url)} | sha256sum", shell=True, capture_output=True,
                                     text=True).stdout.split()[0]
                if "sha256:" + got != self.big_digest:
                    self.res.notes.append(f"{name}: 512 MiB blob body did not match its digest!")
            if "a" in self.only:
                for n in (1, 8):
                    mine = curl_best([url] * n, self.reps)
                    ref = self.nginx_big[n]
                    ratio = mine["mbps"] / ref["mbps"]
                    ok = mine["ok"]
                    if not ok:
                        self.res.notes.append(f"a: {name} {n} clients: non-200 or short responses")
                    self.res.add("a", f"warm {self.big_size // MiB} MiB blob, {n} client{'s' if n > 1 else ''}, "
                                      f"MB/s ({loop})", f"{mine['mbps']:.0f} {mine['runs']}",
                                 f"nginx {ref['mbps']:.0f} {ref['runs']}", f"{ratio:.0%}", *target(loop, ">= 90%",
                                 ratio >= 0.9 and ok))
                    if loop == "asyncio" and n == 1:
                        self.plain_1 = mine
            if "b" in self.only:
                paths = [f"/v2/up/bench/small/blobs/{d}" for d in self.small]
                t0 = time.monotonic()
                with ThreadPoolExecutor(8) as ex:
                    list(ex.map(lambda p: drain_get(e.url + p), paths))
                for p in paths[:3]:
                    wait_hit(e.url + p)
                log(f"b: pre-warmed {len(paths)} blobs in {time.monotonic() - t0:.1f}s")
                pf = self.work / f"paths-{name}.txt"
                pf.write_text("\n".join(paths) + "\n")
                mine = wrk(e.url + paths[0], 32, self.wrk_seconds, script=self.rotate, script_args=[str(pf)])
                ref = self.nginx_small
                ratio = mine["rps"] / ref["rps"] if ref["rps"] else 0
                errs = mine["non2xx"] + mine["sockerr"]
                self.res.add("b", f"{self.small_count} x 1 MiB blobs, wrk -c32 {self.wrk_seconds}s, req/s ({loop})",
                             f"{mine['rps']:.0f} (errors {errs})", f"nginx {ref['rps']:.0f}", f"{ratio:.0%}",
                             *target(loop, ">= 65%", ratio >= 0.65 and errs == 0))
            if "c" in self.only and loop == "asyncio":
                self.manifest_suite(e, "edgecache workers=1", "/v2/up/bench/man")
        finally:
            self.stop_edge(name, e, s)

    def bare_manifest(self) -> float:
        """The same run's ceiling: a bare aiohttp handler answering the same manifest, one process."""
        body = self.work / "bare-manifest.json"
        body.write_bytes(self.man_body)
        port = harness.free_port()
        proc = subprocess.Popen([harness.PYTHON, str(HERE / "bare_manifest.py"), str(port), str(body)])
        try:
            harness.wait_http(f"http://127.0.0.1:{port}/v2/x/manifests/y", 20, proc)
            r = wrk(f"http://127.0.0.1:{port}/v2/bench/man/manifests/single", 64, self.wrk_seconds,
                    headers={"Accept": OCI_MANIFEST})
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        self.res.add("c", f"reference: bare aiohttp handler, constant manifest, 1 process, wrk -t2 -c64 "
                          f"{self.wrk_seconds}s, req/s", "", f"{r['rps']:.0f}", "", "(the same run's ceiling)", "")
        return float(r["rps"])

    def manifest_suite(self, server: Any, label: str, base: str) -> None:
        h = {"Accept": OCI_MANIFEST}
        bare = getattr(self, "bare_rps", None)
        for what, ref in (("by digest", self.man_digest), ("by fresh tag", "single")):
            url = f"{server.url}{base}/manifests/{ref}"
            status, headers, _ = fetch(url, h)  # fills the cache / the tag
            status, headers, _ = fetch(url, h)
            r = wrk(url, 64, self.wrk_seconds, headers=h)
            errs = r["non2xx"] + r["sockerr"]
            xc = headers.get("X-Cache", "-")
            mine = "edgecache" in label
            self.res.add("c", f"manifest {what}, wrk -t2 -c64 {self.wrk_seconds}s, req/s ({label})",
                         f"{r['rps']:.0f} (errors {errs}, X-Cache {xc})" if mine else "",
                         (f"bare aiohttp {bare:.0f}" if bare else "") if mine else f"{r['rps']:.0f} (errors {errs})",
                         f"{r['rps'] / bare:.0%}" if mine and bare else "",
                         ">= 15000", yes(r["rps"] >= 15000 and errs == 0) if mine else "")

    def run(self) -> None:
        self.rotate = self.work / "rotate.lua"
        self.rotate.write_text(WRK_ROTATE)
        self.seed()
        ng = self.nginx
        if "a" in self.only:
            self.nginx_big = {n: curl_best([f"{ng.url}/big.bin"] * n, self.reps) for n in (1, 8)}
        if "b" in self.only:
            pf = self.work / "paths-nginx.txt"
            pf.write_text("\n".join(f"/small/{i}.bin" for i in range(self.small_count)) + "\n")
            self.nginx_small = wrk(f"{ng.url}/small/0.bin", 32, self.wrk_seconds, script=self.rotate,
                                   script_args=[str(pf)])
        if "c" in self.only:
            self.bare_rps = self.bare_manifest()
        if self.only & set("abcf"):
            self.edge_suite("edgecache asyncio w=1", "asyncio")
        if self.only & set("ab"):
            self.edge_suite("edgecache uvloop w=1", "uvloop")
        if "c" in self.only:
            e, s = self.edge("edgecache asyncio w=2", workers=2, cache_dir=self.shared_cache)
            try:
                self.manifest_suite(e, "edgecache workers=2", "/v2/up/bench/man")
            finally:
                self.stop_edge("edgecache asyncio w=2", e, s)
            proxy = self.started(Registry(self.work, "dist-proxy-c", proxy_remote=self.registry.url).start())
            try:
                self.manifest_suite(proxy, "distribution proxy", "/v2/bench/man")
            finally:
                self.stop(proxy)
        if "f" in self.only:
            self.tls_suite()
        if "d" in self.only:
            self.storm_suite()
        if "e" in self.only or True:
            for name, (peak, one) in self.res.rss.items():
                if "w=2" in name:  # supervisor + 2 workers: the target is read per process; the sum is shown
                    self.res.add("e", f"peak RSS, {name} (3 processes)", f"sum {peak:.1f} MiB, largest process {one:.1f}",
                                 "", "", "<= 100 MiB per process", yes(one <= 100))
                else:
                    self.res.add("e", f"peak RSS, {name}", f"{peak:.1f} MiB", "", "", "<= 100 MiB", yes(peak <= 100))

    def tls_suite(self) -> None:
        cert, key = self_signed_cert(self.work)
        e, s = self.edge("edgecache TLS w=1", cache_dir=self.shared_cache, tls=(cert, key))
        try:
            url = f"{e.url}/v2/up/bench/big/blobs/{self.big_digest}"
            mine = curl_best([url], self.reps, insecure=True)
            plain = getattr(self, "plain_1", None)
            if plain is None:  # section a did not run: measure plain HTTP here with the same client
                p, ps = self.edge("edgecache plain w=1 (f ref)", cache_dir=self.shared_cache)
                try:
                    plain = curl_best([f"{p.url}/v2/up/bench/big/blobs/{self.big_digest}"], self.reps)
                finally:
                    self.stop_edge("edgecache plain w=1 (f ref)", p, ps)
            ref = f"plain HTTP {plain['mbps']:.0f}" if plain else ""
            ratio = f"{mine['mbps'] / plain['mbps']:.0%}" if plain else ""
            self.res.add("f", f"TLS, warm {self.big_size // MiB} MiB blob, 1 client (curl -k), MB/s",
                         f"{mine['mbps']:.0f} {mine['runs']}" + ("" if mine["ok"] else " (ERRORS)"), ref, ratio,
                         "(informational)", "")
        finally:
            self.stop_edge("edgecache TLS w=1", e, s)

    def storm_suite(self) -> None:
        n, size, digest = self.storm_clients, self.storm_size, self.storm_digest
        mib = size // MiB
        ref = storm(f"{self.nginx.url}/storm.bin", n, size, digest)
        log(f"d: nginx storm total {ref['total']:.2f}s ttfb p50 {ref['ttfb_p50'] * 1000:.1f} ms, ok {ref['ok']}/{n}")
        rows = {}
        # edgecache: an empty cache dir
        e, s = self.edge("edgecache cold storm", cache_dir=self.work / "storm-cache")
        try:
            mark = self.registry.log_mark()
            mine = storm(f"{e.url}/v2/up/bench/storm/blobs/{digest}", n, size, digest)
            gets = self.registry.count(mark, "GET", "blobs", digest)
            others = [r for r in self.registry.requests(mark) if r[1].split("?")[0].endswith(digest)]
            rows["edgecache"] = (mine, gets, others)
        finally:
            self.stop_edge("edgecache cold storm", e, s)
        proxy = self.started(Registry(self.work, "dist-proxy-d", proxy_remote=self.registry.url).start())
        try:
            mark = self.registry.log_mark()
            theirs = storm(f"{proxy.url}/v2/bench/storm/blobs/{digest}", n, size, digest)
            gets = self.registry.count(mark, "GET", "blobs", digest)
            others = [r for r in self.registry.requests(mark) if r[1].split("?")[0].endswith(digest)]
            rows["distribution proxy"] = (theirs, gets, others)
        finally:
            self.stop(proxy)
        for label, (r, gets, others) in rows.items():
            for b in r["bad"][:5]:
                self.res.notes.append(f"d: {label}: bad body/response: {b}")
            methods: dict[str, int] = {}
            for m, _p, st in others:
                methods[f"{m} {st}"] = methods.get(f"{m} {st}", 0) + 1
            self.res.notes.append(f"d: {label}: upstream requests for the storm blob: {methods}")
        me, gets, _ = rows["edgecache"]
        de, dgets, _ = rows["distribution proxy"]
        self.res.add("d", f"cold storm {n} x {mib} MiB: upstream GETs of the blob", str(gets),
                     f"distribution proxy {dgets}", "", "exactly 1", yes(gets == 1))
        self.res.add("d", f"cold storm {n} x {mib} MiB: bodies with the right sha256", f"{me['ok']}/{n}",
                     f"distribution proxy {de['ok']}/{n}; nginx {ref['ok']}/{n}", "", f"{n}/{n}", yes(me["ok"] == n))
        self.res.add("d", f"cold storm {n} x {mib} MiB: TTFB p50 / max, ms",
                     f"{me['ttfb_p50'] * 1000:.1f} / {me['ttfb_max'] * 1000:.1f}",
                     f"distribution proxy {de['ttfb_p50'] * 1000:.1f} / {de['ttfb_max'] * 1000:.1f}; "
                     f"nginx {ref['ttfb_p50'] * 1000:.1f} / {ref['ttfb_max'] * 1000:.1f}", "", "p50 <= 50 ms",
                     yes(me["ttfb_p50"] <= 0.05))
        self.res.add("d", f"cold storm {n} x {mib} MiB: total time, s", f"{me['total']:.2f}",
                     f"nginx {ref['total']:.2f}; distribution proxy {de['total']:.2f}",
                     f"{me['total'] / ref['total']:.2f}x nginx", "<= 1.25x nginx",
                     yes(me["total"] <= 1.25 * ref["total"]))

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                log(f"stop {p}: {e!r}")
        if not self.args.keep:
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")

    def markdown(self, seconds: float, argv: list[str]) -> str:
        info = harness.machine_info()
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        kind = "quick" if self.args.quick else "full"
        lines = [f"## {stamp} ({kind} run{', only ' + self.args.only if self.args.only else ''})", "",
                 f"Machine: nproc {info['nproc']}, {info['cpu']}, {info['mem_gib']} GiB RAM, kernel {info['kernel']}; "
                 f"Python {info['python']}, aiohttp {info['aiohttp']}, uvloop {info['uvloop']}, nginx {info['nginx']}, "
                 f"distribution 2.8 (Debian docker-registry), wrk 4.1, curl.", "",
                 f"Command: `{' '.join(['python', 'loadtests/bench.py'] + argv)}` ({seconds:.0f} s). "
                 "Clients and servers share the same cores; nginx runs 1 worker process (as edgecache workers=1). "
                 "MB = 10^6 bytes; a and f: median of runs shown in brackets.", "",
                 "| # | measure | edgecache | reference | ratio | target | met |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.res.rows:
            lines.append(f"| {r.section} | {r.measure} | {r.edge} | {r.reference} | {r.ratio} | {r.target} | {r.met} |")
        if self.res.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.res.notes]
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity run in about a minute")
    p.add_argument("--only", help="comma-separated sections: a,b,c,d,e,f")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to append to")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    args = p.parse_args(argv)
    for tool in ("wrk", "curl", harness.NGINX_BIN, harness.REGISTRY_BIN):
        if not (Path(tool).exists() or subprocess.run(["which", tool], capture_output=True).returncode == 0):
            print(f"bench: {tool} is missing (apt-get install wrk curl nginx-light docker-registry)", file=sys.stderr)
            return 2
    b = Bench(args)
    t0 = time.monotonic()
    try:
        b.run()
    finally:
        b.cleanup()
    md = b.markdown(time.monotonic() - t0, argv)
    print()
    print(md)
    if not args.no_write:
        out = Path(args.out)
        if not out.exists():
            out.write_text("# edgecache benchmark results\n\nAppended by `loadtests/bench.py`; newest last.\n\n")
        with open(out, "a") as f:
            f.write("\n" + md)
        log(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
