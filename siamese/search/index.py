"""`Index`: the rows of a catalog's images (embeddings, item, filename, labels), their metadata and an `Engine`.

Every engine answers Euclidean distances between unit vectors, so similarity = 1 - distance^2 / 2 throughout.
An index can be built from memory-mapped embeddings (`np.load(path, mmap_mode="r")`): every pass over them then
reads one block at a time and drops it from memory after use, so building an hnsw index holds the graph and one
block, not the graph and the embeddings. On disk it is a folder (see `siamese.search.folder`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese.errors import SiameseError
from siamese.search import folder
from siamese.search.engine import Engine, make_engine
from siamese.search.kernel import blocks, kneighbors, squared_norms
from siamese.search.rows import Column, Rows
from siamese.search.tuning import held_out, tune
from siamese.util import plural

if TYPE_CHECKING:
    from siamese.catalog import Catalog


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


class Index:
    """Nearest-neighbour search over L2-normalised embeddings, one row per image, with its metadata: `items`,
    `filenames` and `labels` (one each per row), or `rows` (a `siamese.search.rows.Rows`, which may be
    memory-mapped: no Python object per row).

    `engine` is an `Engine` with its settings (e.g. `Hnsw(m=8)`) or a registered name meaning its defaults
    (default "balltree"; see `siamese.search.ENGINES`); the index builds a copy of it, `index.engine` (its `name`,
    `description` and `params`). Approximate engines hold out a seeded sample of rows to choose their query-time
    knob for recall (see `siamese.search.tuning`); `recall` is what they measured (None for exact engines).
    `model` and `embedder` record which network made the embeddings (see `siamese.embed`); `source` which catalog
    they came from; `part` which shard of it (see `merge_parts`). Like scikit-learn's neighbors, `kneighbors` and
    `search` answer vectors; images are answered by `siamese.embed.Embedder.search`, so the index never loads a
    model.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        items: Sequence[str] | None = None,
        filenames: Sequence[str] | None = None,
        labels: Sequence[Sequence[str]] | None = None,
        *,
        rows: Rows | None = None,
        engine: str | Engine = "balltree",
        model: dict | None = None,
        embedder: dict | None = None,
        source: dict | None = None,
        part: dict | None = None,
    ):
        engine = copy.copy(make_engine(engine))  # an engine given is a recipe: building another index keeps it
        engine.params = dict(engine.params)
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise SiameseError(f"Expected embeddings of shape (rows >= 1, dim >= 1). Received: {embeddings.shape}")
        squared = np.concatenate([squared_norms(block) for _, block in blocks(embeddings)])
        if not np.isfinite(squared).all():
            raise SiameseError("Expected finite embeddings. Received: NaN or infinite values")
        if (squared == 0).any():
            raise SiameseError("Expected non-zero embeddings. Received: a row of zeros, which has no direction")
        # already-unit rows are kept bit for bit, so a saved and reloaded index answers exactly alike
        norms = np.sqrt(squared).astype(np.float32)[:, None]
        if np.abs(norms - 1).max() > 1e-6:
            embeddings = embeddings / norms
            squared = squared_norms(embeddings)
        half_norms = (0.5 * squared).astype(np.float32)
        del squared, norms  # 12 MiB at a million rows, not kept while the engine is built
        given = [name for name, value in (("items", items), ("filenames", filenames), ("labels", labels))
                 if value is not None]
        if rows is None:
            if len(given) < 3:
                raise SiameseError(f"Expected `items`, `filenames` and `labels`, or `rows`. Received: "
                                   f"{' and '.join(f'`{n}`' for n in given) or 'none of them'}")
            if not (len(items) == len(filenames) == len(labels) == embeddings.shape[0]):
                raise SiameseError(
                    f"Expected one item, filename and labels per row ({embeddings.shape[0]} rows). "
                    f"Received: {len(items)} items, {len(filenames)} filenames, {len(labels)} labels"
                )
            rows = Rows.from_lists(items, filenames, labels)
        elif given:
            raise SiameseError(f"Expected `rows` or `items`, `filenames` and `labels`, not both. Received: `rows` and "
                               f"{' and '.join(f'`{n}`' for n in given)}")
        self._hold(embeddings, rows, engine, None, model, embedder, source, part)
        held = held_out(len(embeddings)) if engine.knob else np.empty(0, np.int64)
        engine.build(embeddings, held, half_norms)
        self.recall = tune(engine, embeddings, held, half_norms)

    @classmethod
    def from_built(
        cls,
        embeddings: np.ndarray,
        rows: Rows,
        *,
        engine: Engine,
        recall: dict | None = None,
        model: dict | None = None,
        embedder: dict | None = None,
        source: dict | None = None,
        part: dict | None = None,
    ) -> Index:
        """An index of unit `embeddings` (float32), their `rows` (`siamese.search.rows.Rows`) and an `engine`
        already built over them, as `load` reads one: nothing is normalised, built or tuned; `recall` is what tuning
        measured. Other arguments as `Index`."""
        index = cls.__new__(cls)
        index._hold(embeddings, rows, engine, recall, model, embedder, source, part)
        return index

    def _hold(self, embeddings, rows, engine, recall, model, embedder, source, part) -> None:
        if len(rows) != embeddings.shape[0]:
            raise SiameseError(f"Expected one item, filename and labels per row ({embeddings.shape[0]} rows). "
                               f"Received: {len(rows)} rows")
        self.embeddings = embeddings
        self.rows = rows
        self.engine: Engine = engine
        self.recall = recall
        self.model = model or {}
        self.embedder = embedder or {}
        self.source = source or {}
        self.part = part

    @property
    def items(self) -> Column:
        """The item of each row (a read-only sequence over `rows`)."""
        return self.rows.items

    @property
    def filenames(self) -> Column:
        """The image file of each row, relative to the catalog's folder."""
        return self.rows.filenames

    @property
    def labels(self) -> Column:
        """The labels of each row's item, a tuple each."""
        return self.rows.labels

    @property
    def recall_at_10(self) -> float | None:
        """Recall@10 measured at build time with the default `ef`/`nprobe`; None for exact engines."""
        return None if self.recall is None else self.recall["recall_at_10"]

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

    def kneighbors(self, vectors: np.ndarray, k: int = 10, **knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows of each vector: `(distances, indices)`, each `(queries, k)`, nearest first.

        `knob`: the engine's query-time setting, e.g. `ef=64` (hnsw) or `nprobe=8` (faiss IVF), trading speed for
        recall (default: the index's, see `params`); None is the default. A query an approximate engine finds
        fewer than `k` rows for is answered by exact search.
        """
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise SiameseError(
                f"Expected query embeddings of shape (n, {self.dim}) like the index's. Received: {vectors.shape}. "
                "Fix: embed the queries with the model that built the index."
            )
        self._check_k(k, len(self), "image")
        engine = self.engine
        for name, value in knob.items():
            if value is not None:
                engine.check_knob(name, value)
        value = (knob.get(engine.knob.name) or engine.params.get(engine.knob.name)) if engine.knob else None
        distances, indices = engine.search(vectors, k, value)
        short = (indices < 0).any(axis=1)
        if short.any():
            distances[short], indices[short] = kneighbors(self.embeddings, vectors[short], k)
        return distances, indices

    def search(self, vectors: np.ndarray, k: int = 10, by_item: bool = False, label: str | None = None,
               **knob: int | None) -> list[list[Match]]:
        """The `k` nearest images of each vector as `Match`es; `by_item` keeps the best image of `k` items; `label`
        keeps only images with that label (fewer than `k` where fewer have it); `knob` as `kneighbors`."""
        if not by_item and label is None:
            return [self._matches(d, i) for d, i in zip(*self.kneighbors(vectors, k, **knob), strict=True)]
        if by_item:
            self._check_k(k, self.rows.item_count, "item")
        else:
            self._check_k(k, len(self), "image")
        results = []
        for vector in np.asarray(vectors, np.float32):
            wanted = min(len(self), 4 * k)
            while True:  # widen the search until k images (items) pass, or every row was looked at
                distances, indices = self.kneighbors(vector[None], wanted, **knob)
                kept: dict[str | int, Match] = {}
                for match in self._matches(distances[0], indices[0]):
                    if label is None or label in match.labels:
                        kept.setdefault(match.item if by_item else match.row, match)
                if len(kept) >= k or wanted == len(self):
                    break
                wanted = min(len(self), 2 * wanted)
            results.append(list(kept.values())[:k])
        return results

    @staticmethod
    def _check_k(k: int, most: int, of: str) -> None:
        if not 1 <= k <= most:
            raise SiameseError(f"Expected 1 <= `k` <= {most} (the index holds {plural(most, of)}). Received: {k}")

    def _matches(self, distances: np.ndarray, indices: np.ndarray) -> list[Match]:
        taken = self.rows.take(indices)
        return [
            Match(int(i), item, filename, labels, float(d), float(1 - d * d / 2))
            for d, i, (item, filename, labels) in zip(distances, indices, taken, strict=True)
        ]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to `directory` (created if needed; see `siamese.search.folder`) and return the folder.

        The folder is written whole beside `directory` and swapped in (`atomic.replace_folder`) under its lock
        (`claim_output`), so a crash or a second run leaves the previous index whole. A folder that holds anything
        but an index of this tool, and a shard part this index was merged from, are refused.
        """
        return folder.save(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Index:
        """Read an index saved by `save`, refusing anything malformed, inconsistent or modified."""
        return cls.from_built(**folder.read(directory))
