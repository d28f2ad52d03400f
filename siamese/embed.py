"""Embedding images with a model: a trained checkpoint, or a pretrained ImageNet backbone when there is none.

Every command that embeds (export, index, query, similarity, evaluate) gets its model from `Embedder.load`
and its pixels from `siamese.images.decode_image`, so they cannot disagree about preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from siamese.catalog import Catalog
from siamese.config import PRETRAINED_BACKBONE
from siamese.errors import SiameseError
from siamese.images import ImageDecodeError, ImageSource, decode_image
from siamese.models import build_embedding, load_embedding, model_fingerprint
from siamese.pipeline import Cache
from siamese.search import Engine, Index, Match, make_engine
from siamese.tfdata import image_dataset
from siamese.util import parallel_map, plural


@dataclass(frozen=True)
class ModelInfo:
    """Where an embedding network came from and what it computes; indexes and exports record it."""

    source: str
    fingerprint: str
    image_size: int
    embedding_dim: int

    def to_dict(self) -> dict:
        return asdict(self)


def describe(model: keras.Model, source: str) -> ModelInfo:
    """The `ModelInfo` of `model`, loaded from `source` (a path, or a pretrained backbone's description)."""
    return ModelInfo(source, model_fingerprint(model), int(model.input_shape[1]), int(model.output_shape[-1]))


@dataclass(frozen=True)
class Embedder:
    """An embedding network, what it computes (`info`), and how to load it again (`recipe`: the keyword arguments
    of `Embedder.load`), which an index stores so that queries are embedded by the model that built it."""

    model: keras.Model
    info: ModelInfo
    recipe: dict

    @classmethod
    def load(
        cls,
        keras_model: str | os.PathLike | None = None,
        backbone: str = PRETRAINED_BACKBONE,
        weights: str | None = "imagenet",
        image_size: int | None = None,
    ) -> Embedder:
        """The embedding network of `keras_model` (a checkpoint written by `train`), or without one a pretrained
        `backbone` (default inception_v3) with `weights` (default imagenet; none or a file) whose L2-normalised
        pooled features are the embedding. `image_size` applies to the backbone only (default: its own). Random
        weights (`weights` none) are drawn from seed 0, so the same arguments give the same model."""
        if keras_model is not None:
            model = load_embedding(keras_model)
            source = str(Path(keras_model).resolve())
            return cls(model, describe(model, source), {"keras_model": source})
        if weights in (None, "none"):
            keras.utils.set_random_seed(0)
        model = build_embedding(backbone, image_size, None, weights)
        weights = "none" if weights is None else weights
        recipe = {"backbone": backbone, "image_size": image_size,
                  "weights": weights if weights in ("imagenet", "none") else str(Path(weights).resolve())}
        return cls(model, describe(model, f"pretrained {backbone} (weights {weights})"), recipe)

    @classmethod
    def of_index(cls, index: Index, keras_model: str | os.PathLike | None = None) -> Embedder:
        """The model that built `index`: `keras_model` when given, else the one its recipe names; refused, with
        the fix, when it is not the model the index records (see `check`)."""
        if keras_model is None and not index.embedder:
            raise SiameseError("This index does not record its model. Fix: pass the model (`keras_model`).")
        embedder = cls.load(keras_model) if keras_model is not None else cls.load(**index.embedder)
        embedder.check(index)
        return embedder

    def check(self, index: Index) -> None:
        """Refuse to query `index` with this model unless it is the one that built it (dimension, fingerprint)."""
        want = index.model.get("fingerprint")
        if self.info.embedding_dim != index.dim or (want and self.info.fingerprint != want):
            raise SiameseError(
                f"The index was built by a different model ({index.model.get('source', 'unknown')}, "
                f"{index.dim}-d, fingerprint {str(want)[:12]}). Received: {self.info.source}, "
                f"{self.info.embedding_dim}-d, fingerprint {self.info.fingerprint[:12]}. Fix: query with "
                "the model that built the index, or rebuild the index with this one."
            )

    def embed(self, sources: Sequence[ImageSource], batch_size: int = 64) -> np.ndarray:
        """Embeddings `(len(sources), dim)` of image files or encoded bytes (see `embed_images`)."""
        return embed_images(self.model, sources, batch_size)

    def search(self, index: Index, images: Sequence[ImageSource], k: int = 10, by_item: bool = False,
               **knob: int | None) -> list[list[Match]]:
        """The `k` nearest images (or items, `by_item`) in `index` of each image file or encoded bytes; `knob`
        (ef=, nprobe=) as `Index.kneighbors`. Check the model first (`check`, or get it with `of_index`)."""
        return index.search(self.embed(images), k, by_item, **knob)

    def index(
        self, catalog: Catalog, engine: str | Engine = "balltree", *, batch_size: int = 64,
        labeled_data: str | os.PathLike | None = None, progress: bool = True, part: dict | None = None,
    ) -> Index:
        """Embed every image of `catalog` and build an `Index` with `engine` (an `Engine` with its settings, e.g.
        `Hnsw(m=8)`, or a registered name meaning its defaults; default balltree). The index records this model
        and its recipe (so queries load it again), the catalog it came from (`labeled_data`, its image folder and
        hash) and, for a shard of it (see `siamese.search.merge.shard_catalog`), the `part`. What `--export balltree`
        runs; save it with `.save(DIR)`. Engine settings that cannot hold the catalog are refused before any image
        is embedded."""
        make_engine(engine).check_fits(len(catalog.filenames), self.info.embedding_dim)
        embeddings = embed_catalog(self.model, catalog, batch_size, progress=progress)
        check_finite(embeddings, self.info.source, catalog.filenames)
        source = {"labeled_data": str(Path(labeled_data).resolve()) if labeled_data else None,
                  "image_dir": str(catalog.image_dir.resolve()), "sha256": catalog.digest()}
        return Index.from_catalog(catalog, embeddings, engine=engine, model=self.info.to_dict(),
                                  embedder=self.recipe, source=source, part=part)


def embed_catalog(
    model: keras.Model, catalog: Catalog, batch_size: int = 64, cache: Cache = "none", workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings `(images, dim)` float32 of every image of `catalog`, in `catalog.filenames` order.

    Images stream from the files in batches of `batch_size` (default 64) through `tf.data`, decoded by
    `workers` processes (default: every usable CPU), so a catalog never has to fit in memory.
    """
    dataset = image_dataset(catalog, int(model.input_shape[1]), batch_size, cache, workers)
    embeddings = model.predict(dataset, verbose=1 if progress else 0)
    return np.asarray(embeddings, np.float32).reshape(len(catalog.filenames), -1)


def check_finite(embeddings: np.ndarray, source: str, filenames: Sequence[str]) -> None:
    """Refuse embeddings with NaN or infinite values, naming the model `source` as the cause and the first image
    (`filenames`, one per row)."""
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        raise SiameseError(f"{source} gave NaN or infinite embeddings for {plural(bad.size, 'image')} of "
                           f"{len(filenames):,} (first: {filenames[bad[0]]}): the model is the cause, not the "
                           "images. Fix: use an earlier checkpoint, or train again with a lower learning rate.")


def shown(source: str) -> str:
    """A model's source for people (the CLI's lines, the evaluate table): a path under the working folder
    relative to it, anything else as it is."""
    path = Path(source)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else source


def embed_sources(
    model: keras.Model, sources: Sequence[ImageSource], batch_size: int = 64, *, skip_bad: bool = False,
    progress: bool = False,
) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
    """Embed image files or encoded bytes, decoded by `decode_image` on threads and embedded `batch_size`
    (default 64) at a time, so a large folder never sits in memory; with a progress bar if `progress`.

    Returns `(kept, skipped, embeddings)`: the indices of the sources embedded, `(index, reason)` of those that
    cannot be decoded, and float32 `(len(kept), dim)`. Without `skip_bad` (default) the first source that cannot
    be decoded raises `ImageDecodeError` naming it instead.
    """
    size = int(model.input_shape[1])

    def decode(source: ImageSource) -> np.ndarray | str:
        try:
            return decode_image(source, size)
        except ImageDecodeError as e:
            return str(e)

    kept, skipped, pending = [], [], []
    vectors = [np.empty((0, int(model.output_shape[-1])), np.float32)]

    def flush() -> None:
        if pending:
            vectors.append(np.asarray(model.predict_on_batch(np.stack(pending)), np.float32))
            pending.clear()

    for n, decoded in enumerate(parallel_map(decode, list(sources), progress=progress, desc="embedding images")):
        if isinstance(decoded, str):
            if not skip_bad:
                name = sources[n] if isinstance(sources[n], str | os.PathLike) else f"image {n} (bytes)"
                raise ImageDecodeError(f"{name}: {decoded}. Fix: pass a readable image file")
            skipped.append((n, decoded))
            continue
        kept.append(n)
        pending.append(decoded)
        if len(pending) == batch_size:
            flush()
    flush()
    return kept, skipped, np.concatenate(vectors)


def embed_images(model: keras.Model, sources: Sequence[ImageSource], batch_size: int = 64) -> np.ndarray:
    """Embeddings `(len(sources), dim)` float32 of image files or encoded bytes (see `embed_sources`); one that
    cannot be decoded raises `ImageDecodeError` naming it."""
    return embed_sources(model, sources, batch_size)[2]
