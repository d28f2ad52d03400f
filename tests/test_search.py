"""siamese.search: an engine defined and registered here is one `Index`, its folder and the `index` command use
with no other file changed; the kernel's one tie rule; the package imports no Keras or TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from siamese import cli
from siamese.index import Index
from siamese.models import build_embedding
from siamese.search import ENGINES, Engine, Setting, register_engine
from siamese.search.kernel import kneighbors
from tests.conftest import solid_catalog


class Tiny(Engine):
    """Exact search by a full numpy argsort of every distance, `chunk` queries at a time (default 64); rebuilt on
    load (`Engine.read`) from its settings, which `params` records."""

    summary = "numpy argsort, exact (a test's)"
    settings = (Setting("chunk", int, 64, "tiny: queries ranked at a time", flag="--tiny-chunk", metavar="N"),)

    def __init__(self, chunk: int = 64):
        super().__init__()
        self.chunk = chunk
        self.params = {"chunk": chunk}

    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        self.embeddings = np.asarray(embeddings, np.float64)

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = [], []
        for start in range(0, len(queries), self.chunk):
            q = queries[start : start + self.chunk].astype(np.float64)
            d = np.linalg.norm(q[:, None] - self.embeddings[None], axis=2)
            order = np.argsort(d, axis=1, kind="stable")[:, :k]
            distances.append(np.take_along_axis(d, order, axis=1).astype(np.float32))
            indices.append(order)
        return np.concatenate(distances), np.concatenate(indices)

    @property
    def description(self) -> str:
        return f"tiny (chunk {self.chunk})"


@pytest.fixture
def tiny():
    register_engine("tiny", "argsort")(Tiny)
    yield Tiny
    del ENGINES["tiny"]


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_registered_engine_builds_searches_saves_and_loads(tmp_path, tiny):
    vectors, queries = unit_vectors(300, 8, 0), unit_vectors(20, 8, 1)
    meta = ([f"item{i % 30}" for i in range(300)], [f"{i}.png" for i in range(300)], [("x",)] * 300)
    index = Index(vectors, *meta, engine=tiny(chunk=7))
    exact = Index(vectors, *meta, engine="brute")
    for got, want in zip(index.kneighbors(queries, 5), exact.kneighbors(queries, 5), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    other = Index(vectors, *meta, engine="argsort")
    assert (index.engine.name, index.engine.description, other.engine.description) == (
        "tiny", "tiny (chunk 7)", "tiny (chunk 64)")
    assert repr(index.engine).endswith("engine: tiny (chunk 7)>")
    index.save(tmp_path / "idx")
    settings = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (settings["engine"], settings["recall"]) == ({"name": "tiny", "params": {"chunk": 7}}, None)
    loaded = Index.load(tmp_path / "idx")
    assert loaded.engine.description == "tiny (chunk 7)"
    np.testing.assert_array_equal(loaded.kneighbors(queries, 5)[1], index.kneighbors(queries, 5)[1])


def test_the_index_command_offers_a_registered_engine_and_its_settings(tmp_path, monkeypatch, capsys, run_cli, tiny):
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    build_embedding("small_cnn", 16, 8).save(tmp_path / "model.keras")
    solid_catalog(tmp_path / "data", {"a": (3, []), "b": (2, ["red"]), "c": (2, [])})
    with pytest.raises(SystemExit):
        cli.main(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiny (numpy argsort, exact (a test's))" in text and "--tiny-chunk N" in text
    code, out, err = run_cli("index", "--keras-model", "model.keras", "--labeled-data", "data/labeled.json",
                             "--image-dir", "data", "--no-progress", "--engine", "tiny", "--tiny-chunk", "3",
                             "--output", "idx")
    assert code == 0, err
    assert "(8-d, tiny (chunk 3)) embedded by" in out
    assert Index.load(tmp_path / "idx").engine.params == {"chunk": 3}
    code, out, err = run_cli("query", "--index", "idx", "data/images/c/0.png", "--k", "1")
    assert code == 0 and "images/c/0.png" in out, err


def test_the_kernel_ranks_nearest_first_ties_by_row_and_can_leave_each_query_out():
    gallery = np.repeat(unit_vectors(50, 4, 0), 2, axis=0)  # every row twice: 100 rows of 50 distances
    distances, indices = kneighbors(gallery, gallery[::2], 100)  # a full ranking
    assert (indices[:, :2] == np.arange(0, 100, 2)[:, None] + [0, 1]).all()  # itself, then its twin
    assert (np.diff(distances, axis=1) >= 0).all()
    pairs = indices.reshape(50, 50, 2)
    assert (pairs[..., 0] + 1 == pairs[..., 1]).all()  # equal distances: the lower row first
    left_out = kneighbors(gallery, gallery, 99, exclude=np.arange(100))[1]
    assert not (left_out == np.arange(100)[:, None]).any()
    assert (left_out[:, 0] == np.arange(100) ^ 1).all()  # its twin is nearest
    twins = np.repeat(unit_vectors(600, 8, 2), 2, axis=0)  # wide enough for top_k's groups of 64
    np.testing.assert_array_equal(kneighbors(twins, twins[1::2], 1)[1][:, 0], np.arange(0, 1200, 2))  # not itself
    products, rows = kneighbors(gallery, gallery[:3], 3, np.zeros(100, np.float32), return_scores=True)
    np.testing.assert_array_equal(products, np.take_along_axis(gallery[:3] @ gallery.T, rows, axis=1))


def test_siamese_search_and_siamese_index_import_no_keras_or_tensorflow():
    code = ("import siamese.search, siamese.index, sys; "
            "assert not any(m.split('.')[0] in ('keras', 'tensorflow') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
