"""The index: exact answers (checked against numpy), a safe on-disk format, refusal of anything tampered."""

from __future__ import annotations

import json
import os
import pickle

import keras
import numpy as np
import pytest

from siamese import atomic
from siamese.catalog import load_catalog
from siamese.embed import describe, embed_catalog, embed_images
from siamese.errors import SiameseError
from siamese.index import Index
from siamese.models import build_embedding
from tests.conftest import solid_catalog


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_knn(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent brute force in float64: every distance, fully sorted."""
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64), axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def random_index(n=500, dim=16, backend="balltree", items=50, seed=0) -> Index:
    ids = [f"item{i % items}" for i in range(n)]
    return Index(unit_vectors(n, dim, seed), ids, [f"{i}.png" for i in range(n)], [["x"]] * n, backend=backend)


@pytest.mark.parametrize("backend", ["balltree", "brute"])
def test_neighbours_equal_numpy_brute_force(backend):
    index = random_index(backend=backend)
    queries = unit_vectors(40, 16, seed=1)
    distances, indices = index.kneighbors(queries, k=7)
    want_d, want_i = numpy_knn(index.embeddings, queries, 7)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, atol=1e-5)
    matches = index.search(queries[:1], k=7)[0]
    assert [m.row for m in matches] == list(want_i[0])
    np.testing.assert_allclose([m.similarity for m in matches], queries[0] @ index.embeddings[want_i[0]].T, atol=1e-5)


def test_k_equal_to_the_index_size_returns_every_row_and_more_is_refused():
    index = random_index(n=30, backend="brute")
    _, indices = index.kneighbors(unit_vectors(2, 16, 1), k=30)
    assert sorted(indices[0]) == list(range(30))
    with pytest.raises(SiameseError, match=r"Expected 1 <= k <= 30 \(the index holds 30 images\)\. Received: 31"):
        index.kneighbors(unit_vectors(2, 16, 1), k=31)
    with pytest.raises(SiameseError, match=r"Expected query embeddings of shape \(n, 16\).*Received: \(2, 8\)"):
        index.kneighbors(unit_vectors(2, 8, 1), k=3)


@pytest.mark.parametrize("backend", ["balltree", "brute"])
def test_by_item_keeps_the_best_image_of_each_item(backend):
    index = random_index(n=400, items=40, backend=backend)
    query = unit_vectors(1, 16, seed=5)
    found = index.search(query, k=12, by_item=True)[0]
    d = np.linalg.norm(index.embeddings - query, axis=1)
    best = {}
    for row in np.argsort(d, kind="stable"):
        best.setdefault(index.items[row], row)
    assert [m.item for m in found] == list(best)[:12]
    assert [m.row for m in found] == [best[i] for i in list(best)[:12]]
    with pytest.raises(SiameseError, match=r"Expected 1 <= k <= 40 \(the index holds 40 items\)"):
        index.search(query, k=41, by_item=True)


def test_rows_must_be_finite_non_zero_and_match_their_metadata():
    with pytest.raises(SiameseError, match="Expected finite embeddings"):
        Index(np.full((2, 3), np.nan, np.float32), ["a", "b"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match="Expected non-zero embeddings"):
        Index(np.zeros((2, 3), np.float32), ["a", "b"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match=r"one item, filename and labels per row \(2 rows\)\. Received: 1 items"):
        Index(unit_vectors(2, 3, 0), ["a"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match="Expected --index to be one of balltree, brute. Received: 'kd'"):
        Index(unit_vectors(2, 3, 0), ["a", "b"], ["1", "2"], [[], []], backend="kd")


def test_save_and_load_round_trip_without_pickle(tmp_path):
    index = random_index(backend="balltree")
    random_index(seed=1).save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # replaces the first, leaving one set of files
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(names) == 3 and "index.json" in names, names
    loaded = Index.load(tmp_path / "idx")
    assert (loaded.items, loaded.filenames, loaded.labels) == (index.items, index.filenames, index.labels)
    assert loaded.backend == "balltree" and loaded.dim == 16 and len(loaded) == 500
    queries = unit_vectors(5, 16, 3)
    np.testing.assert_array_equal(loaded.kneighbors(queries, 4)[1], index.kneighbors(queries, 4)[1])
    settings = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert settings["files"]["embeddings"].endswith(".npy") and settings["rows"] == 500


def tamper(directory, name, change):
    settings = json.loads((directory / "index.json").read_text())
    path = directory / settings["files"][name]
    change(path)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("rows", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "items": ["a"] * 499})),
         r"does not have one item, filename and labels list per row \(500\)"),
        ("embeddings", lambda p: np.save(p, np.full((500, 16), np.nan, np.float32)), "NaN or infinite"),
        ("embeddings", lambda p: np.save(p, np.ones((499, 16), np.float32) / 4), r"shape \(500, 16\).*\(499, 16\)"),
        ("embeddings", lambda p: np.save(p, np.ones((500, 16), np.float64) / 4), "float32"),
        ("embeddings", lambda p: np.save(p, np.ones((500, 16), np.float32)), "not L2-normalised"),
        ("embeddings", lambda p: np.save(p, np.load(p)[::-1].copy()), "modified after the index was written"),
        ("embeddings", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
         "not a plain .npy array"),
    ],
)
def test_a_tampered_index_is_refused(tmp_path, name, change, message):
    random_index().save(tmp_path)
    tamper(tmp_path, name, change)
    with pytest.raises(SiameseError, match=message):
        Index.load(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/siamese-pickle-ran", "w"))


def test_a_pickle_in_place_of_the_embeddings_is_never_unpickled(tmp_path):
    random_index().save(tmp_path)
    marker = "/tmp/siamese-pickle-ran"
    tamper(tmp_path, "embeddings", lambda p: p.write_bytes(pickle.dumps(_Exploit())))
    with pytest.raises(SiameseError, match="not a plain .npy array.*Fix: rebuild the index"):
        Index.load(tmp_path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "is not an index: no index.json"),
        ("{not json", "index.json is malformed"),
        (json.dumps({"format": "other", "version": 1, "files": {"embeddings": "e", "rows": "r"}, "rows": 1, "dim": 1}),
         "expected format siamese-index version 1, found 'other'"),
    ],
)
def test_a_folder_that_is_not_an_index_is_refused(tmp_path, write, message):
    if write is not None:
        (tmp_path / "index.json").write_text(write)
    with pytest.raises(SiameseError, match=message):
        Index.load(tmp_path)


def test_a_crash_while_saving_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    old = random_index(seed=0)
    old.save(tmp_path)

    def crash(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        random_index(seed=1).save(tmp_path)
    monkeypatch.undo()
    np.testing.assert_array_equal(Index.load(tmp_path).embeddings, old.embeddings)


@pytest.fixture
def small_model():
    keras.utils.set_random_seed(0)
    return build_embedding("small_cnn", 16, 8)


def test_query_images_through_the_model_that_built_the_index(tmp_path, small_model):
    catalog = load_catalog(solid_catalog(tmp_path, {"a": (3, []), "b": (2, ["x"]), "c": (2, [])}), tmp_path)
    embeddings = embed_catalog(small_model, catalog, batch_size=3, progress=False, workers=1)
    np.testing.assert_allclose(embeddings, embed_images(small_model, list(catalog.paths)), atol=1e-6)
    index = Index.from_catalog(catalog, embeddings, backend="brute", model=describe(small_model, "test").to_dict())
    index.check_model(small_model, describe(small_model, "test"))
    found = index.query([catalog.paths[3], catalog.paths[3].read_bytes()], k=2)
    for matches in found:
        assert (matches[0].item, matches[0].filename, matches[0].labels) == ("b", "images/b/0.png", ("x",))
        assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_different_model_is_refused(tmp_path, small_model):
    index = Index(unit_vectors(4, 8, 0), list("abcd"), list("1234"), [[]] * 4,
                  model=describe(small_model, "trained.keras").to_dict())
    keras.utils.set_random_seed(1)
    other = build_embedding("small_cnn", 16, 8)
    with pytest.raises(SiameseError, match=r"built by a different model \(trained.keras, 8-d.*Received: other.keras"):
        index.check_model(other, describe(other, "other.keras"))
    wider = build_embedding("small_cnn", 16, 4)
    with pytest.raises(SiameseError, match="different model.*Received: wide, 4-d"):
        index.check_model(wider, describe(wider, "wide"))
