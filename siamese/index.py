"""A nearest-neighbour index of a catalog's embeddings, with the item, filename and labels of every row.

Backends: `balltree` (scikit-learn's `BallTree`, the seed's) and `brute` (exact, BLAS matrix products over
blocks of queries and rows; at 128 dimensions much faster than the tree) give the same, exact neighbours.
`hnsw` (hnswlib's graph) and `faiss` (FAISS: exact `IndexFlatIP` below 100,000 rows, `IndexIVFFlat` above)
are approximate: at build time they measure recall@10 against exact search on a seeded sample of the index's
own rows and keep the smallest query-time `ef` (`nprobe`) that reaches the target recall (default 0.99).
Every backend answers Euclidean distances between unit vectors, so similarity = 1 - distance^2 / 2 throughout.

On disk an index is a folder, never a pickle (loading a pickle runs code):

    index.json              settings, counts, recall, the model's fingerprint, names and SHA-256 of the files below
    embeddings-<hash>.npy   float32 (rows, dim), L2-normalised: with the rows, the source of truth
    rows-<hash>.json        {"items": [...], "filenames": [...], "labels": [[...], ...]}
    engine-<hash>.hnsw      hnsw only: the graph, in hnswlib's own format (`save_index`)
    engine-<hash>.faiss     faiss only: the index, in FAISS's own format (`write_index`)

`index.json` is replaced last and atomically, so a crash while saving leaves the previous index whole. The tree
is rebuilt on load; graphs and FAISS indexes are read back. Loading checks every shape, type, value and hash
before using anything, and that the engine file holds as many rows of as many dimensions as the embeddings.
The embeddings are then memory-mapped read-only, so an hnsw or faiss index does not hold them twice in memory.
An index can also be built from memory-mapped embeddings (`np.load(path, mmap_mode="r")`): every pass over
them then reads one block at a time and drops it from memory after use, so building an hnsw index holds the
graph and one block, not the graph and the embeddings.
Folders written before the approximate backends (format version 1) still load.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from itertools import groupby
from pathlib import Path

import numpy as np

from siamese import __version__, atomic
from siamese.catalog import Catalog, Item
from siamese.config import INDEX_BACKENDS
from siamese.errors import SiameseError
from siamese.util import plural, usable_cpus, utc_now

BACKENDS = INDEX_BACKENDS
FORMAT = "siamese-index"
FORMAT_VERSION = 2
"""Version 2 added approximate engines, recall and shard parts; version 1 folders (balltree, brute) still load."""
NORM_TOLERANCE = 1e-3
EMBEDDER_KEYS = frozenset({"keras_model", "backbone", "weights", "image_size"})
"""What index.json's embedder may hold: the keyword arguments of `siamese.embed.load_embedder`."""
FAISS_IVF_MIN_ROWS = 100_000
"""A faiss index of fewer rows is exact (`IndexFlatIP`); of more, `IndexIVFFlat` with 4 sqrt(rows) lists."""
RECALL_QUERIES = 1000
"""Most own rows (a seeded sample of a tenth) held out of an approximate engine to measure its recall@10."""
SEED = 0
"""hnswlib's random_seed, FAISS's k-means seed and the recall sample's seed."""
_BLOCK = 1 << 23
"""Scores computed at once by brute search: (queries x rows) <= 8M float32, 32 MiB."""
_PASS_ROWS = 1 << 12
"""Rows read at once by a pass over every embedding (2 MiB at 128 dimensions)."""
_GROUP = 64
"""Brute search keeps the best k scores of a row of a block from its best k groups of _GROUP (their maxima)."""


@dataclass(frozen=True)
class Match:
    """One neighbour of a query: its row, item, file, labels, Euclidean distance and cosine similarity."""

    row: int
    item: str
    filename: str
    labels: tuple[str, ...]
    distance: float
    similarity: float

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """|row|^2 of every row in float64 (no overflow, NaN and inf propagate), without a temporary copy of `x`."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _release(x: np.ndarray) -> None:
    """Drop the pages of memory-mapped `x` (e.g. `np.load(path, mmap_mode="r")`) from this process's resident
    memory: they stay in the page cache and are read back on the next access. Nothing for an array in memory."""
    while x is not None and not isinstance(x, mmap.mmap):
        x = getattr(x, "base", None)
    if x is not None and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
        x.madvise(mmap.MADV_DONTNEED)


def _blocks(x: np.ndarray, rows: int = _PASS_ROWS, release: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, x[start : start + rows])` over all of `x`; with `release` (default), a memory-mapped `x` is
    released after each block (see `_release`), so the pass holds one block in memory."""
    for start in range(0, len(x), rows):
        yield start, x[start : start + rows]
        if release:
            _release(x)


def _by_block(x: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """For sorted `rows`: `(low, high, x[rows[low:high]])` for the rows in each block of `x`, block by block (see
    `_blocks`). On a memory map, reading scattered rows at once would bring in up to 2 MiB of the file around each
    (the kernel maps whole folios)."""
    for start, block in _blocks(x):
        low, high = np.searchsorted(rows, [start, start + len(block)])
        if high > low:
            yield low, high, block[rows[low:high] - start]


def _take(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`x[rows]` (`rows` of any shape), gathered block by block (see `_by_block`)."""
    unique, inverse = np.unique(rows.ravel(), return_inverse=True)
    out = np.empty((len(unique), *x.shape[1:]), x.dtype)
    for low, high, vectors in _by_block(x, unique):
        out[low:high] = vectors
    return out[inverse].reshape(*rows.shape, *x.shape[1:])


def _write_rows(f, x: np.ndarray) -> None:
    """Write the rows of `x` to the binary file `f` as C-ordered bytes, a block at a time (see `_blocks`)."""
    for _, block in _blocks(x):
        f.write(np.ascontiguousarray(block).data)


def _save_npy(path: Path, x: np.ndarray) -> None:
    """`np.save(path, x)` byte for byte, written a block at a time."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(x))
        _write_rows(f, x)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The columns of the `k` largest scores of each row, in no order (ties broken either way).

    The k largest lie in the k groups of _GROUP columns with the largest maxima, so with many groups only those
    k x _GROUP candidates are partitioned: several times faster than partitioning whole rows."""
    rows, width = scores.shape
    groups = width // _GROUP
    if groups < 8 * k:
        return np.argpartition(scores, width - k, axis=1)[:, -k:]
    maxima = scores[:, : groups * _GROUP].reshape(rows, groups, _GROUP).max(axis=2)
    best = np.argpartition(maxima, groups - k, axis=1)[:, -k:]
    candidates = (best[:, :, None] * _GROUP + np.arange(_GROUP)).reshape(rows, -1)
    if groups * _GROUP < width:  # the columns after the last whole group are candidates too
        candidates = np.concatenate([candidates, np.broadcast_to(np.arange(groups * _GROUP, width),
                                                                  (rows, width - groups * _GROUP))], axis=1)
    top = np.argpartition(np.take_along_axis(scores, candidates, axis=1), candidates.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(candidates, top, axis=1)


def _brute_kneighbors(
    gallery: np.ndarray, queries: np.ndarray, k: int, half_norms: np.ndarray | None = None, lean: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `gallery` for each query: (distances, indices), nearest first, ties by row.

    Scores are computed into one buffer of at most 8M floats, for blocks of up to 1,024 queries x 8,192 rows:
    the best k of the first block, then only the rows of later blocks that may beat each query's k-th best so
    far (few, once the first blocks are seen). Memory stays flat however large the gallery. `half_norms` is
    |row|^2 / 2 (default: computed here). `lean` (for one-off passes at build time) holds as little as it can: a
    buffer of 1M scores, and a memory-mapped gallery's blocks are dropped from memory after use (see `_blocks`).
    """
    if half_norms is None:
        half_norms = (0.5 * _squared_norms(gallery)).astype(np.float32)
    least = half_norms.min()
    rows = len(gallery)
    width = min(rows, max(k, 1 << 13))  # rows per block
    chunk = max(1, min(1 << 10, (_BLOCK >> 3 if lean else _BLOCK) // width))  # queries per block
    buffer = np.empty((min(chunk, len(queries)), width), np.float32)
    distances = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        for first, block in _blocks(gallery, width, lean):
            # |q - g|^2 = |q|^2 - 2 (q.g - |g|^2 / 2): the nearest rows have the largest scores
            products = np.matmul(q, block.T, out=buffer[: len(q), : len(block)])
            if first == 0:
                products -= half_norms[:width]
                best = _top_k(products, k) if width > k else np.tile(np.arange(k), (len(q), 1))
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
                best_scores[hit], best[hit] = _merge_best(best_scores[hit], best[hit], query, scores[better],
                                                          column[better] + first)
        order = np.lexsort((best, -best_scores), axis=1)  # by score, ties by row: deterministic
        best = np.take_along_axis(best, order, axis=1)
        squared = _squared_norms(q)[:, None] - 2 * np.take_along_axis(best_scores, order, axis=1)
        distances[start : start + chunk] = np.sqrt(np.maximum(squared, 0))
        indices[start : start + chunk] = best
    return distances, indices


def _merge_best(
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


def _rows_except(rows: int, held: np.ndarray) -> np.ndarray:
    """0 ... rows - 1 without `held`."""
    keep = np.ones(rows, bool)
    keep[held] = False
    return np.flatnonzero(keep)


def _powers_of_two(first: int, last: int) -> list[int]:
    """first, 2 first, 4 first... below `last`, then `last`: the query-time settings tried at build time."""
    values = [first]
    while values[-1] * 2 < last:
        values.append(values[-1] * 2)
    return [*values, last] if last > first else [first]


class _BallTree:
    """scikit-learn's BallTree, rebuilt from the embeddings (exact)."""

    knob = None  # the query-time setting of approximate engines

    def __init__(self, embeddings: np.ndarray, leaf_size: int):
        from sklearn.neighbors import BallTree  # imported here: scikit-learn takes 100 MiB that other engines spare

        self.tree = BallTree(embeddings, leaf_size=leaf_size)
        self.params = {"leaf_size": leaf_size}

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self.tree.query(queries, k=k)
        return distances.astype(np.float32), indices.astype(np.int64)


class _Brute:
    """Exact search by matrix products (see `_brute_kneighbors`)."""

    knob = None

    def __init__(self, embeddings: np.ndarray, half_norms: np.ndarray | None = None):
        self.embeddings = embeddings
        self.half_norms = (0.5 * _squared_norms(embeddings)).astype(np.float32) if half_norms is None else half_norms
        self.params: dict = {}

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        return _brute_kneighbors(self.embeddings, queries, k, self.half_norms)


class _Hnsw:
    """hnswlib's graph in L2 space (its distances are squared Euclidean); `ef` is the query-time beam width."""

    knob = "ef"
    knob_range = (1, 1 << 31)
    tune_from = 16  # hnswlib searches with max(ef, k) anyway
    suffix = ".hnsw"

    def __init__(self, graph, params: dict):
        self.graph = graph
        self.params = params

    @classmethod
    def build(cls, embeddings: np.ndarray, held: np.ndarray, hnsw_m: int, ef_construction: int) -> _Hnsw:
        """The graph of every row but `held` (`add` them after measuring recall)."""
        import hnswlib

        graph = hnswlib.Index(space="l2", dim=embeddings.shape[1])
        graph.init_index(max_elements=len(embeddings), M=hnsw_m, ef_construction=ef_construction, random_seed=SEED)
        engine = cls(graph, {"library": f"hnswlib {version('hnswlib')}", "space": "l2", "hnsw_m": hnsw_m,
                             "ef_construction": ef_construction, "seed": SEED})
        engine.add(embeddings, _rows_except(len(embeddings), held))
        return engine

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add `rows` (sorted) of `embeddings`, a block at a time."""
        for low, high, vectors in _by_block(embeddings, rows):
            self.graph.add_items(vectors, rows[low:high], num_threads=usable_cpus())

    @classmethod
    def read(cls, path: Path, embeddings: np.ndarray, params: dict) -> _Hnsw:
        import hnswlib

        graph = hnswlib.Index(space="l2", dim=embeddings.shape[1])
        graph.load_index(str(path), max_elements=0)
        rows, dim = embeddings.shape
        if (graph.element_count, graph.M) != (rows, params["hnsw_m"]):
            raise ValueError(f"it holds {graph.element_count} rows linked with M {graph.M}, not the {rows} rows "
                             f"linked with M {params['hnsw_m']} that index.json records")
        # a sample of rows by number (hnswlib raises on a missing one): a graph of other vectors or of another
        # dimension differs; the file's SHA-256 was checked, so this is not a defence against tampering
        sample = np.sort(np.random.default_rng(SEED).choice(rows, min(16, rows), replace=False))
        if not np.array_equal(graph.get_items(sample), _take(embeddings, sample)):
            raise ValueError(f"its rows are not the {rows} x {dim} embeddings")
        return cls(graph, params)

    def write(self, path: Path) -> None:
        self.graph.save_index(str(path))

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        self.graph.set_ef(knob)
        try:
            labels, squared = self.graph.knn_query(queries, k=k, num_threads=usable_cpus())
        except RuntimeError:  # fewer than k rows reachable: the caller searches exactly instead
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return np.sqrt(np.maximum(squared, 0)), labels.astype(np.int64)


class _Faiss:
    """A FAISS index on inner products of unit vectors: exact `IndexFlatIP`, or `IndexIVFFlat` probing `nprobe`
    of its `nlist` lists per query."""

    suffix = ".faiss"
    tune_from = 1

    def __init__(self, index, params: dict):
        self.index = index
        self.params = params
        self.knob = "nprobe" if params["nlist"] else None
        self.knob_range = (1, params["nlist"])

    @classmethod
    def build(cls, embeddings: np.ndarray, held: np.ndarray, nlist: int) -> _Faiss:
        """Exact `IndexFlatIP` of every row (`nlist` 0), or `IndexIVFFlat` trained on every row (at most 256 per
        list, FAISS's default sample) holding every row but `held` (`add` them after measuring recall)."""
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        rows, dim = embeddings.shape
        params = {"library": f"faiss {faiss.__version__}", "metric": "inner_product", "nlist": nlist}
        if not nlist:
            index = faiss.IndexFlatIP(dim)
            index.add(embeddings)
            return cls(index, {**params, "type": "IndexFlatIP"})
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.spherical = SEED, True
        index.train(embeddings)
        engine = cls(index, {**params, "type": "IndexIVFFlat", "spherical": True, "seed": SEED,
                             "train_rows": min(rows, 256 * nlist)})
        engine.add(embeddings, _rows_except(rows, held))
        return engine

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add `rows` (sorted) of `embeddings`, a block at a time."""
        for low, high, vectors in _by_block(embeddings, rows):
            self.index.add_with_ids(vectors, rows[low:high])

    @classmethod
    def read(cls, path: Path, embeddings: np.ndarray, params: dict) -> _Faiss:
        import faiss

        index = faiss.read_index(str(path))
        kind = type(faiss.downcast_index(index)).__name__
        nlist = faiss.extract_index_ivf(index).nlist if kind == "IndexIVFFlat" else 0
        if (index.ntotal, index.d, kind, nlist, index.metric_type) != (
            *embeddings.shape, params.get("type"), params.get("nlist"), faiss.METRIC_INNER_PRODUCT
        ):
            raise ValueError(f"it holds {index.ntotal} x {index.d} rows in an {kind} (nlist {nlist}), not the "
                             f"{embeddings.shape[0]} x {embeddings.shape[1]} rows in an {params.get('type')} "
                             f"(nlist {params.get('nlist')}) that index.json records")
        return cls(index, params)

    def write(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        params = faiss.SearchParametersIVF(nprobe=knob) if knob else None
        scores, indices = self.index.search(np.ascontiguousarray(queries), k, params=params)
        # rows are unit vectors: |q - g|^2 = |q|^2 + 1 - 2 q.g; a missing neighbour (index -1) stays -1
        squared = _squared_norms(queries)[:, None] + 1 - 2 * scores.astype(np.float64)
        return np.sqrt(np.maximum(squared, 0)).astype(np.float32), indices.astype(np.int64)


_KNOB_BACKENDS = {"ef": "an hnsw index", "nprobe": "a faiss index of at least "
                  f"{FAISS_IVF_MIN_ROWS:,} rows (IVF; or built with --nlist)"}


class Index:
    """Nearest-neighbour search over L2-normalised embeddings, one row per image, with its metadata.

    `backend` is balltree (default), brute, hnsw or faiss. `leaf_size` (default 40) is the BallTree's;
    `hnsw_m` (default 16) and `ef_construction` (default 200) the hnsw graph's; `nlist` the faiss IVF lists
    (default: none, exact, below 100,000 rows; 4 sqrt(rows) above; 0 forces exact). `ef` (hnsw) and `nprobe`
    (faiss IVF) are the query-time defaults (default: the smallest power of two whose recall@10 on held-out rows
    reaches `target_recall`, default 0.99; see `_tune`). `model` and `embedder` record which network made the
    embeddings (see `siamese.embed`); `source` which catalog they came from; `part` which shard of it (see
    `merge_parts`).
    Like scikit-learn's neighbors, `kneighbors` answers vectors; `query` answers images.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        items: Sequence[str],
        filenames: Sequence[str],
        labels: Sequence[Sequence[str]],
        *,
        backend: str = "balltree",
        leaf_size: int = 40,
        hnsw_m: int = 16,
        ef_construction: int = 200,
        nlist: int | None = None,
        ef: int | None = None,
        nprobe: int | None = None,
        target_recall: float = 0.99,
        model: dict | None = None,
        embedder: dict | None = None,
        source: dict | None = None,
        part: dict | None = None,
    ):
        if backend not in BACKENDS:
            raise SiameseError(f"Expected --index to be one of {', '.join(BACKENDS)}. Received: {backend!r}")
        for flag, value in (("--leaf-size", leaf_size), ("--hnsw-m", hnsw_m), ("--ef-construction", ef_construction)):
            if value < 1:
                raise SiameseError(f"Expected {flag} >= 1. Received: {value}")
        if not 0 < target_recall <= 1:
            raise SiameseError(f"Expected 0 < --target-recall <= 1. Received: {target_recall}")
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise SiameseError(f"Expected embeddings of shape (rows >= 1, dim >= 1). Received: {embeddings.shape}")
        rows = embeddings.shape[0]
        if nlist is None:
            nlist = int(4 * rows**0.5) if rows >= FAISS_IVF_MIN_ROWS else 0
        if not 0 <= nlist <= rows:
            raise SiameseError(f"Expected 0 <= --nlist <= {rows} (the rows to index; 0 is exact). Received: {nlist}")
        squared = np.concatenate([_squared_norms(block) for _, block in _blocks(embeddings)])
        if not np.isfinite(squared).all():
            raise SiameseError("Expected finite embeddings. Received: NaN or infinite values")
        if (squared == 0).any():
            raise SiameseError("Expected non-zero embeddings. Received: a row of zeros, which has no direction")
        # already-unit rows are kept bit for bit, so a saved and reloaded index answers exactly alike
        norms = np.sqrt(squared).astype(np.float32)[:, None]
        if np.abs(norms - 1).max() > 1e-6:
            embeddings = embeddings / norms
            squared = _squared_norms(embeddings)
        half_norms = (0.5 * squared).astype(np.float32)
        del squared, norms  # 12 MiB at a million rows, not kept while the engine is built
        self._set_rows(embeddings, items, filenames, labels)
        self._set_metadata(backend, model, embedder, source, part)
        approximate = backend == "hnsw" or (backend == "faiss" and nlist > 0)
        held = _held_out(rows) if approximate else np.empty(0, np.int64)
        if backend == "balltree":
            self._engine = _BallTree(embeddings, leaf_size)
        elif backend == "brute":
            self._engine = _Brute(embeddings, half_norms)
        elif backend == "hnsw":
            self._engine = _Hnsw.build(embeddings, held, hnsw_m, ef_construction)
        else:
            self._engine = _Faiss.build(embeddings, held, nlist)
        self.recall = self._tune({"ef": ef, "nprobe": nprobe}, target_recall, held, half_norms)

    def _set_rows(self, embeddings: np.ndarray, items, filenames, labels) -> None:
        if not (len(items) == len(filenames) == len(labels) == embeddings.shape[0]):
            raise SiameseError(
                f"Expected one item, filename and labels per row ({embeddings.shape[0]} rows). "
                f"Received: {len(items)} items, {len(filenames)} filenames, {len(labels)} labels"
            )
        self.embeddings = embeddings
        self.items = list(items)
        self.filenames = list(filenames)
        self.labels = [tuple(x) for x in labels]
        self._model_cache = None

    def _set_metadata(self, backend: str, model, embedder, source, part) -> None:
        self.backend = backend
        self.model = model or {}
        self.embedder = embedder or {}
        self.source = source or {}
        self.part = part

    def _tune(
        self, given: dict[str, int | None], target: float, held: np.ndarray, half_norms: np.ndarray
    ) -> dict | None:
        """Measure recall@10 of an approximate engine that lacks the `held` rows, searching for them, at the
        `given` value of its query-time knob (ef, nprobe), or at the smallest power of two that reaches `target`;
        keep that value in `params`, then add the held rows. With none held (under 10 rows), search exhaustively,
        measured on all. `half_norms`: the rows' |row|^2 / 2."""
        for name, value in given.items():
            if value is not None:
                self._check_knob(name, value)
        if self._engine.knob is None:
            return None
        queries = _take(self.embeddings, held) if len(held) else np.asarray(self.embeddings)
        k = min(10, len(self) - len(held))
        half_norms = half_norms.copy()
        half_norms[held] = np.inf  # not in the engine yet: never a neighbour
        _, truth = _brute_kneighbors(self.embeddings, queries, k, half_norms, lean=True)
        tried = _powers_of_two(self._engine.tune_from, min(self._engine.knob_range[1], len(self) - len(held)))
        chosen = given[self._engine.knob]
        for value in [chosen] if chosen is not None else tried if len(held) else tried[-1:]:
            recall = _recall(self.embeddings, queries, truth, self._engine.search(queries, k, value)[1])
            if recall >= target:
                break
        self._engine.params[self._engine.knob] = value
        self._engine.add(self.embeddings, held)
        return {"recall_at_10": recall, "k": k, "queries": len(queries), "held_out": bool(len(held)), "seed": SEED,
                "target": target}

    @property
    def params(self) -> dict:
        """The engine's settings as index.json records them (e.g. hnsw_m, ef_construction, ef)."""
        return self._engine.params

    @property
    def recall_at_10(self) -> float | None:
        """Recall@10 measured at build time with the default `ef`/`nprobe`; None for exact engines."""
        return None if self.recall is None else self.recall["recall_at_10"]

    @property
    def engine(self) -> str:
        """The engine in words, e.g. "hnsw (M 16, ef_construction 200, ef 64)", "faiss IndexFlatIP (exact)"."""
        p = self.params
        if self.backend == "hnsw":
            return f"hnsw (M {p['hnsw_m']}, ef_construction {p['ef_construction']}, ef {p.get('ef')})"
        if self.backend == "faiss" and p["nlist"]:
            return f"faiss {p['type']} (nlist {p['nlist']}, nprobe {p.get('nprobe')})"
        return f"faiss {p['type']} (exact)" if self.backend == "faiss" else self.backend

    @classmethod
    def from_catalog(cls, catalog: Catalog, embeddings: np.ndarray, **kwargs) -> Index:
        """An index of `catalog`'s images (`embeddings` in `catalog.filenames` order); kwargs as `Index`."""
        items = [catalog.items[i].id for i in catalog.image_item]
        labels = [catalog.items[i].labels for i in catalog.image_item]
        return cls(embeddings, items, catalog.filenames, labels, **kwargs)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def _check_knob(self, name: str, value: int) -> None:
        if name != self._engine.knob:
            raise SiameseError(f"Expected --{name} only with {_KNOB_BACKENDS[name]}. Received: --{name} {value} "
                               f"for a {self.engine} index. Fix: leave out --{name}.")
        low, high = self._engine.knob_range
        if not low <= value <= high:
            raise SiameseError(f"Expected {low} <= --{name} <= {high} for this {self.engine} index. "
                               f"Received: {value}")

    def kneighbors(
        self, vectors: np.ndarray, k: int = 10, *, ef: int | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows of each vector: `(distances, indices)`, each `(queries, k)`, nearest first.

        `ef` (hnsw) and `nprobe` (faiss IVF) trade speed for recall (default: the index's, see `params`).
        A query an approximate engine finds fewer than `k` rows for is answered by exact search.
        """
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise SiameseError(
                f"Expected query embeddings of shape (n, {self.dim}) like the index's. Received: {vectors.shape}. "
                "Fix: embed the queries with the model that built the index."
            )
        if not 1 <= k <= len(self):
            raise SiameseError(
                f"Expected 1 <= k <= {len(self)} (the index holds {plural(len(self), 'image')}). Received: {k}"
            )
        for name, value in (("ef", ef), ("nprobe", nprobe)):
            if value is not None:
                self._check_knob(name, value)
        knob = self._engine.knob
        value = {"ef": ef, "nprobe": nprobe}.get(knob) or self.params.get(knob)
        distances, indices = self._engine.search(vectors, k, value)
        short = (indices < 0).any(axis=1)
        if short.any():
            distances[short], indices[short] = _brute_kneighbors(self.embeddings, vectors[short], k)
        return distances, indices

    def search(
        self, vectors: np.ndarray, k: int = 10, by_item: bool = False, *, ef: int | None = None,
        nprobe: int | None = None,
    ) -> list[list[Match]]:
        """The `k` nearest images of each vector as `Match`es; `by_item` keeps the best image of `k` items;
        `ef`, `nprobe` as `kneighbors`."""
        if not by_item:
            return [self._matches(d, i) for d, i in zip(*self.kneighbors(vectors, k, ef=ef, nprobe=nprobe),
                                                         strict=True)]
        n_items = len(set(self.items))
        if not 1 <= k <= n_items:
            raise SiameseError(f"Expected 1 <= k <= {n_items} (the index holds {plural(n_items, 'item')}). "
                               f"Received: {k}")
        results = []
        for vector in np.asarray(vectors, np.float32):
            wanted = min(len(self), 4 * k)
            while True:
                distances, indices = self.kneighbors(vector[None], wanted, ef=ef, nprobe=nprobe)
                seen: dict[str, Match] = {}
                for match in self._matches(distances[0], indices[0]):
                    seen.setdefault(match.item, match)
                if len(seen) >= k or wanted == len(self):
                    break
                wanted = min(len(self), 2 * wanted)
            results.append(list(seen.values())[:k])
        return results

    def _matches(self, distances: np.ndarray, indices: np.ndarray) -> list[Match]:
        return [
            Match(int(i), self.items[i], self.filenames[i], self.labels[i], float(d), float(1 - d * d / 2))
            for d, i in zip(distances, indices, strict=True)
        ]

    def load_model(self):
        """The embedding network recorded by the index (loaded once), checked against its fingerprint."""
        if self._model_cache is None:
            from siamese.embed import load_embedder

            if not self.embedder:
                raise SiameseError("This index does not record its model. Fix: pass the model (--keras-model).")
            self.check_model(*load_embedder(**self.embedder))
        return self._model_cache

    def check_model(self, model, info) -> None:
        """Refuse a model other than the one that built the index; remember it for `query`."""
        want = self.model.get("fingerprint")
        if info.embedding_dim != self.dim or (want and info.fingerprint != want):
            raise SiameseError(
                f"The index was built by a different model ({self.model.get('source', 'unknown')}, "
                f"{self.dim}-d, fingerprint {str(want)[:12]}). Received: {info.source}, {info.embedding_dim}-d, "
                f"fingerprint {info.fingerprint[:12]}. Fix: query with the model that built the index, or "
                "rebuild the index with this one."
            )
        self._model_cache = model

    def query(
        self, images: Sequence, k: int = 10, by_item: bool = False, *, ef: int | None = None,
        nprobe: int | None = None,
    ) -> list[list[Match]]:
        """The `k` nearest images (or items, `by_item`) of each image file or encoded bytes in `images`;
        `ef`, `nprobe` as `kneighbors`."""
        from siamese.embed import embed_images

        return self.search(embed_images(self.load_model(), images), k, by_item, ef=ef, nprobe=nprobe)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to `directory` (created if needed; see the module docstring) and return the folder.

        The folder is written whole beside `directory` and swapped in (`atomic.replace_folder`) under its lock
        (`claim_output`), so a crash or a second run leaves the previous index whole. A folder that holds anything
        but an index of this tool, and a shard part this index was merged from, are refused.
        """
        directory = Path(directory)
        refuse_part_output(directory, (self.source or {}).get("parts", []))
        rows = {"items": self.items, "filenames": self.filenames, "labels": self.labels}  # tuples: JSON arrays

        def write_rows(path: Path) -> None:  # streamed: a million rows make 50 MiB of JSON text
            with open(path, "w", encoding="utf-8") as f:
                json.dump(rows, f, ensure_ascii=False)

        with claim_output(directory), atomic.replace_folder(directory) as new:
            files = {
                **_write_hashed(new, "rows", ".json", write_rows),
                **_write_hashed(new, "embeddings", ".npy", lambda path: _save_npy(path, self.embeddings)),
            }
            if isinstance(self._engine, _Hnsw | _Faiss):
                files.update(_write_hashed(new, "engine", self._engine.suffix, self._engine.write))
            settings = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "backend": self.backend,
                "engine": self.params,
                "recall": self.recall,
                "rows": len(self),
                "dim": self.dim,
                "files": files,
                "model": self.model,
                "embedder": self.embedder,
                "source": self.source,
                "part": self.part,
                "created": utc_now(),
                "siamese": __version__,
            }
            atomic.write_json(new / "index.json", settings)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Index:
        """Read an index saved by `save`, refusing anything malformed, inconsistent or modified."""
        directory = Path(directory)
        settings_path = directory / "index.json"
        if not settings_path.is_file():
            raise SiameseError(f"{directory} is not an index: no index.json. Fix: build one with "
                              "`python utilities.py --export balltree ...` and pass its --output folder.")

        def refuse(problem: str) -> SiameseError:
            return SiameseError(f"{directory}: {problem}. Fix: rebuild the index with `--export balltree`.")

        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
            found = (settings.get("format"), settings.get("version"))
        except (ValueError, AttributeError) as e:
            raise refuse(f"index.json is malformed ({type(e).__name__}: {e})") from None
        if found[0] != FORMAT or found[1] not in (1, FORMAT_VERSION):
            raise refuse(f"expected format {FORMAT} version 1 or {FORMAT_VERSION}, found {found[0]!r} version "
                         f"{found[1]!r}")
        try:
            files = settings["files"]
            embeddings_path = directory / Path(files["embeddings"]).name
            rows_path = directory / Path(files["rows"]).name
            rows_count, dim = int(settings["rows"]), int(settings["dim"])
            backend = settings["backend"]
            # version 1 kept the BallTree's leaf size at the top level and had no other engine settings
            params = dict(settings["engine"]) if found[1] == 2 else {"leaf_size": settings["leaf_size"]}
        except (ValueError, KeyError, TypeError) as e:
            raise refuse(f"index.json is malformed ({type(e).__name__}: {e})") from None
        if backend not in BACKENDS:
            raise refuse(f"expected a backend of {', '.join(BACKENDS)}, found {backend!r}")
        embeddings = _check_embeddings(embeddings_path, rows_count, dim, files.get("embeddings_sha256"), refuse)
        try:
            data = rows_path.read_bytes()
            rows_sha256 = hashlib.sha256(data).hexdigest()
            rows = json.loads(data)
            del data
            items, filenames, labels = rows["items"], rows["filenames"], rows["labels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise refuse(f"{rows_path.name} is unreadable ({type(e).__name__}: {e})") from None
        if not all(isinstance(x, list) and len(x) == rows_count for x in (items, filenames, labels)):
            raise refuse(f"{rows_path.name} does not have one item, filename and labels list per row ({rows_count})")
        if rows_sha256 != files.get("rows_sha256"):
            raise refuse(f"{rows_path.name} was modified after the index was written (SHA-256 mismatch)")
        for key in ("model", "embedder", "source", "part", "recall"):
            if not isinstance(settings.get(key), dict | None):
                raise refuse(f"expected {key} to be an object or null, found {settings[key]!r:.80}")
        if set(settings.get("embedder") or {}) - EMBEDDER_KEYS:
            raise refuse(f"expected an embedder with keys among {', '.join(sorted(EMBEDDER_KEYS))}, found "
                         f"{sorted(settings['embedder'])}")
        index = cls.__new__(cls)
        index._set_rows(embeddings, items, filenames, labels)
        del rows, items, filenames, labels  # the JSON's lists of labels: 64 MiB at a million rows
        index._set_metadata(backend, settings.get("model"), settings.get("embedder"), settings.get("source"),
                            settings.get("part"))
        index.recall = settings.get("recall")
        if backend in ("hnsw", "faiss"):
            engine_path = directory / Path(str(files.get("engine"))).name
            if not engine_path.is_file() or _sha256(engine_path) != files.get("engine_sha256"):
                raise refuse(f"{engine_path.name} is missing or was modified after the index was written "
                             "(SHA-256 mismatch)")
            try:
                index._engine = (_Hnsw if backend == "hnsw" else _Faiss).read(engine_path, embeddings, params)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise refuse(f"{engine_path.name} does not agree with the embeddings: {e}") from None
        elif backend == "balltree":
            leaf_size = params.get("leaf_size")
            if type(leaf_size) is not int or leaf_size < 1:
                raise refuse(f"expected the balltree's leaf_size to be an integer >= 1, found {leaf_size!r}")
            index._engine = _BallTree(embeddings, leaf_size)
        else:
            index._engine = _Brute(embeddings)
        return index


def _write_hashed(directory: Path, stem: str, suffix: str, write: Callable[[Path], object]) -> dict[str, str]:
    """Write a file with `write(path)` as `stem-<first 16 hex of its SHA-256><suffix>` in `directory` (a folder
    no one else reads yet); return its index.json entries: {stem: name, stem_sha256: hash}."""
    path = directory / f"{stem}{suffix}"
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    digest = _sha256(path)
    name = f"{stem}-{digest[:16]}{suffix}"
    os.replace(path, directory / name)
    return {stem: name, f"{stem}_sha256": digest}


def index_files(directory: Path) -> set[str] | None:
    """The names in `directory` that belong to the index its index.json describes (index.json included), or
    None when it holds no index.json or one this tool did not write."""
    try:
        settings = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        files = settings["files"] if settings.get("format") == FORMAT else None
        named = {Path(v).name for k, v in files.items() if not k.endswith("_sha256") and isinstance(v, str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"index.json", *named}


def refuse_part_output(directory: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> None:
    """Refuse to write a merged index over one of the shard `parts` it is merged from."""
    if Path(directory).resolve() in {Path(p).resolve() for p in parts}:
        raise SiameseError(f"Expected an output folder apart from the parts merged. Received: {directory}, one of "
                           "the parts. Fix: write the merged index to a new folder.")


def claim_output(directory: str | os.PathLike) -> AbstractContextManager[Path]:
    """Lock the index folder `directory` and check that it is new, empty, or an index this tool wrote and nothing
    else (see `atomic.claim_folder`): writing an index there deletes no one's files."""
    return atomic.claim_folder(directory, index_files, "an index")


def _check_embeddings(
    path: Path, rows: int, dim: int, sha256: str | None, refuse: Callable[[str], SiameseError]
) -> np.ndarray:
    """Read-only memory map of the .npy at `path`, after one streaming pass over the file that checks its header
    (plain float32 `(rows, dim)`: a pickle or an object array is refused, never unpickled), that its rows are
    finite and unit, and its SHA-256: checking holds 16 MiB of it in memory at a time, not a second copy."""
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, and by the with)
    except OSError as e:
        raise refuse(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
    with f:
        try:
            shape, fortran, dtype = headers[np.lib.format.read_magic(f)](f)
        except (KeyError, ValueError, EOFError) as e:
            raise refuse(f"{path.name} is not a plain .npy array ({type(e).__name__}: {e})") from None
        if dtype.hasobject:
            raise refuse(f"{path.name} is not a plain .npy array (an object array, which only a pickle loads)")
        if dtype != np.float32 or fortran or shape != (rows, dim):
            raise refuse(f"expected float32 embeddings of shape {(rows, dim)}; {path.name} holds {dtype} {shape}"
                         f"{' in Fortran order' if fortran else ''}")
        digest = hashlib.sha256()
        header = f.tell()
        f.seek(0)
        digest.update(f.read(header))
        block = max(1, (1 << 24) // (4 * dim))
        for start in range(0, rows, block):
            data = f.read(4 * dim * min(block, rows - start))
            if len(data) != 4 * dim * min(block, rows - start):
                raise refuse(f"{path.name} is truncated: shorter than its header says")
            digest.update(data)
            squared = _squared_norms(np.frombuffer(data, np.float32).reshape(-1, dim))
            if not np.isfinite(squared).all():
                raise refuse(f"{path.name} holds NaN or infinite values")
            if np.abs(np.sqrt(squared) - 1).max() > NORM_TOLERANCE:
                raise refuse(f"{path.name} holds rows that are not L2-normalised")
        for rest in iter(lambda: f.read(1 << 20), b""):
            digest.update(rest)
    if digest.hexdigest() != sha256:
        raise refuse(f"{path.name} was modified after the index was written (SHA-256 mismatch)")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _held_out(rows: int) -> np.ndarray:
    """The rows (sorted) that measure recall: a seeded sample of a tenth, at most RECALL_QUERIES."""
    return np.sort(np.random.default_rng(SEED).choice(rows, min(RECALL_QUERIES, rows // 10), replace=False))


def _recall(embeddings: np.ndarray, queries: np.ndarray, truth: np.ndarray, found: np.ndarray) -> float:
    """Share of the true k nearest rows found; a found row as near as the true k-th counts (ties, duplicates).
    The rows are gathered once; distances are in float64, 128 queries at a time."""
    kth_rows, found_rows = _take(embeddings, truth[:, -1:]), _take(embeddings, np.maximum(found, 0))

    def squared(rows: np.ndarray, start: int) -> np.ndarray:
        diff = rows[start : start + 128].astype(np.float64) - queries[start : start + 128, None]
        return np.einsum("ijk,ijk->ij", diff, diff)

    hits = 0
    for start in range(0, len(queries), 128):
        near = found[start : start + 128] >= 0
        hits += (near & (squared(found_rows, start) <= squared(kth_rows, start) * (1 + 1e-9))).sum()
    return float(hits / found.size)


def merge_parts(directories: Sequence[str | os.PathLike], backend: str | None = None, **settings) -> Index:
    """One index of the shard parts in `directories` (written by `index --shard I/N`), rows in catalog order.

    Refuses parts of different models or catalogs, missing or repeated shards, naming the folder and the fix.
    `backend` defaults to the parts'; `settings` (keyword arguments of `Index`: leaf_size, hnsw_m...) default to
    the parts' when the backend is theirs. Embeddings and rows equal those of indexing the catalog at once.
    The joined embeddings are memory-mapped from a temporary file beside the first part, so a merge holds the
    engine and a block of them (see `Index`), not all of them.
    """
    if not directories:
        raise SiameseError("Expected at least one part to merge. Received: none. Fix: pass the parts' folders.")
    parts = []
    for directory in directories:
        index = Index.load(directory)
        if not index.part:
            raise SiameseError(f"Expected shard parts. Received: {directory}, an index of a whole catalog. "
                               "Fix: pass the folders written by `index --shard I/N`.")
        parts.append((Path(directory), index))
    first_dir, first = parts[0]
    shards, batch_size = first.part["shards"], first.part["batch_size"]
    for directory, index in parts[1:]:
        if index.model.get("fingerprint") != first.model.get("fingerprint"):
            raise SiameseError(
                f"Expected parts embedded by one model. Received: {directory} by {index.model.get('source')} "
                f"(fingerprint {str(index.model.get('fingerprint'))[:12]}), {first_dir} by "
                f"{first.model.get('source')} (fingerprint {str(first.model.get('fingerprint'))[:12]}). "
                f"Fix: rebuild {directory} with the model of the others (--keras-model)."
            )
        if index.part["catalog_sha256"] != first.part["catalog_sha256"]:
            raise SiameseError(
                f"Expected parts of one catalog. Received: {directory} of {index.source.get('labeled_data')} "
                f"(SHA-256 {index.part['catalog_sha256'][:12]}), {first_dir} of {first.source.get('labeled_data')} "
                f"(SHA-256 {first.part['catalog_sha256'][:12]}). Fix: rebuild {directory} from the "
                "--labeled-data of the others."
            )
        if (index.part["shards"], index.part["batch_size"]) != (shards, batch_size):
            raise SiameseError(
                f"Expected parts of one split. Received: {directory} is shard {index.part['shard']}/"
                f"{index.part['shards']} of batches of {index.part['batch_size']}, {first_dir} shard "
                f"{first.part['shard']}/{shards} of batches of {batch_size}. Fix: build every part with the "
                "same --shard I/N and --batch-size."
            )
    by_shard: dict[int, tuple[Path, Index]] = {}
    for directory, index in parts:
        shard = index.part["shard"]
        if shard in by_shard:
            raise SiameseError(f"Expected each shard once. Received: shard {shard}/{shards} twice, in "
                               f"{by_shard[shard][0]} and {directory}. Fix: pass one of them.")
        by_shard[shard] = (directory, index)
    missing = [s for s in range(1, shards + 1) if s not in by_shard]
    if missing:
        listed = ", ".join(f"{s}/{shards}" for s in missing)
        raise SiameseError(f"Expected every shard of {shards}. Received: no part for shard {listed}. Fix: build "
                           f"{'it' if len(missing) == 1 else 'them'} with `index ... --shard {missing[0]}/{shards}` "
                           "and pass every part.")
    stop = 0
    for shard in range(1, shards + 1):
        directory, index = by_shard[shard]
        start, end = index.part["rows"]
        if start != stop or len(index) > end - start:
            raise SiameseError(f"Expected shard {shard}/{shards} to start at catalog image {stop}. Received: "
                               f"{directory} holds images {start} to {end}. Fix: rebuild it with "
                               f"`index ... --shard {shard}/{shards} --batch-size {batch_size}`.")
        stop = end
    ordered = [by_shard[s][1] for s in range(1, shards + 1)]
    backend = backend or first.backend
    inherited = _build_settings(first) if backend == first.backend else {}
    items = [item for index in ordered for item in index.items]
    filenames = [f for index in ordered for f in index.filenames]
    labels = [labels for index in ordered for labels in index.labels]
    catalog = Catalog(_items_of_rows(items, filenames, labels), Path(first.source.get("image_dir", ".")))
    source = {**first.source, "sha256": catalog.digest(), "parts": [str(d.resolve()) for d, _ in parts]}
    return Index(_joined([index.embeddings for index in ordered], first_dir), items, filenames, labels,
                 backend=backend, model=first.model, embedder=first.embedder, source=source,
                 **{**inherited, **settings})


def _joined(arrays: Sequence[np.ndarray], directory: Path) -> np.ndarray:
    """The rows of `arrays` one after another, written a block at a time (see `_blocks`) to an unnamed temporary
    file in `directory` and memory-mapped read-only: joining memory-mapped parts holds a block, not the whole."""
    with tempfile.TemporaryFile(dir=directory) as f:  # gone from the disk once nothing maps it
        for array in arrays:
            _write_rows(f, array.astype(np.float32, copy=False))
        f.flush()
        return np.memmap(f, np.float32, "r", shape=(sum(map(len, arrays)), arrays[0].shape[1]))


def _build_settings(index: Index) -> dict:
    """The keyword arguments of `Index` that built `index`'s engine (the ones a rebuild keeps)."""
    kept = {k: index.params[k] for k in ("leaf_size", "hnsw_m", "ef_construction") if k in index.params}
    return {**kept, "target_recall": index.recall["target"]} if index.recall else kept


def _items_of_rows(items: Sequence[str], filenames: Sequence[str], labels: Sequence[tuple[str, ...]]) -> tuple:
    """The catalog items of index rows in catalog order (each item's rows are consecutive)."""
    out = []
    for item, rows in groupby(zip(items, filenames, labels, strict=True), key=lambda row: row[0]):
        rows = list(rows)
        out.append(Item(item, tuple(filename for _, filename, _ in rows), tuple(rows[0][2])))
    return tuple(out)
