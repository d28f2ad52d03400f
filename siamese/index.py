"""A nearest-neighbour index of a catalog's embeddings, with the item, filename and labels of every row.

Backends: `balltree` (scikit-learn's `BallTree`, the seed's) and `brute` (exact, one BLAS matrix product per
block of queries; at 128 dimensions it is much faster than the tree). Both give the same neighbours.

On disk an index is a folder, never a pickle (loading a pickle runs code):

    index.json              settings, counts, the model's fingerprint, names and SHA-256 of the files below
    embeddings-<hash>.npy   float32 (rows, dim), L2-normalised
    rows-<hash>.json        {"items": [...], "filenames": [...], "labels": [[...], ...]}

`index.json` is replaced last and atomically, so a crash while saving leaves the previous index whole.
The tree is rebuilt on load. Loading checks every shape, type, value and hash before using anything.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.neighbors import BallTree

from siamese import __version__, atomic
from siamese.catalog import Catalog
from siamese.config import INDEX_BACKENDS
from siamese.errors import SiameseError, plural

BACKENDS = INDEX_BACKENDS
FORMAT = "siamese-index"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3


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


def _brute_kneighbors(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024):
    """Exact k nearest rows of `gallery` for each query: (distances, indices), nearest first."""
    half_norms = 0.5 * np.einsum("ij,ij->i", gallery, gallery)
    distances = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        # |q - g|^2 = |q|^2 - 2 (q.g - |g|^2 / 2): the nearest rows have the largest scores
        scores = q @ gallery.T - half_norms
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)  # by score, ties by row: deterministic
        top = np.take_along_axis(top, order, axis=1)
        squared = np.einsum("ij,ij->i", q, q)[:, None] - 2 * np.take_along_axis(top_scores, order, axis=1)
        distances[start : start + chunk] = np.sqrt(np.maximum(squared, 0))
        indices[start : start + chunk] = top
    return distances, indices


class Index:
    """Nearest-neighbour search over L2-normalised embeddings, one row per image, with its metadata.

    `backend` is balltree (default) or brute; `leaf_size` (default 40) is the BallTree's. `model` and
    `embedder` record which network made the embeddings (see `siamese.embed`); `source` which catalog they came
    from. Like scikit-learn's neighbors, `kneighbors` answers vectors; `query` answers images.
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
        model: dict | None = None,
        embedder: dict | None = None,
        source: dict | None = None,
    ):
        if backend not in BACKENDS:
            raise SiameseError(f"Expected --index to be one of {', '.join(BACKENDS)}. Received: {backend!r}")
        if leaf_size < 1:
            raise SiameseError(f"Expected --leaf-size >= 1. Received: {leaf_size}")
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise SiameseError(f"Expected embeddings of shape (rows >= 1, dim >= 1). Received: {embeddings.shape}")
        if not (len(items) == len(filenames) == len(labels) == embeddings.shape[0]):
            raise SiameseError(
                f"Expected one item, filename and labels per row ({embeddings.shape[0]} rows). "
                f"Received: {len(items)} items, {len(filenames)} filenames, {len(labels)} labels"
            )
        if not np.isfinite(embeddings).all():
            raise SiameseError("Expected finite embeddings. Received: NaN or infinite values")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if (norms == 0).any():
            raise SiameseError("Expected non-zero embeddings. Received: a row of zeros, which has no direction")
        # already-unit rows are kept bit for bit, so a saved and reloaded index answers exactly alike
        self.embeddings = embeddings / norms if np.abs(norms - 1).max() > 1e-6 else embeddings
        self.items = list(items)
        self.filenames = list(filenames)
        self.labels = [tuple(x) for x in labels]
        self.backend = backend
        self.leaf_size = leaf_size
        self.model = model or {}
        self.embedder = embedder or {}
        self.source = source or {}
        self._tree = BallTree(self.embeddings, leaf_size=leaf_size) if backend == "balltree" else None
        self._model_cache = None

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

    def kneighbors(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows of each vector: `(distances, indices)`, each `(queries, k)`, nearest first."""
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
        if self._tree is not None:
            distances, indices = self._tree.query(vectors, k=k)
            return distances.astype(np.float32), indices.astype(np.int64)
        return _brute_kneighbors(self.embeddings, vectors, k)

    def search(self, vectors: np.ndarray, k: int = 10, by_item: bool = False) -> list[list[Match]]:
        """The `k` nearest images of each vector as `Match`es; `by_item` keeps the best image of `k` items."""
        if not by_item:
            return [self._matches(d, i) for d, i in zip(*self.kneighbors(vectors, k), strict=True)]
        n_items = len(set(self.items))
        if not 1 <= k <= n_items:
            raise SiameseError(f"Expected 1 <= k <= {n_items} (the index holds {plural(n_items, 'item')}). "
                               f"Received: {k}")
        results = []
        for vector in np.asarray(vectors, np.float32):
            wanted = min(len(self), 4 * k)
            while True:
                distances, indices = self.kneighbors(vector[None], wanted)
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

    def query(self, images: Sequence, k: int = 10, by_item: bool = False) -> list[list[Match]]:
        """The `k` nearest images (or items, `by_item`) of each image file or encoded bytes in `images`."""
        from siamese.embed import embed_images

        return self.search(embed_images(self.load_model(), images), k, by_item)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to `directory` (created if needed); see the module docstring. Returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = {"items": self.items, "filenames": self.filenames, "labels": [list(x) for x in self.labels]}
        rows_bytes = json.dumps(rows, ensure_ascii=False).encode()
        rows_name = f"rows-{hashlib.sha256(rows_bytes).hexdigest()[:16]}.json"
        atomic.write_bytes(directory / rows_name, rows_bytes)
        with atomic.atomic_path(directory / "embeddings.npy", suffix=".npy") as tmp:
            np.save(tmp, self.embeddings, allow_pickle=False)
            embeddings_hash = _sha256(tmp)
            embeddings_name = f"embeddings-{embeddings_hash[:16]}.npy"
        os.replace(directory / "embeddings.npy", directory / embeddings_name)
        settings = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backend": self.backend,
            "leaf_size": self.leaf_size,
            "rows": len(self),
            "dim": self.dim,
            "files": {"embeddings": embeddings_name, "embeddings_sha256": embeddings_hash,
                      "rows": rows_name, "rows_sha256": hashlib.sha256(rows_bytes).hexdigest()},
            "model": self.model,
            "embedder": self.embedder,
            "source": self.source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "siamese": __version__,
        }
        atomic.write_json(directory / "index.json", settings)
        for stale in [*directory.glob("embeddings-*.npy"), *directory.glob("rows-*.json")]:
            if stale.name not in (embeddings_name, rows_name):
                stale.unlink()
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
            files = settings["files"]
            embeddings_path = directory / Path(files["embeddings"]).name
            rows_path = directory / Path(files["rows"]).name
            rows_count, dim = int(settings["rows"]), int(settings["dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise refuse(f"index.json is malformed ({type(e).__name__}: {e})") from None
        if settings.get("format") != FORMAT or settings.get("version") != FORMAT_VERSION:
            raise refuse(f"expected format {FORMAT} version {FORMAT_VERSION}, found "
                         f"{settings.get('format')!r} version {settings.get('version')!r}")
        try:
            embeddings = np.load(embeddings_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            # allow_pickle=False: a pickle (or an object array) is refused here, never unpickled
            raise refuse(f"{embeddings_path.name} is not a plain .npy array ({type(e).__name__}: {e})") from None
        try:
            rows = json.loads(rows_path.read_bytes())
            items, filenames, labels = rows["items"], rows["filenames"], rows["labels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise refuse(f"{rows_path.name} is unreadable ({type(e).__name__}: {e})") from None
        if embeddings.dtype != np.float32 or embeddings.shape != (rows_count, dim):
            raise refuse(f"expected float32 embeddings of shape {(rows_count, dim)}; {embeddings_path.name} holds "
                         f"{embeddings.dtype} {embeddings.shape}")
        if not np.isfinite(embeddings).all():
            raise refuse(f"{embeddings_path.name} holds NaN or infinite values")
        if np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() > NORM_TOLERANCE:
            raise refuse(f"{embeddings_path.name} holds rows that are not L2-normalised")
        if not all(isinstance(x, list) and len(x) == rows_count for x in (items, filenames, labels)):
            raise refuse(f"{rows_path.name} does not have one item, filename and labels list per row ({rows_count})")
        if _sha256(embeddings_path) != files.get("embeddings_sha256") or (
            hashlib.sha256(rows_path.read_bytes()).hexdigest() != files.get("rows_sha256")
        ):
            raise refuse("its files were modified after the index was written (SHA-256 mismatch)")
        return cls(embeddings, items, filenames, labels, backend=settings["backend"],
                   leaf_size=int(settings["leaf_size"]), model=settings.get("model"),
                   embedder=settings.get("embedder"), source=settings.get("source"))
