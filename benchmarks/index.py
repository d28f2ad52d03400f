"""Index benchmark: build time, queries per second, memory and recall@10 of each search engine, one run.

N random unit vectors of 128 dimensions, 1,000 random unit queries, k = 10, on every usable CPU:
siamese's `balltree` (scikit-learn, the seed's) and `brute` backends, beside FAISS's exact flat index.
Recall@10 is measured against an exact float64 search. Figures go in README.md.

    .venv/bin/python benchmarks/index.py [--rows 100000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from siamese.index import Index


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true k nearest rows, in float64 (the reference for recall)."""
    scores = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    return np.argsort(-scores, axis=1)[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    gallery = unit_vectors(args.rows, args.dim, 0)
    queries = unit_vectors(args.queries, args.dim, 1)
    truth = exact(gallery, queries, args.k)
    meta = ([str(i) for i in range(args.rows)], [f"{i}.png" for i in range(args.rows)], [()] * args.rows)
    print(f"{args.rows:,} x {args.dim} float32 ({gallery.nbytes / 2**20:.0f} MiB), {args.queries:,} queries, "
          f"k = {args.k}, {len(os.sched_getaffinity(0))} CPUs")
    print(f"{'engine':<22}{'build s':>9}{'queries/s':>12}{'index MiB':>11}{'recall@10':>11}")
    rows = []
    for backend in ("balltree", "brute"):
        build, index = timed(lambda b=backend: Index(gallery, *meta, backend=b))
        seconds, (_, found) = timed(lambda i=index: i.kneighbors(queries, args.k), repeat=2)
        memory = gallery.nbytes
        if index._tree is not None:
            memory = sum(a.nbytes for a in index._tree.get_arrays())
        rows.append((f"siamese {backend}", build, args.queries / seconds, memory, recall(found, truth)))
    try:
        import faiss
    except ImportError:
        print("faiss-cpu is not installed: pip install faiss-cpu")
    else:
        def faiss_flat():
            flat = faiss.IndexFlatL2(args.dim)
            flat.add(gallery)
            return flat

        build, flat = timed(faiss_flat)
        seconds, (_, found) = timed(lambda: flat.search(queries, args.k), repeat=2)
        rows.append((f"FAISS flat {faiss.__version__}", build, args.queries / seconds, gallery.nbytes,
                     recall(found, truth)))
    for name, build, qps, memory, r in rows:
        print(f"{name:<22}{build:>9.2f}{qps:>12,.0f}{memory / 2**20:>11.0f}{r:>11.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of the whole run: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
