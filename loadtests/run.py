#!/usr/bin/env python3
"""Headless load run: registry + edgecache + seeded images + locust, then a summary.

    python loadtests/run.py --scenario warm --seconds 20 --users 10 [--layer-mib 4]
    python loadtests/run.py --scenario soak --seconds 600        # faults every minute; not in make test

Scenarios: cold, warm, churn, mixed, soak (see loadtests/README.md). Exit status 1 when
failures exceed --max-failures (default 0), when no request was made, or when locust failed.
The last line printed is ``SUMMARY_JSON {...}`` for scripts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import CONTAINERD_ACCEPT, MiB, Edge, Image, Registry, RssSampler  # noqa: E402

HERE = Path(__file__).resolve().parent
LOCUST = str(Path(harness.PYTHON).parent / "locust")

DEFAULT_IMAGES = {"cold": 6, "warm": 4, "churn": 4, "mixed": 16, "soak": 8}
CHURN_VERSIONS = 3


def log(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepull(edge: Edge, image: Image) -> None:
    """Pull every platform of ``image`` through edgecache once (checking digests), so the run starts warm."""
    base = f"{edge.url}/v2/up/{image.repo}"

    def get(path: str, digest: str, accept: str | None = None) -> bytes:
        req = urllib.request.Request(base + path, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            body = r.read()
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RuntimeError(f"prepull: {path} does not match {digest}")
        return body

    req = urllib.request.Request(f"{base}/manifests/{image.tag}", method="HEAD", headers={"Accept": CONTAINERD_ACCEPT})
    with urllib.request.urlopen(req, timeout=30):
        pass
    get(f"/manifests/{image.index_digest}", image.index_digest, CONTAINERD_ACCEPT)
    for digest, _body in image.manifests.values():
        get(f"/manifests/{digest}", digest, harness.OCI_MANIFEST)
    for digest in image.blobs:
        get(f"/blobs/{digest}", digest)


def disconnect_storm(edge: Edge, paths: list[str], n: int = 64) -> int:
    """Clients that vanish mid-transfer: request a blob, read a little, reset the connection."""
    done = 0
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
            path = paths[i % len(paths)]
            if i % 3 == 2:  # half a request line, then gone
                s.sendall(f"GET {path} HTTP/1.1\r\nHo".encode())
            else:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(4096)
            s.close()
            done += 1
        except OSError:
            pass
    return done


class Faults(threading.Thread):
    """Background actions during the run: tag moves (churn) or a fault every minute (soak)."""

    def __init__(self, scenario: str, registry: Registry, edge: Edge, versions: dict[str, list[Image]],
                 blob_paths: list[str], stop_at: float, interval: float) -> None:
        super().__init__(daemon=True, name="faults")
        self.scenario, self.registry, self.edge, self.versions = scenario, registry, edge, versions
        self.blob_paths, self.stop_at, self.interval = blob_paths, stop_at, interval
        self.events: list[str] = []
        self.tag_moves = 0
        self._halt = threading.Event()
        self._current = {k: 0 for k in versions}

    def move_a_tag(self) -> None:
        key = random.choice(list(self.versions))
        self._current[key] = (self._current[key] + 1) % len(self.versions[key])
        harness.move_tag(self.registry.url, self.versions[key][self._current[key]])
        self.tag_moves += 1

    def run(self) -> None:
        kinds = ["upstream restart", "tag moved", "client disconnect storm"]
        n = 0
        while not self._halt.wait(self.interval) and time.monotonic() < self.stop_at:
            try:
                if self.scenario == "churn":
                    self.move_a_tag()
                    continue
                kind = kinds[n % len(kinds)]
                n += 1
                t0 = time.monotonic()
                if kind == "upstream restart":
                    self.registry.stop()
                    time.sleep(2.0)  # upstream down for 2 s: tags must be served stale, blobs from cache
                    self.registry.start()
                elif kind == "tag moved":
                    for _ in range(len(self.versions)):
                        self.move_a_tag()
                else:
                    disconnect_storm(self.edge, self.blob_paths)
                self.events.append(f"{time.strftime('%H:%M:%S')} {kind} ({time.monotonic() - t0:.1f}s)")
                log(f"fault injected: {kind}")
            except Exception as e:  # keep the run going; report it
                self.events.append(f"{time.strftime('%H:%M:%S')} fault error: {e!r}")
                log(f"fault error: {e!r}")

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def read_locust_csv(prefix: Path) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    by_name = {}
    for row in rows:
        entry = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                 "rps": float(row["Requests/s"]), "p50": row["50%"], "p95": row["95%"], "p99": row["99%"],
                 "avg_ms": float(row["Average Response Time"] or 0)}
        if row["Name"] == "Aggregated":
            stats["total"] = entry
        else:
            by_name[f"{row['Type']} {row['Name']}"] = entry
    stats["by_name"] = by_name
    failures = []
    try:
        with open(f"{prefix}_failures.csv") as f:
            for row in csv.DictReader(f):
                failures.append(f"{row['Occurrences']}x {row['Method']} {row['Name']}: {row['Error'][:300]}")
    except FileNotFoundError:
        pass
    stats["failure_messages"] = failures
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(DEFAULT_IMAGES), default="warm")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--layer-mib", type=float, default=4.0, help="size of each layer (default 4)")
    p.add_argument("--layers", type=int, default=2, help="layers per platform manifest (default 2)")
    p.add_argument("--images", type=int, help="images to seed (default depends on the scenario)")
    p.add_argument("--workers", type=int, default=1, help="edgecache server.workers")
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--range-fraction", type=float, default=0.25)
    p.add_argument("--max-failures", type=int, default=0, help="exit 1 above this many failed requests")
    p.add_argument("--fault-interval", type=float, help="seconds between faults (soak 60) or tag moves (churn 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) and print its path")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.users <= 0:
        p.error("--seconds and --users must be positive")

    work = harness.tempdir("edgecache-run-")
    scenario = args.scenario
    n_images = args.images or DEFAULT_IMAGES[scenario]
    layer_size = max(1, int(args.layer_mib * MiB))
    tag_ttl = {"churn": "1s", "soak": "5s"}.get(scenario, "5m")
    registry = Registry(work).start()
    edge: Edge | None = None
    sampler: RssSampler | None = None
    faults: Faults | None = None
    try:
        t0 = time.monotonic()
        versions: dict[str, list[Image]] = {}
        plan_images = []
        all_images: list[Image] = []
        for i in range(n_images):
            repo, tag = f"load/img{i}", "latest"
            n_versions = CHURN_VERSIONS if scenario in ("churn", "soak") else 1
            imgs = [harness.seed_image(registry.url, repo, tag, [layer_size] * args.layers, salt=f"{i}.{v}",
                                       push_tag=(v == 0)) for v in range(n_versions)]
            versions[repo] = imgs
            all_images += imgs
            plan_images.append({"repo": repo, "tag": tag, "valid": [im.index_digest for im in imgs]})
        distinct_blobs = {d for im in all_images for d in im.blobs}
        seeded_bytes = sum(sz for im in all_images for sz in im.blobs.values())
        log(f"seeded {len(all_images)} image versions in {n_images} repos, {len(distinct_blobs)} blobs, "
            f"{seeded_bytes / MiB:.1f} MiB in {time.monotonic() - t0:.1f}s")

        edge = Edge(work, registry, workers=args.workers, event_loop=args.event_loop, tag_ttl=tag_ttl).start()
        sampler = RssSampler(edge.pid, interval=0.1).start()
        mark_all = registry.log_mark()
        if scenario in ("warm", "churn", "soak"):
            for im in all_images:
                prepull(edge, im)
            log(f"pre-pulled {len(all_images)} image versions through edgecache")
        mark_load = registry.log_mark()
        start_rss_fds = sampler.snapshot()

        plan = work / "plan.json"
        plan.write_text(json.dumps({"images": plan_images}))
        blob_paths = [f"/v2/up/{im.repo}/blobs/{d}" for im in all_images for d in im.blobs]
        deadline = time.monotonic() + args.seconds
        if scenario in ("churn", "soak"):
            interval = args.fault_interval or (1.0 if scenario == "churn" else 60.0)
            faults = Faults(scenario, registry, edge, versions, blob_paths, deadline, interval)
            faults.start()

        csv_prefix = work / "locust"
        env = {**os.environ, "LOADTEST_PLAN": str(plan), "LOADTEST_SCENARIO": scenario, "LOADTEST_PREFIX": "up",
               "LOADTEST_RANGE": str(args.range_fraction), "PYTHONWARNINGS": "ignore"}
        cmd = [LOCUST, "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(args.users), "-r", str(args.users),
               "-t", f"{args.seconds}s", "--host", edge.url, "--csv", str(csv_prefix), "--only-summary",
               "--exit-code-on-error", "1", "--stop-timeout", "10", "--loglevel", "WARNING"]
        log("locust: " + " ".join(cmd))
        t_run = time.monotonic()
        with open(work / "locust.log", "wb") as out:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.seconds + 120,
                                  cwd=harness.ROOT)
        elapsed = time.monotonic() - t_run
        if faults:
            faults.stop()
        end_rss_fds = sampler.snapshot()
        if not Path(f"{csv_prefix}_stats.csv").exists():
            print((work / "locust.log").read_text()[-4000:])
            log("locust produced no stats")
            return 1
        stats = read_locust_csv(csv_prefix)

        up_get_blobs_all = registry.count(mark_all, "GET", "blobs")
        up_get_blobs_load = registry.count(mark_load, "GET", "blobs")
        # only GET/HEAD: the runner's own pushes (tag moves) are in the same access log
        up_reqs_load = [r for r in registry.requests(mark_load) if r[0] in ("GET", "HEAD")]
        metrics = edge.metrics()

        def msum(name: str, **labels: str) -> float:
            return sum(v for k, v in metrics.items() if k.partition("{")[0] == name
                       and all(f'{a}="{b}"' in k for a, b in labels.items()))

        upstream_bytes = msum("edgecache_upstream_bytes_total")
        served = {src: msum("edgecache_served_bytes_total", source=src) for src in ("cache", "upstream")}
        peak = sampler.stop()
        total = stats["total"]
        summary = {
            "scenario": scenario, "seconds": args.seconds, "users": args.users, "elapsed_s": round(elapsed, 1),
            "requests": total["requests"], "failures": total["failures"], "rps": round(total["rps"], 1),
            "p50_ms": total["p50"], "p95_ms": total["p95"], "p99_ms": total["p99"],
            "distinct_blobs": len(distinct_blobs), "seeded_mib": round(seeded_bytes / MiB, 1),
            "upstream_blob_gets_total": up_get_blobs_all, "upstream_blob_gets_during_load": up_get_blobs_load,
            "upstream_requests_during_load": len(up_reqs_load),
            "upstream_requests_by_kind_during_load": _by_kind(up_reqs_load),
            "edgecache_upstream_requests": msum("edgecache_upstream_requests_total"),
            "upstream_mib": round(upstream_bytes / MiB, 1),
            "served_mib_cache": round(served["cache"] / MiB, 1), "served_mib_upstream": round(served["upstream"] / MiB, 1),
            "edge_peak_rss_mib": round(peak / MiB, 1),
            "edge_rss_mib_start": round(start_rss_fds[0] / MiB, 1), "edge_rss_mib_end": round(end_rss_fds[0] / MiB, 1),
            "edge_fds_start": start_rss_fds[1], "edge_fds_end": end_rss_fds[1],
            "edge_hot_fds_end": msum("edgecache_open_blob_files"),
            "locust_exit": proc.returncode, "faults": faults.events if faults else [],
            "tag_moves": faults.tag_moves if faults else 0,
        }
        print_summary(summary, stats)
        ok = summary["failures"] <= args.max_failures and summary["requests"] > 0
        if proc.returncode != 0 and args.max_failures == 0:
            ok = False
        print("RESULT", "PASS" if ok else "FAIL")
        print("SUMMARY_JSON " + json.dumps(summary), flush=True)
        return 0 if ok else 1
    finally:  # each step on its own: one failing must not leave processes behind
        for step in ((faults.stop if faults else None), (sampler.stop if sampler else None),
                     (edge.stop if edge else None), registry.stop):
            if step is None:
                continue
            try:
                step()
            except Exception as e:
                log(f"cleanup: {e!r}")
        if args.keep:
            log(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _by_kind(reqs: list[tuple[str, str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for method, path, _status in reqs:
        kind = "blobs" if "/blobs/" in path else "manifests" if "/manifests/" in path else "other"
        out[f"{method} {kind}"] = out.get(f"{method} {kind}", 0) + 1
    return out


def print_summary(s: dict[str, Any], stats: dict[str, Any]) -> None:
    print()
    print(f"== edgecache load run: scenario={s['scenario']} users={s['users']} seconds={s['seconds']} ==")
    print(f"requests:        {s['requests']}  ({s['rps']} req/s)")
    print(f"failures:        {s['failures']}")
    print(f"latency ms:      p50 {s['p50_ms']}  p95 {s['p95_ms']}  p99 {s['p99_ms']}")
    for name, e in sorted(stats["by_name"].items()):
        print(f"  {name:28s} {e['requests']:7d} req  {e['failures']:4d} fail  p50 {e['p50']:>6} p95 {e['p95']:>6} "
              f"p99 {e['p99']:>6} ms")
    for msg in stats["failure_messages"][:15]:
        print(f"  FAIL {msg}")
    print(f"distinct blobs:  {s['distinct_blobs']} ({s['seeded_mib']} MiB seeded)")
    print(f"upstream blob GETs: {s['upstream_blob_gets_total']} total (incl. pre-pull), "
          f"{s['upstream_blob_gets_during_load']} during load")
    print(f"upstream requests during load: {s['upstream_requests_during_load']} {s['upstream_requests_by_kind_during_load']}")
    print(f"edgecache upstream requests (metrics): {s['edgecache_upstream_requests']:.0f}")
    print(f"bytes from upstream: {s['upstream_mib']} MiB; served: {s['served_mib_cache']} MiB from cache, "
          f"{s['served_mib_upstream']} MiB while filling")
    print(f"edgecache RSS:   peak {s['edge_peak_rss_mib']} MiB (start {s['edge_rss_mib_start']}, end {s['edge_rss_mib_end']})"
          f"; open fds start {s['edge_fds_start']}, end {s['edge_fds_end']} (of which {s['edge_hot_fds_end']:.0f} "
          f"hot blob descriptors, bounded by cache.open_files)")
    if s["tag_moves"]:
        print(f"tag moves:       {s['tag_moves']}")
    for e in s["faults"]:
        print(f"fault:           {e}")


if __name__ == "__main__":
    sys.exit(main())
