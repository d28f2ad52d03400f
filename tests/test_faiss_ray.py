"""A faiss index of embedding stores built on Ray (`index_stores(..., runner="ray")`, `index --runner ray`): the
same index as the local build, byte for byte, for PQ codes and IVF-Flat lists; HNSW built locally; the refusals.

Stores of structured vectors are written part by part (`StoreWriter`); one module Ray of 2 CPUs (real, not a mock)
builds them. Slow: a Ray start, and the index trained twice for each comparison."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import siamese.search.faiss
import siamese.search.faiss_ray
from siamese.embedding_store import StoreWriter, index_stores
from siamese.errors import SiameseError
from siamese.search import Faiss
from siamese.search.faiss_ray import Part, add_part, digest, read_part, store_parts
from siamese.search.kernel import kneighbors, squared_norms
from tests.test_faiss_budget import recall, structured


def write_store(path, vectors: np.ndarray, part_rows: int, first: int = 0) -> str:
    """A store of `vectors` in parts of `part_rows` rows, rows named from `first` on; of one (pretend) model."""
    n, dim = vectors.shape
    writer = StoreWriter(path, dim, part_rows)
    names = [f"{i}.png" for i in range(first, first + n)]
    writer.write([f"item{i}" for i in range(first, first + n)], names, [("x",)] * n, ["0" * 64] * n, vectors)
    writer.commit({"model": {"source": "pretend", "fingerprint": "f" * 64, "image_size": 8, "embedding_dim": dim},
                   "embedder": {}, "source": {"sha256": str(first)}})
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[str]:
    """Two stores, 29,480 rows of 128 dimensions: 20,480 unit rows in parts of 8,192 (a part is whole blocks of
    the local add's 4,096 rows), then 9,000 rows of length 3 in parts of 5,000 (not whole blocks; `Index`
    normalises every row)."""
    folder = tmp_path_factory.mktemp("stores")
    vectors = structured(29_480)
    return [write_store(folder / "a", vectors[:20_480], 8192),
            write_store(folder / "b", 3 * vectors[20_480:], 5000, first=20_480)]


@pytest.fixture(scope="module")
def ray_session():
    """The module's one Ray: a real local Ray of 2 CPUs, which the builds join. FAISS runs one thread in the driver
    too, as in the tasks: two OpenMP threads beside a busy machine's other work spend most of their time waiting
    for each other (a local build of 20,480 rows took 4 to 44 s)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(siamese.search.faiss, "usable_cpus", lambda: 1)
        yield ray
    ray.shutdown()


def built_both_ways(stores: list[str], engine: Faiss, monkeypatch) -> tuple:
    """(local index, ray index, the rows the driver added itself in the ray build: the held-out ones only)."""
    local = index_stores(stores, engine)
    added: list[int] = []
    add = Faiss.add

    def counted(self, embeddings, rows):
        added.append(len(rows))
        add(self, embeddings, rows)

    monkeypatch.setattr(Faiss, "add", counted)
    on_ray = index_stores(stores, engine, runner="ray")
    monkeypatch.setattr(Faiss, "add", add)
    return local, on_ray, added


def assert_same_index(local, on_ray) -> None:
    assert np.array_equal(faiss.serialize_index(on_ray.engine.index), faiss.serialize_index(local.engine.index))
    queries = structured(200, seed=1)
    for knob in (None, 1, 7):
        for want, got in zip(local.kneighbors(queries, 10, nprobe=knob), on_ray.kneighbors(queries, 10, nprobe=knob),
                             strict=True):
            np.testing.assert_array_equal(got, want)
    assert on_ray.engine.params.pop("runner") == "ray"
    assert (on_ray.engine.params, on_ray.recall) == (local.engine.params, local.recall)
    truth = kneighbors(local.embeddings, queries, 10)[1]  # exact search of numpy, not of faiss
    assert recall(on_ray.kneighbors(queries, 10)[1], truth) >= 0.97


@pytest.mark.slow  # a Ray start, two PQ builds: about 20 s
def test_pq_codes_built_on_ray_are_the_local_build_byte_for_byte(stores, ray_session, monkeypatch):
    monkeypatch.setattr(siamese.search.faiss, "OPQ_NITER", 10)  # as test_faiss_budget's pq_index
    monkeypatch.setattr(siamese.search.faiss, "TWO_LEVEL_LISTS", 256)  # its 512 lists by two-level k-means
    local, on_ray, added = built_both_ways(stores[:1], Faiss(max_memory="1M", rerank=50), monkeypatch)
    assert local.engine.params["key"] == "OPQ16_128,IVF512,PQ16x8"
    assert local.engine.params["lists_trained"] == "two-level k-means (23 coarse)"
    assert "runner" not in local.engine.params
    assert added == [on_ray.recall["queries"]] == [1000]  # the driver added only the rows tuning held out
    assert on_ray.engine.index.ntotal == len(on_ray) == 20_480
    assert_same_index(local, on_ray)


@pytest.mark.slow  # two IVF-Flat builds: about 10 s
def test_ivf_flat_lists_built_on_ray_are_the_local_build_across_stores_and_uneven_parts(stores, ray_session,
                                                                                         monkeypatch):
    monkeypatch.setattr(siamese.search.faiss, "FAISS_IVF_MIN_ROWS", 1000)  # the budget's rule at a test's size
    local, on_ray, added = built_both_ways(stores, Faiss(max_memory="17M"), monkeypatch)
    assert local.engine.params["key"] == "IVF512,Flat"
    assert added == [1000]
    np.testing.assert_allclose(np.linalg.norm(on_ray.embeddings[-3:], axis=1), 1, atol=1e-6)  # normalised
    assert_same_index(local, on_ray)


@pytest.mark.slow  # an HNSW build
def test_an_hnsw_index_is_built_in_this_process_with_a_warning(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(siamese.search.faiss, "FAISS_IVF_MIN_ROWS", 1000)
    store = write_store(tmp_path / "s", structured(3000, dim=32), 1000)
    with pytest.warns(UserWarning, match=r"^Building the HNSW index in this process, not on Ray: an HNSW graph does "
                                         r"not merge\. A smaller `max_memory` picks an IVF index, which Ray builds\.$"):
        index = index_stores([store], Faiss(max_memory="2M"), runner="ray")
    assert index.engine.params["key"] == "IDMap,HNSW32,Flat" and "runner" not in index.engine.params
    assert index.recall_at_10 >= 0.99
    # a task that finds other rows in its part than this process indexed refuses them, and the build with it
    monkeypatch.setattr(siamese.search.faiss_ray, "part_digest", lambda embeddings, part: "0" * 64)
    with pytest.raises(SiameseError, match=r"^Expected part part-\w+\.parquet of .*s to hold the rows 0 to 999 "
                                           r"that the driver indexes\. Received: other embeddings\. Fix: index the "
                                           r"stores again once nothing writes them\.$"):
        index_stores([store], Faiss(nlist=16), runner="ray")


def test_another_runner_or_engine_is_refused_before_a_part_is_read(stores, monkeypatch):
    def not_read(*args, **kwargs):
        raise AssertionError("a part was read")

    monkeypatch.setattr(siamese.embedding_store.EmbeddingStore, "batches", not_read)
    with pytest.raises(SiameseError, match=r"^Expected `engine='faiss'` with `runner='ray'`\. Received: "
                                           r"`engine='hnsw'`\. Fix: pass `engine='faiss'`"):
        index_stores(stores, "hnsw", runner="ray")
    with pytest.raises(SiameseError, match=r"^Expected `runner` to be one of local, ray\. Received: 'spark'\. Fix: "):
        index_stores(stores, Faiss(), runner="spark")


@pytest.mark.slow  # the index command imports TensorFlow
def test_the_runner_flags_of_index(stores, run_cli, tmp_path):
    code, _, err = run_cli("index", "--embeddings", *stores, "--engine", "hnsw", "--runner", "ray", "--output",
                           tmp_path / "i")
    assert code == 2
    assert "Expected --engine faiss with --runner ray. Received: --engine hnsw. Fix: pass --engine faiss" in err
    code, _, err = run_cli("index", "--labeled-data", "x.json", "--image-dir", "x", "--runner", "ray", "--output",
                           tmp_path / "i")
    assert code == 2
    assert ("Expected --embeddings with --runner ray. Received: a catalog. Fix: embed the catalog with `embed "
            "--runner ray` into a store, then index it with --embeddings and --runner ray.") in err
    assert not (tmp_path / "i").exists()


def test_a_part_changed_since_the_manifest_is_refused(stores, tmp_path):
    part = store_parts([siamese.embedding_store.EmbeddingStore.open(stores[1])])[1]
    assert (part.start, part.rows, part.first) == (5000, 4000, 5000)  # numbered from the first store given
    np.testing.assert_array_equal(read_part(part, 128), 3 * structured(29_480)[25_480:])
    changed = Part(part.store, part.name, "0" * 64, part.bytes, part.start, part.rows, part.first,
                   part.version)
    with pytest.raises(SiameseError, match=rf"part {part.name} was modified after the store was written \(SHA-256 "
                                           r"mismatch\)\. Fix: embed the catalog again"):
        read_part(changed, 128)


def test_a_task_adds_its_part_as_stored_or_as_index_normalises_it(stores):
    part = store_parts([siamese.embedding_store.EmbeddingStore.open(s) for s in stores])[3]
    assert (part.start, part.rows, part.first) == (20_480, 5000, 0)  # the first part of the second store
    stored = read_part(part, 128)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(128), 128, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(structured(1000))
    trained = faiss.serialize_index(index)
    held = np.array([20_480, 22_000, 24_999])
    unit = stored / np.sqrt(squared_norms(stored)).astype(np.float32)[:, None]  # as Index normalises
    added = faiss.deserialize_index(add_part(trained, part, 128, held, digest(unit)))
    assert added.ntotal == 4997
    kept = np.setdiff1d(np.arange(20_480, 25_480), held)
    found = added.search(unit[kept[:50] - 20_480], 1)[1][:, 0]
    np.testing.assert_array_equal(found, kept[:50])  # by their global rows
    with pytest.raises(SiameseError, match=r"Received: other embeddings"):
        add_part(trained, part, 128, held, digest(stored[::-1]))
