"""The exact-kNN kernel (blocked BLAS products) and the block I/O it and the engines share.

One tie rule throughout: nearest first, equal distances by lower row index. Every pass over a (possibly
memory-mapped, `np.load(path, mmap_mode="r")`) array reads one block at a time and can drop it from memory after
use (`release`), so a pass holds a block, not the array.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK = 1 << 23
"""Scores computed at once by `kneighbors`: (queries x rows) <= 8M float32, 32 MiB."""
PASS_ROWS = 1 << 12
"""Rows read at once by a pass over every embedding (2 MiB at 128 dimensions)."""
GROUP = 64
"""`kneighbors` keeps the best k scores of a row of a block from its best k groups of GROUP (their maxima)."""
GATHER_FLOATS = 1 << 22
"""Candidate coordinates gathered at once by `candidate_distances` (16 MiB of float32, 32 MiB as float64)."""


def squared_norms(x: np.ndarray) -> np.ndarray:
    """|row|^2 of every row in float64 (no overflow, NaN and inf propagate), without a temporary copy of `x`."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def release(x: np.ndarray) -> None:
    """Drop the pages of memory-mapped `x` (e.g. `np.load(path, mmap_mode="r")`) from this process's resident
    memory: they stay in the page cache and are read back on the next access. Nothing for an array in memory."""
    while x is not None and not isinstance(x, mmap.mmap):
        x = getattr(x, "base", None)
    if x is not None and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
        x.madvise(mmap.MADV_DONTNEED)


def blocks(x: np.ndarray, rows: int = PASS_ROWS, drop: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, x[start : start + rows])` over all of `x`; with `drop` (default), a memory-mapped `x` is
    released after each block (see `release`), so the pass holds one block in memory."""
    for start in range(0, len(x), rows):
        yield start, x[start : start + rows]
        if drop:
            release(x)


def by_block(x: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """For sorted `rows`: `(low, high, x[rows[low:high]])` for the rows in each block of `x`, block by block (see
    `blocks`). On a memory map, reading scattered rows at once would bring in up to 2 MiB of the file around each
    (the kernel maps whole folios)."""
    for start, block in blocks(x):
        low, high = np.searchsorted(rows, [start, start + len(block)])
        if high > low:
            yield low, high, block[rows[low:high] - start]


def take(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`x[rows]` (`rows` of any shape), gathered block by block (see `by_block`)."""
    unique, inverse = np.unique(rows.ravel(), return_inverse=True)
    out = np.empty((len(unique), *x.shape[1:]), x.dtype)
    for low, high, vectors in by_block(x, unique):
        out[low:high] = vectors
    return out[inverse].reshape(*rows.shape, *x.shape[1:])


def candidate_distances(x: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (float64, `rows.shape`) of each query to its candidate `rows` of `x` (one row of
    `rows` per query; inf where a candidate is -1), gathered a few queries at a time (GATHER_FLOATS)."""
    out = np.empty(rows.shape, np.float64)
    step = max(1, GATHER_FLOATS // max(1, rows.shape[1] * x.shape[1]))
    for start in range(0, len(queries), step):
        some = rows[start : start + step]
        diff = take(x, np.maximum(some, 0)).astype(np.float64)
        diff -= queries[start : start + step, None]
        out[start : start + step] = np.where(some >= 0, np.einsum("ijk,ijk->ij", diff, diff), np.inf)
    return out


def write_rows(f, x: np.ndarray) -> None:
    """Write the rows of `x` to the binary file `f` as C-ordered bytes, a block at a time (see `blocks`)."""
    for _, block in blocks(x):
        f.write(np.ascontiguousarray(block).data)


def save_npy(path: Path, x: np.ndarray) -> None:
    """`np.save(path, x)` byte for byte, written a block at a time."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(x))
        write_rows(f, x)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The columns of the `k` largest scores of each row, in no order (ties broken either way).

    The k largest lie in the k groups of GROUP columns with the largest maxima, so with many groups only those
    k x GROUP candidates are partitioned: several times faster than partitioning whole rows."""
    rows, width = scores.shape
    groups = width // GROUP
    if groups < 8 * k:
        return np.argpartition(scores, width - k, axis=1)[:, -k:]
    maxima = scores[:, : groups * GROUP].reshape(rows, groups, GROUP).max(axis=2)
    best = np.argpartition(maxima, groups - k, axis=1)[:, -k:]
    candidates = (best[:, :, None] * GROUP + np.arange(GROUP)).reshape(rows, -1)
    if groups * GROUP < width:  # the columns after the last whole group are candidates too
        candidates = np.concatenate([candidates, np.broadcast_to(np.arange(groups * GROUP, width),
                                                                  (rows, width - groups * GROUP))], axis=1)
    top = np.argpartition(np.take_along_axis(scores, candidates, axis=1), candidates.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(candidates, top, axis=1)


def lowest_ties(
    scores: np.ndarray, best: np.ndarray, best_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`best` (the columns of the k largest `scores` of each row, from `top_k`: ties broken either way) and
    `best_scores`, with the ties at each row's k-th largest broken by lower column instead."""
    kth = best_scores.min(axis=1, keepdims=True)
    for row in np.flatnonzero((scores == kth).sum(axis=1) > (best_scores == kth).sum(axis=1)):
        above = np.flatnonzero(scores[row] > kth[row])
        best[row] = np.concatenate([above, np.flatnonzero(scores[row] == kth[row])[: best.shape[1] - len(above)]])
        best_scores[row] = scores[row, best[row]]
    return best, best_scores


def kneighbors(
    gallery: np.ndarray, queries: np.ndarray, k: int, half_norms: np.ndarray | None = None, lean: bool = False,
    exclude: np.ndarray | None = None, return_scores: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `gallery` for each query: (distances, indices), nearest first, ties by lower row.

    Any `k` up to the rows (less the excluded) works: `k = len(gallery)` is a full ranking.
    `exclude` (default none) is, per query, a row of `gallery` it never finds (leave-one-out: the query's own).
    `half_norms` of zeros ranks by inner product q.g instead; `return_scores` answers the scores
    q.g - half_norms (largest first) instead of distances.

    Scores are computed into one buffer of at most 8M floats, for blocks of up to 1,024 queries x 8,192 rows:
    the best k of the first block, then only the rows of later blocks that may beat each query's k-th best so
    far (few, once the first blocks are seen). Memory stays flat however large the gallery. `half_norms` is
    |row|^2 / 2 (default: computed here). `lean` (for one-off passes at build time) holds as little as it can: a
    buffer of 1M scores, and a memory-mapped gallery's blocks are dropped from memory after use (see `blocks`).
    """
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if half_norms is None:
        half_norms = (0.5 * squared_norms(gallery)).astype(np.float32)
    least = half_norms.min()
    rows = len(gallery)
    width = min(rows, max(k, 1 << 13))  # rows per block
    chunk = max(1, min(1 << 10, (BLOCK >> 3 if lean else BLOCK) // width))  # queries per block
    buffer = np.empty((min(chunk, len(queries)), width), np.float32)
    distances = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        for first, block in blocks(gallery, width, lean):
            # |q - g|^2 = |q|^2 - 2 (q.g - |g|^2 / 2): the nearest rows have the largest scores
            products = np.matmul(q, block.T, out=buffer[: len(q), : len(block)])
            if exclude is not None:
                own = exclude[start : start + chunk] - first
                inside = np.flatnonzero((own >= 0) & (own < len(block)))
                products[inside, own[inside]] = -np.inf
            if first == 0:
                products -= half_norms[:width]
                if width > k:
                    best = top_k(products, k)
                    best, best_scores = lowest_ties(products, best, np.take_along_axis(products, best, axis=1))
                else:
                    best = np.tile(np.arange(k), (len(q), 1))
                    best_scores = np.take_along_axis(products, best, axis=1)
                continue
            # a row beats the k-th best only if q.g > k-th best + the least |g|^2 / 2: few rows, scored exactly;
            # strictly better: on a tie the earlier row stays
            kth = best_scores.min(axis=1)
            query, column = np.divmod(np.flatnonzero(products > (kth + least)[:, None]), len(block))
            scores = products[query, column] - half_norms[column + first]
            better = scores > kth[query]
            if better.any():
                hit, query = np.unique(query[better], return_inverse=True)  # merge the queries with candidates only
                best_scores[hit], best[hit] = merge_best(best_scores[hit], best[hit], query, scores[better],
                                                          column[better] + first)
        order = np.lexsort((best, -best_scores), axis=1)  # by score, ties by row: deterministic
        best, best_scores = np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1)
        if return_scores:
            distances[start : start + chunk] = best_scores
        else:
            squared = squared_norms(q)[:, None] - 2 * best_scores
            distances[start : start + chunk] = np.sqrt(np.maximum(squared, 0))
        indices[start : start + chunk] = best
    return distances, indices


def merge_best(
    best_scores: np.ndarray, best: np.ndarray, query: np.ndarray, scores: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, rows) of each query among its current `best_scores`, `best` (queries, k) and the
    candidates (`query`, `scores`, `rows`), ties by row."""
    queries, k = best.shape
    owner = np.concatenate([np.repeat(np.arange(queries), k), query])
    all_scores = np.concatenate([best_scores.ravel(), scores])
    all_rows = np.concatenate([best.ravel(), rows])
    order = np.lexsort((all_rows, -all_scores, owner))  # by query, then best first
    rank = np.arange(len(order)) - np.searchsorted(owner[order], np.arange(queries))[owner[order]]
    keep = order[rank < k]
    return all_scores[keep].reshape(queries, k), all_rows[keep].reshape(queries, k)
