"""Serving benchmark: latency and throughput of `serve` on loopback beside in-process batched queries.

1, 4 and 16 concurrent clients (threads, one keep-alive `http.client` connection each) POST Fashion-MNIST test
images (raw PNG bodies, k=10) to `utilities.py serve` over a 10,000-image index of an untrained small_cnn at 28 px
(training changes the weights, not the cost). In-process: `Embedder.search` on the same images in batches of 16.
Each run is bounded by --requests and --seconds. The clients share the machine's cores with the server, so the
server's CPU milliseconds per request are reported too, beside in-process CPU milliseconds per query. Targets: with
16 clients at least 0.7x in-process throughput; with one client p50 under 30 ms (2 cores).
Figures go in docs/benchmarks.md.

    .venv/bin/python benchmarks/serve.py [--images 10000] [--requests 600] [--seconds 20] [--wait-ms 2]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clients(url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float, pid: int) -> dict:
    """p50 and p99 latency (ms) and queries per second of `concurrency` clients sharing `requests` requests, and the
    server's CPU milliseconds per request (process `pid`)."""
    port = int(url.rsplit(":", 1)[1])
    latencies: list[float] = []
    lock, counter = threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + seconds

    def client() -> None:
        # the standard library's client: the load generator shares the cores with the server, and httpx costs about
        # 3 CPU ms a request, as much as the server's own work
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                start = time.perf_counter()
                connection.request("POST", "/search?k=10", body=bodies[n % len(bodies)],
                                   headers={"Content-Type": "application/octet-stream"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"POST /search answered {response.status}: {body[:200]!r}")
                with lock:
                    latencies.append((time.perf_counter() - start) * 1000)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    q = statistics.quantiles(latencies, n=100)
    return {"p50": statistics.median(latencies), "p99": q[98], "qps": len(latencies) / elapsed, "n": len(latencies),
            "cpu_ms": 1000 * cpu / len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="indexed images (default 10,000)")
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency at most (default 600)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per concurrency at most (default 20)")
    parser.add_argument("--wait-ms", default=None, help="serve's --wait-ms (default: serve's own)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the tests' server helper
    import keras
    from servers import Server

    from siamese.catalog import load_catalog
    from siamese.datasets import find_fashion_mnist, make_dataset
    from siamese.embed import Embedder
    from siamese.models import build_embedding

    source = "fashion-mnist" if find_fashion_mnist() else "digits"
    work = Path(tempfile.mkdtemp(prefix="siamese-bench-serve-"))
    written = make_dataset(source, work / "data", limit=args.images, progress=False)
    keras.utils.set_random_seed(0)
    build_embedding("small_cnn", 28, 128).save(work / "model.keras")
    embedder = Embedder.load(work / "model.keras")
    catalog = load_catalog(written["train"], written["train"].parent)
    index = embedder.index(catalog, progress=False)
    index_dir = index.save(work / "index")
    test = load_catalog(written["test"], written["test"].parent)
    bodies = [p.read_bytes() for p in test.paths[:256]]

    embedder.search(index, bodies[:16])  # warm up
    start, cpu, done = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < 5:
        for i in range(0, len(bodies), 16):
            embedder.search(index, bodies[i : i + 16])
            done += len(bodies[i : i + 16])
    in_process = done / (time.perf_counter() - start)
    in_process_cpu = 1000 * (time.process_time() - cpu) / done

    server = Server(index_dir, *(["--wait-ms", args.wait_ms] if args.wait_ms else []))
    try:
        pid = server.process.pid
        clients(server.url, bodies, 4, 64, 10, pid)  # warm up
        rows = {c: clients(server.url, bodies, c, args.requests, args.seconds, pid) for c in (1, 4, 16)}
    finally:
        server.stop()
    print(f"{len(index):,} {source} images, small_cnn 28 px, {index.engine}; in-process Embedder.search in batches of "
          f"16: {in_process:,.0f} queries/s, {in_process_cpu:.1f} CPU ms per query\n")
    print("| clients | requests | p50 ms | p99 ms | queries/s | x in-process | server CPU ms per request |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, r in rows.items():
        print(f"| {c} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['qps']:,.0f} | {r['qps'] / in_process:.2f} | "
              f"{r['cpu_ms']:.1f} |")
    print(f"\nTargets: 16 clients >= 0.7x in-process ({rows[16]['qps'] / in_process:.2f}x); 1 client p50 < 30 ms "
          f"({rows[1]['p50']:.1f} ms)")


if __name__ == "__main__":
    main()
