"""A faiss index of embedding stores built on Ray (`index_stores(..., runner="ray")`, `index --runner ray`).

The driver trains the index as the local build does (`Faiss.build`), then Ray tasks add the rows: one task per
store part, each reading its part's rows with pyarrow (on a cluster the stores must be at the same path on every
node, or at a URI every node opens) and adding them, with their global row ids, to a copy of the trained empty
index. The driver merges the copies into its index in row order (`IndexIVF.merge_from` appends each list), so
every list holds its rows in the order a local add gives: the same index comes out, byte for byte. It holds its
index and one copy at a time; at most `window` tasks run or wait to be merged.

Only IVF indexes merge: an HNSW graph does not, and a flat index (under a budget: below 100,000 rows) gains
nothing, so those are built here (with a warning for HNSW). Each task checks its part against the manifest
(SHA-256) and its rows against a digest of the driver's, so the index holds the rows the driver tuned and
re-ranks by.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from siamese.errors import SiameseError
from siamese.search.faiss import trim_heap
from siamese.search.kernel import PASS_ROWS, blocks, squared_norms

if TYPE_CHECKING:
    from siamese.embedding_store import EmbeddingStore
    from siamese.search import Engine
    from siamese.search.faiss import Faiss

RUNNERS = ("local", "ray")


@dataclass(frozen=True)
class Part:
    """One part file of a store: where it is (`store`, a folder or URI, and `name`), what the manifest says of it
    (`sha256`, `bytes`), the global rows it holds (`start` to `start + rows`; its first is row `first` of its store)
    and the store's format `version`."""

    store: str
    name: str
    sha256: str
    bytes: int
    start: int
    rows: int
    first: int
    version: int


def store_parts(stores: Sequence[EmbeddingStore]) -> list[Part]:
    """The parts of `stores` in row order, numbered on across the stores as `index_stores` numbers their rows."""
    parts, start = [], 0
    for store in stores:
        where, first = str(store.local) if store.local is not None else store.path, 0
        for p in store.parts:
            parts.append(Part(where, p["name"], p["sha256"], p["bytes"], start, p["rows"], first, store.version))
            start, first = start + p["rows"], first + p["rows"]
    return parts


def with_runner(engine: str | Engine, runner: str, stores: Sequence[EmbeddingStore],
                address: str | None = None) -> str | Engine:
    """`engine` as `index_stores` builds it on `runner` ("local": itself; "ray": a faiss engine whose rows are
    added by Ray tasks over the parts of `stores`, on the cluster at `address`, default $RAY_ADDRESS, else a
    local Ray). Refused, before any part is read, for another runner or engine."""
    from siamese.search import make_engine
    from siamese.search.faiss import Faiss

    if runner not in RUNNERS:
        raise SiameseError(f"Expected `runner` to be one of {', '.join(RUNNERS)}. Received: {runner!r}. Fix: pass "
                           "`runner='local'` (the default) or `runner='ray'`.")
    if runner == "local":
        return engine
    made = make_engine(engine)
    if not isinstance(made, Faiss):
        raise SiameseError(f"Expected `engine='faiss'` with `runner='ray'`. Received: `engine='{made.name}'`. Fix: "
                           "pass `engine='faiss'` (Ray adds the rows of its IVF lists), or leave out `runner`.")
    made = copy.copy(made)  # the engine given stays as it was
    made.runner = RayRunner(store_parts(stores), address)
    return made


def read_part(part: Part, dim: int) -> np.ndarray:
    """The embeddings (float32 `(rows, dim)`) of `part`, checked as `EmbeddingStore.batches` checks a part."""
    from siamese.embedding_store import read_part as read_store_part

    entry = {"name": part.name, "rows": part.rows, "bytes": part.bytes, "sha256": part.sha256}
    (_, vectors), = read_store_part(part.store, entry, dim, part.version, part.first, part.rows, metadata=False)
    return vectors


def digest(vectors: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vectors, np.float32).data).hexdigest()


def add_part(trained: np.ndarray, part: Part, dim: int, held: np.ndarray, expected: str,
             threads: int = 1) -> np.ndarray:
    """A Ray task: the serialized index `trained` with the rows of `part` but `held` (sorted global rows) added
    by their global row ids, as `Faiss.add` adds them (the same blocks of PASS_ROWS global rows), serialized;
    FAISS runs `threads` threads (default 1, the task's CPU). The part's rows must be the driver's (`expected`,
    their `digest`): as stored, or as `Index` normalises them."""
    import faiss

    faiss.omp_set_num_threads(threads)
    vectors = read_part(part, dim)
    if digest(vectors) != expected:
        norms = np.sqrt(squared_norms(vectors)).astype(np.float32)[:, None]  # as Index normalises every row
        vectors = vectors / norms
        if digest(vectors) != expected:
            raise SiameseError(f"Expected part {part.name} of {part.store} to hold the rows {part.start:,} to "
                               f"{part.start + part.rows - 1:,} that the driver indexes. Received: other embeddings."
                               " Fix: index the stores again once nothing writes them.")
    index = faiss.deserialize_index(trained)
    end = part.start + part.rows
    low = part.start
    while low < end:
        high = min(end, (low // PASS_ROWS + 1) * PASS_ROWS)
        ids = np.arange(low, high)
        ids = ids[~np.isin(ids, held, assume_unique=True)]
        if len(ids):
            index.add_with_ids(vectors[ids - part.start], ids)
        low = high
    return faiss.serialize_index(index)


class RayRunner:
    """Adds the rows of a trained faiss IVF index on Ray: one `add_part` task per part of `parts` (1 CPU each), at
    most `window` (default: twice the cluster's CPUs) running or waiting for the driver to merge them."""

    def __init__(self, parts: Sequence[Part], address: str | None = None, window: int | None = None):
        self.parts, self.address, self.window = list(parts), address, window

    def add(self, engine: Faiss, embeddings: np.ndarray, rows: np.ndarray) -> bool:
        """Add the sorted `rows` (every row but the held ones) of `embeddings` to `engine.index` on Ray; False
        (nothing added) where its index does not merge (not IVF): the caller adds them."""
        import faiss

        if faiss.try_extract_index_ivf(engine.index) is None:
            if engine.params.get("family") == "hnsw":
                warnings.warn("Building the HNSW index in this process, not on Ray: an HNSW graph does not "
                              "merge. A smaller `max_memory` picks an IVF index, which Ray builds.", stacklevel=3)
            return False
        if sum(p.rows for p in self.parts) != len(embeddings):
            raise SiameseError(f"Expected the stores' {sum(p.rows for p in self.parts):,} rows. Received: "
                               f"{len(embeddings):,} embeddings. Fix: index the stores with `index_stores`.")
        import ray

        from siamese.ray_runner import connect

        held = np.setdiff1d(np.arange(len(embeddings)), rows, assume_unique=True)
        disconnect = connect(self.address)
        try:
            task = ray.remote(num_cpus=1)(add_part)
            window = self.window or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
            trained = ray.put(faiss.serialize_index(engine.index))
            pending: deque = deque()
            for part in self.parts:
                if len(pending) >= window:
                    merge(engine.index, ray.get(pending.popleft()))
                mine = held[(held >= part.start) & (held < part.start + part.rows)]
                pending.append(task.remote(trained, part, embeddings.shape[1], mine,
                                           part_digest(embeddings, part)))
            while pending:
                merge(engine.index, ray.get(pending.popleft()))
        except BaseException as e:
            for ref in pending:  # on a cluster they would run on after this process gave up
                ray.cancel(ref)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(getattr(e, "cause", None), SiameseError):
                raise SiameseError(str(e.cause)) from None  # the task's refusal, without Ray's traceback
            raise
        finally:
            if disconnect:
                disconnect()
        engine.params["runner"] = "ray"
        return True


def part_digest(embeddings: np.ndarray, part: Part) -> str:
    """The `digest` of the driver's rows of `part`, read a block at a time."""
    hashed = hashlib.sha256()
    for _, block in blocks(embeddings[part.start : part.start + part.rows]):
        hashed.update(np.ascontiguousarray(block, np.float32).data)
    return hashed.hexdigest()


def merge(index, serialized: np.ndarray) -> None:
    """Append the lists of the serialized copy to those of `index` (the copy's ids are global rows already)."""
    import faiss

    copy = faiss.deserialize_index(serialized)
    index.merge_from(copy, 0)
    del copy
    trim_heap()

