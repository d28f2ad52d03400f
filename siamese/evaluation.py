"""Evaluating an embedding network: leave-one-out retrieval among a catalog's items (`evaluate`), beside the network
it started from and raw pixels (`evaluate_models`), as the `evaluate` command prints it (`format_evaluations`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from siamese.catalog import Catalog
from siamese.checkpoint import sidecar
from siamese.config import PRETRAINED_BACKBONE
from siamese.embed import Embedder, ModelInfo, describe, embed_catalog, shown
from siamese.errors import SiameseError
from siamese.models import build_embedding, load_embedding
from siamese.pipeline import decoded_images
from siamese.retrieval import Evaluation, evaluate_embeddings, metric_title
from siamese.util import plural

RAW_PIXELS = "raw pixels"
"""The source name of the baseline with no learning: each image's pixels at the model's input size, flattened
and L2-normalised, so distances compare like a network's cosine-normalised embeddings."""


def untrained_like(keras_model: str | os.PathLike) -> tuple[keras.Model, ModelInfo]:
    """The network `keras_model` started from before training: rebuilt from the settings `train` wrote beside
    it (backbone, size, weights, seed), or, without them, the same architecture with fresh random weights."""
    settings_path = sidecar(keras_model, "config")
    if settings_path.is_file():
        settings = json.loads(settings_path.read_text())
        keras.utils.set_random_seed(settings["seed"])
        model = build_embedding(settings["backbone"], settings["image_size"], settings["embedding_dim"],
                                settings["weights"], settings["trainable_layers"])
        source = f"untrained {settings['backbone']} (weights {settings['weights']}, seed {settings['seed']})"
    else:
        keras.utils.set_random_seed(0)
        model = keras.models.clone_model(load_embedding(keras_model))
        source = "untrained copy of the architecture (random weights, seed 0)"
    return model, describe(model, source)


def pixel_embeddings(catalog: Catalog, image_size: int, progress: bool = True) -> np.ndarray:
    """The raw-pixel baseline `(images, size * size * 3)` float32 of every image of `catalog`: pixels as the
    network sees them (`decode_image` at `image_size`), flattened and L2-normalised (see `RAW_PIXELS`)."""
    pixels = decoded_images(catalog, image_size, progress=progress).reshape(len(catalog.filenames), -1)
    vectors = pixels.astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def evaluate(
    embedder: Embedder, catalog: Catalog, ks: Sequence[int] = (1, 5, 10), pairs: int = 4096, seed: int = 0,
    batch_size: int = 64, progress: bool = True,
) -> Evaluation:
    """How well `embedder` finds the right item among `catalog`'s (leave-one-out precision@1, R-precision,
    MAP@R, recall@`ks`) and its "same item?" threshold calibrated on `pairs` drawn with `seed`; evaluate on items
    training never saw to judge how it generalises, beside its baselines (`evaluate_models`)."""
    embeddings = embed_catalog(embedder.model, catalog, batch_size, progress=progress)
    return evaluate_embeddings(embeddings, catalog, ks, pairs, seed)


def evaluate_models(
    catalog: Catalog, keras_model: str | os.PathLike | None = None, backbone: str = PRETRAINED_BACKBONE,
    weights: str | None = "imagenet", image_size: int | None = None, *, baseline: bool = True,
    pixels: bool = True, ks: Sequence[int] = (1, 5, 10), pairs: int = 4096, seed: int = 0, batch_size: int = 64,
    progress: bool = True,
) -> list[tuple[ModelInfo, Evaluation]]:
    """Leave-one-out retrieval among `catalog`'s items for a model and its baselines: `(ModelInfo, Evaluation)`
    for the model (`Embedder.load`'s arguments), then with `baseline` (default) and a `keras_model` the
    network it started from (`untrained_like`), then with `pixels` (default) raw pixels at the model's size.

    What `evaluate` prints; evaluate on items the model never saw in training to judge how it generalises.
    """
    embedder = Embedder.load(keras_model, backbone, weights, image_size)
    models = [(embedder.model, embedder.info)]
    if keras_model is not None and baseline:
        try:
            models.append(untrained_like(keras_model))
        except SiameseError as e:
            warnings.warn(f"no untrained baseline: {e}", UserWarning, stacklevel=2)
    results = [(info, evaluate(Embedder(model, info, {}), catalog, ks, pairs, seed, batch_size, progress))
               for model, info in models]
    if pixels:
        size = models[0][1].image_size
        embeddings = pixel_embeddings(catalog, size, progress=progress)
        info = ModelInfo(RAW_PIXELS, "", size, embeddings.shape[1])
        results.append((info, evaluate_embeddings(embeddings, catalog, ks, pairs, seed)))
    return results


def format_evaluations(results: list[tuple[ModelInfo, Evaluation]], catalog: Catalog) -> str:
    """`evaluate_models`' results as the table `evaluate` prints, with the first model's threshold."""
    first = results[0][1]
    lines = [f"Retrieval among {plural(len(catalog), 'item')} ({first.metrics['queries']:,} query images, "
             "leave-one-out):"]
    names = [k for k in first.metrics if k != "queries"]
    sources = [shown(info.source) for info, _ in results]
    width = min(60, max(len(source) for source in sources))
    lines.append(f"  {'model':<{width}}" + "".join(f"{metric_title(n):>13}" for n in names))
    for source, (_, e) in zip(sources, results, strict=True):
        lines.append(f"  {source[-width:]:<{width}}" + "".join(f"{e.metrics[n]:>13.4f}" for n in names))
    lines.append(f"{str(first.threshold).capitalize()}, calibrated on this catalog")
    return "\n".join(lines)
