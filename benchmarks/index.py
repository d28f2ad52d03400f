"""Index benchmark: build time, queries per second, size, recall@10 and peak memory of each search engine.

N unit vectors of 128 dimensions (independent random ones by default, the hardest case for approximate search;
`--intrinsic-dim D`: near a random D-dimensional subspace, more like a trained model's embeddings), 1,000 random
queries of the same kind, k = 10, every usable CPU. Engines: siamese's `balltree`, `brute`, `hnsw` and `faiss`
backends with their defaults (hnsw and faiss choose their query-time ef / nprobe at build time for recall@10
>= 0.99 on held-out rows), beside FAISS's exact flat index as the reference. Each engine runs in a fresh
process, whose peak resident memory is reported: building from the embeddings memory-mapped from a .npy file,
as an index of a million images is built, and querying ("build peak"), and loading the saved index and
querying it ("serve peak"). Index MiB: the saved embeddings and engine files.
Recall@10 is measured on the queries against an exact float64 search. Queries/s: the best of 3 runs, or of one
when they take over 20 s; an engine whose 1,000 queries would take over a minute answers as many as fit in one.
Figures go in docs/benchmarks.md.

    .venv/bin/python benchmarks/index.py [--rows 100000 [1000000 ...]] [--engines brute hnsw ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from siamese.search import ENGINES as SEARCH_ENGINES

ENGINES = (*SEARCH_ENGINES, "faiss-flat")
"""siamese's engines (every registered one), and faiss-flat: FAISS's IndexFlatL2 used directly, the reference."""


def unit_vector_blocks(n: int, dim: int, seed: int, intrinsic: int = 0) -> Iterator[np.ndarray]:
    """`n` unit vectors, made 64K at a time in float32 (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(1234).standard_normal((intrinsic, dim), dtype=np.float32) if intrinsic else None
    for start in range(0, n, 1 << 16):
        rows = min(1 << 16, n - start)
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        if basis is not None:
            x = rng.standard_normal((rows, intrinsic), dtype=np.float32) @ basis + 0.1 * np.sqrt(intrinsic) * x
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


def unit_vectors(n: int, dim: int, seed: int, intrinsic: int = 0) -> np.ndarray:
    return np.concatenate(list(unit_vector_blocks(n, dim, seed, intrinsic)))


def mapped_unit_vectors(path: Path, n: int, dim: int, seed: int, intrinsic: int = 0) -> np.ndarray:
    """`unit_vectors(...)` written to the .npy file `path` a block at a time, memory-mapped read-only."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for block in unit_vector_blocks(n, dim, seed, intrinsic):
            f.write(block.data)
    return np.load(path, mmap_mode="r")


def exact(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true k nearest rows, in float64 (the reference for recall), 8K gallery rows at a time."""
    q = queries.astype(np.float64)
    best_scores, best = np.full((len(q), 0), -np.inf), np.empty((len(q), 0), np.int64)
    for start in range(0, len(gallery), 1 << 13):
        scores = q @ gallery[start : start + (1 << 13)].T.astype(np.float64)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        rows = np.concatenate([best, top + start], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
    return best


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**10


def time_queries(search, queries: np.ndarray, budget: float = 60.0) -> tuple[float, np.ndarray]:
    """Queries per second (best of 3 runs when they fit in `budget` seconds) and the neighbours found, after a
    warm-up on a tenth of the queries; an engine too slow for one run answers as many queries as fit."""
    probe = max(10, len(queries) // 10)
    start = time.perf_counter()
    search(queries[:probe])
    projected = (time.perf_counter() - start) * len(queries) / probe
    n = len(queries) if projected <= budget else max(probe, int(budget / projected * len(queries)))
    best = float("inf")
    for _ in range(3 if 3 * projected <= budget else 1):
        start = time.perf_counter()
        found = search(queries[:n])
        best = min(best, time.perf_counter() - start)
    return n / best, found


def build(engine: str, args: argparse.Namespace, rows: int, directory: str, scratch: str) -> dict:
    """In a fresh process: write the data to `scratch`, build the engine from it, time the queries, save it to
    `directory`."""
    from siamese.index import Index

    baseline = peak_mib()
    gallery = mapped_unit_vectors(Path(scratch) / "gallery.npy", rows, args.dim, 0, args.intrinsic_dim)
    queries = unit_vectors(args.queries, args.dim, 1, args.intrinsic_dim)
    start = time.perf_counter()
    if engine == "faiss-flat":
        import faiss

        index = faiss.IndexFlatL2(args.dim)
        index.add(gallery)
        seconds = time.perf_counter() - start
        qps, found = time_queries(lambda q: index.search(q, args.k)[1], queries)
        faiss.write_index(index, str(Path(directory) / "flat.faiss"))
        name = f"FAISS flat {faiss.__version__}"
    else:
        meta = ([str(i) for i in range(rows)], [f"{i}.png" for i in range(rows)], [()] * rows)
        index = Index(gallery, *meta, engine=engine)
        seconds = time.perf_counter() - start
        qps, found = time_queries(lambda q: index.kneighbors(q, args.k)[1], queries)
        index.save(directory)
        params, knob = index.engine.params, index.engine.knob
        name = f"siamese {engine}" + (f" {knob.name}={params[knob.name]}" if knob and knob.name in params else "")
        name += " (IVF)" if params.get("nlist") else " (flat)" if engine == "faiss" else ""
    files = [p for p in Path(directory).iterdir() if p.suffix in (".npy", ".hnsw", ".faiss")]
    return {"name": name, "build": seconds, "qps": qps, "found": found, "baseline": baseline,
            "mib": sum(p.stat().st_size for p in files) / 2**20, "build_peak": peak_mib()}


def serve(engine: str, args: argparse.Namespace, directory: str) -> float:
    """In a fresh process: load the saved index and answer the queries; the peak resident MiB."""
    from siamese.index import Index

    queries = unit_vectors(args.queries, args.dim, 1, args.intrinsic_dim)
    index = Index.load(directory)
    time_queries(lambda q: index.kneighbors(q, args.k)[1], queries)
    return peak_mib()


def in_child(fn, *args):
    """`fn(*args)` in a fresh spawned process, so its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000], help="one table per size (default 100000)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--intrinsic-dim", type=int, default=0, metavar="D",
                        help="vectors near a random D-dimensional subspace (default 0: independent random vectors)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    queries = unit_vectors(args.queries, args.dim, 1, args.intrinsic_dim)
    data = f"near a random {args.intrinsic_dim}-d subspace" if args.intrinsic_dim else "independent random"
    for rows in args.rows:
        truth = exact(unit_vectors(rows, args.dim, 0, args.intrinsic_dim), queries, args.k)
        embeddings = rows * args.dim * 4 / 2**20
        print(f"\n{rows:,} x {args.dim} float32 unit vectors, {data} ({embeddings:,.0f} MiB), {args.queries:,} "
              f"queries, k = {args.k}, {len(os.sched_getaffinity(0))} CPUs")
        print(f"{'engine':<34}{'build s':>9}{'queries/s':>11}{'index MiB':>11}{'recall@10':>11}"
              f"{'build peak MiB':>16}{'serve peak MiB':>16}")
        for engine in args.engines:
            with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as scratch:
                r = in_child(build, engine, args, rows, directory, scratch)
                served = "-" if engine == "faiss-flat" else f"{in_child(serve, engine, args, directory):,.0f}"
            answered = f" ({len(r['found']):,} queries)" if len(r["found"]) < args.queries else ""
            print(f"{r['name']:<34}{r['build']:>9.2f}{r['qps']:>11,.0f}{r['mib']:>11,.0f}"
                  f"{recall(r['found'], truth[: len(r['found'])]):>11.3f}{r['build_peak']:>16,.0f}{served:>16}"
                  f"{answered}", flush=True)
        print(f"Peak memory includes Python with the libraries loaded ({r['baseline']:,.0f} MiB before any data); "
              f"2x the embeddings is {2 * embeddings:,.0f} MiB.", flush=True)


if __name__ == "__main__":
    main()
