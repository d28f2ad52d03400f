"""The Embedder: an embedding network, what it computes, and the recipe that loads it again for queries."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from siamese.catalog import load_catalog
from siamese.embed import Embedder, embed_catalog, embed_images
from siamese.errors import SiameseError
from siamese.index import Index
from siamese.models import build_embedding
from tests.conftest import solid_catalog


@pytest.fixture
def checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    path = tmp_path / "m.keras"
    build_embedding("small_cnn", 16, 8).save(path)
    return path


def test_the_recipe_loads_the_same_model_again(checkpoint, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    embedder = Embedder.load("m.keras")
    assert embedder.recipe == {"keras_model": str(checkpoint)}  # absolute: it still loads from elsewhere
    again = Embedder.load(**embedder.recipe)
    assert again.info == embedder.info and embedder.info.embedding_dim == 8 and embedder.info.image_size == 16
    backbone = Embedder.load(backbone="mobilenet_v2", weights="none", image_size=32)
    assert backbone.recipe == {"backbone": "mobilenet_v2", "weights": "none", "image_size": 32}
    assert Embedder.load(**backbone.recipe).info.fingerprint == backbone.info.fingerprint  # seeded random weights


def test_an_index_is_queried_only_through_the_model_that_built_it(checkpoint, tmp_path):
    catalog = load_catalog(solid_catalog(tmp_path, {"a": (3, []), "b": (2, [])}), tmp_path)
    embedder = Embedder.load(checkpoint)
    embeddings = embed_catalog(embedder.model, catalog, batch_size=2, progress=False, workers=1)
    index = Index.from_catalog(catalog, embeddings, model=embedder.info.to_dict(), embedder=embedder.recipe)
    found = Embedder.of_index(index)
    assert found.info == embedder.info
    np.testing.assert_allclose(found.embed(list(catalog.paths)), embed_images(embedder.model, list(catalog.paths)))
    keras.utils.set_random_seed(1)
    other = tmp_path / "other.keras"
    build_embedding("small_cnn", 16, 8).save(other)
    with pytest.raises(SiameseError, match=r"The index was built by a different model .*8-d, fingerprint \w{12}\)\. "
                                           r"Received: .*other\.keras, 8-d.*Fix: query with the model"):
        Embedder.of_index(index, other)
    with pytest.raises(SiameseError, match=r"does not record its model\. Fix: pass the model"):
        Embedder.of_index(Index.from_catalog(catalog, embeddings))
