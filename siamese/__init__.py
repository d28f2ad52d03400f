"""siamese: train siamese CNNs for image similarity, export them, index a catalog and query it.

The public API, imported on first use (so `import siamese.search` or `siamese.catalog` loads no TensorFlow)::

    import siamese

    catalog = siamese.load_catalog("data/digits/train.json", "data/digits")
    result = siamese.train(siamese.TrainConfig("data/digits/train.json", "data/digits", epochs=2))
    embedder = siamese.Embedder.load(result.checkpoint)
"""

from __future__ import annotations

import importlib

from siamese.errors import SiameseError

__version__ = "0.1.0"

_API = {
    "load_catalog": "siamese.catalog",
    "validate_catalog": "siamese.catalog",
    "split_by_item": "siamese.catalog",
    "check_images": "siamese.images",
    "PairSampler": "siamese.pairs",
    "PKSampler": "siamese.pairs",
    "TrainConfig": "siamese.config",
    "build_embedding": "siamese.models",
    "train": "siamese.training",
    "Embedder": "siamese.embed",
    "Index": "siamese.index",
    "EmbeddingStore": "siamese.embedding_store",
    "embed_to_store": "siamese.embedding_job",
    "index_stores": "siamese.embedding_store",
    "evaluate": "siamese.evaluation",
    "evaluate_models": "siamese.evaluation",
    "format_evaluations": "siamese.evaluation",
    "export_savedmodel": "siamese.export",
    "folder_similarity": "siamese.similarity",
    "make_dataset": "siamese.datasets",
}
__all__ = ["SiameseError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'siamese' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
