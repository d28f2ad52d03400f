"""Index benchmark at scale: an index of ten million rows built from an embedding store under a memory budget.

N (default 10,000,000) unit vectors of 128 dimensions near a random 16-d subspace (`index.py --intrinsic-dim 16`'s
kind) are written as an embedding store on disk, Parquet parts of 8,192 rows as `embed` writes them. For each
`--budgets` SIZE (default 1G 4G), `index_stores` builds `Faiss(max_memory=SIZE)` from the store and saves it, in a
fresh process: build seconds, peak resident memory (VmHWM, and the peak of its anonymous part, RssAnon, sampled
every 0.1 s: the rest is pages of memory-mapped files, which the kernel drops under pressure), the index's files
on disk (embeddings, rows, FAISS). The index re-ranks `--rerank` N candidates (default 100) by exact distance, its
nprobe tuned for that. Then, in another fresh process, the serve start-up (`Index.load` and one query; again with
this user's record of checked files removed, so that every file is read) and its resident memory; recall@10 of
`--queries` new queries (default 1,000) against their exact neighbours (siamese's blocked float32 kernel over the
memory-mapped rows, ties by lower row) and queries/s at the tuned nprobe, with the rerank and on the codes alone
(PQ or 8-bit); beside them, brute force's queries/s over the same memory-mapped rows, one query at a time and in blocks.
Figures go in docs/benchmarks.md.

    .venv/bin/python benchmarks/index_budget.py [--rows 10000000] [--budgets 1G 4G] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue as queues
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from index import peak_mib, recall, time_queries, unit_vector_blocks, unit_vectors

DIM, INTRINSIC = 128, 16


def write_store(path: Path, rows: int) -> float:
    """The benchmark's vectors as an embedding store at `path` (rows item-i, i.png, no labels); its seconds."""
    from siamese.embedding_store import StoreWriter

    start = time.perf_counter()
    writer = StoreWriter(path, DIM)
    row = 0
    for block in unit_vector_blocks(rows, DIM, 0, INTRINSIC):
        ids = range(row, row + len(block))
        writer.write([f"item-{i}" for i in ids], [f"{i}.png" for i in ids], [()] * len(block), ["0" * 64] * len(block),
                     block)
        row += len(block)
    model = {"source": "benchmarks/index_budget.py", "fingerprint": "synthetic", "embedding_dim": DIM,
             "image_size": 0}
    writer.commit({"model": model, "embedder": {}, "source": {"sha256": "synthetic"}, "image_size": 0})
    return time.perf_counter() - start


def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of process `pid`, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            found[name] = int(value.split()[0]) / 2**10
    return found


def measured(fn, *args):
    """`fn(*args)` in a fresh spawned process: its result and the peak of its RssAnon, sampled every 0.1 s."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_put, args=(queue, fn, args))
    process.start()
    peak, result = 0.0, None
    while result is None:
        with contextlib.suppress(OSError, KeyError):  # not started yet, or ended
            peak = max(peak, status(process.pid)["RssAnon"])
        try:
            result = queue.get(timeout=0.1)
        except queues.Empty:
            if not process.is_alive() and queue.empty():
                raise RuntimeError(f"the benchmark's process died (exit code {process.exitcode})") from None
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result, peak


def _put(queue, fn, args) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as e:  # handed to the parent, which raises it
        queue.put(e)


def build(store: str, budget: str, out: str, rerank: int) -> dict:
    """In a fresh process: the budget's index of the store with `rerank` (its nprobe tuned for it), saved to
    `out`."""
    from siamese.embedding_store import index_stores
    from siamese.search import Faiss

    baseline = peak_mib()
    start = time.perf_counter()
    index = index_stores([store], Faiss(max_memory=budget, rerank=rerank))
    built = time.perf_counter() - start
    index.save(out)
    saved = time.perf_counter() - start
    files = {p.name.split("-")[0]: p.stat().st_size for p in Path(out).iterdir() if p.is_file()}
    return {"build": built, "saved": saved, "peak": peak_mib(), "baseline": baseline, "files": files,
            "description": index.engine.description, "recall": index.recall, "params": index.engine.params}


def serve(out: str, queries: np.ndarray, truth: np.ndarray, rerank: int) -> dict:
    """In a fresh process: load the index at `out` as `serve` does, answer one query, then time the queries."""
    start = time.perf_counter()
    from siamese.search import Index

    imported = time.perf_counter()
    index = Index.load(out)
    loaded = time.perf_counter()
    index.kneighbors(queries[:1], 10)
    first = time.perf_counter()
    after_load = status()
    from siamese.util import cache_dir

    shutil.rmtree(cache_dir() / "verified", ignore_errors=True)  # as another user loads it: every file read
    full = time.perf_counter()
    index = Index.load(out)
    figures = {"import": imported - start, "load": loaded - imported, "first": first - loaded,
               "full": time.perf_counter() - full, **after_load}
    for name, value in (("rerank", rerank), ("codes", 0)):
        index.engine.rerank = value  # the same index, searched with or without re-ranking
        qps, found = time_queries(lambda q: index.kneighbors(q, 10)[1], queries)
        figures[name] = {"qps": qps, "recall": recall(found, truth[: len(found)]), "queries": len(found)}
    figures["peak"] = peak_mib()
    return figures


def brute(store_rows: str, queries: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The exact 10 nearest rows of each query in the saved embeddings `store_rows` (.npy, memory-mapped), and
    brute force's queries/s on a sample of them (the kernel's blocks of 1,024 queries: 100 queries answered
    alone would pay the pass over every row 100 times)."""
    from siamese.search.kernel import kneighbors

    gallery = np.load(store_rows, mmap_mode="r")
    half = np.full(len(gallery), 0.5, np.float32)  # unit rows
    start = time.perf_counter()
    _, truth = kneighbors(gallery, queries, 10, half, lean=True)
    seconds = time.perf_counter() - start
    sample = queries[:10]
    start = time.perf_counter()
    for q in sample:
        kneighbors(gallery, q[None], 10, half, lean=True)
    return truth, {"all": len(queries) / seconds, "one_at_a_time": len(sample) / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--budgets", nargs="+", default=["1G", "4G"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None, help="where the store and indexes go (default: a "
                        "temporary folder; about 1.5 x 5 GB per 10M rows, plus the store)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="siamese-bench-index-budget-", dir=args.work))
    os.environ["SIAMESE_CACHE_DIR"] = str(work / "cache")  # the processes' record of checked files, not the user's
    try:
        store = work / "store"
        seconds = write_store(store, args.rows)
        size = sum(p.stat().st_size for p in store.iterdir())
        print(f"index_budget benchmark: {args.rows:,} x {DIM} unit vectors near a random {INTRINSIC}-d subspace, "
              f"store of {size / 2**30:.2f} GiB written in {seconds:.0f} s; {len(os.sched_getaffinity(0))} CPUs",
              flush=True)
        queries = unit_vectors(args.queries, DIM, 1, INTRINSIC)
        truth = None
        for budget in args.budgets:
            out = work / f"index-{budget}"
            result, anon = measured(build, str(store), budget, str(out), args.rerank)
            if truth is None:
                embeddings = next(out.glob("embeddings-*.npy"))
                (truth, brute_qps), _ = measured(brute, str(embeddings), queries)
                print(f"brute force over the memory-mapped rows: {brute_qps['all']:,.1f} queries/s in blocks of "
                      f"{args.queries:,}, {brute_qps['one_at_a_time']:,.2f} one at a time", flush=True)
            figures, _ = measured(serve, str(out), queries, truth, args.rerank)
            files = result["files"]
            print(f"\nbudget {budget}: {result['description']}")
            print(f"  build {result['build']:,.0f} s (saved at {result['saved']:,.0f} s); peak RSS "
                  f"{result['peak']:,.0f} MiB (anonymous {anon:,.0f} MiB; {result['baseline']:,.0f} MiB before any "
                  f"data); tuned {result['recall']}")
            print("  files MiB: " + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(files.items())))
            print(f"  serve: import {figures['import']:.2f} s, load {figures['load']:.2f} s (the files' stamps as "
                  f"saving checked them; {figures['full']:.2f} s reading every file), first query "
                  f"{figures['first']:.3f} s; RSS after it {figures['VmRSS']:,.0f} MiB (anonymous "
                  f"{figures['RssAnon']:,.0f}), peak {figures['peak']:,.0f} MiB")
            for name in ("codes", "rerank"):
                f = figures[name]
                label = "codes alone" if name == "codes" else f"rerank {args.rerank}"
                print(f"  {label}: recall@10 {f['recall']:.3f}, {f['qps']:,.0f} queries/s "
                      f"({f['qps'] / brute_qps['all']:,.0f}x brute force in blocks, "
                      f"{f['qps'] / brute_qps['one_at_a_time']:,.0f}x one at a time)", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
