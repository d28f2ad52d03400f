"""The index: exact answers (checked against numpy), approximate ones with their measured recall, a safe on-disk
format, refusal of anything tampered."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pytest

import siamese.search.faiss
from siamese import atomic
from siamese.catalog import load_catalog
from siamese.embed import Embedder, describe, embed_catalog, embed_images
from siamese.errors import SiameseError
from siamese.index import Index
from siamese.models import build_embedding
from siamese.search import BallTree, Brute, Engine, Faiss, Hnsw, Knob
from siamese.search.kernel import kneighbors
from siamese.search.rows import Rows
from tests.conftest import solid_catalog


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_knn(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent brute force in float64: every distance, fully sorted."""
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64), axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def random_index(n=500, dim=16, engine: str | Engine = "balltree", items=50, seed=0) -> Index:
    ids = [f"item{i % items}" for i in range(n)]
    return Index(unit_vectors(n, dim, seed), ids, [f"{i}.png" for i in range(n)], [["x"]] * n, engine=engine)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


# every engine: exact ones, FAISS's exact flat index (below 100,000 rows) and IVF, hnswlib's graph
ENGINES = {"balltree": BallTree, "brute": Brute, "faiss-flat": Faiss, "faiss-ivf": lambda **s: Faiss(nlist=16, **s),
           "hnsw": Hnsw}
EXACT = ("balltree", "brute", "faiss-flat")


def engine(name: str, **settings) -> Engine:
    return ENGINES[name](**settings)


@pytest.mark.parametrize("backend", ["balltree", "brute", "faiss"])
def test_neighbours_equal_numpy_brute_force(backend):
    index = random_index(engine=backend)
    queries = unit_vectors(40, 16, seed=1)
    distances, indices = index.kneighbors(queries, k=7)
    want_d, want_i = numpy_knn(index.embeddings, queries, 7)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, atol=1e-5)
    matches = index.search(queries[:1], k=7)[0]
    assert [m.row for m in matches] == list(want_i[0])
    np.testing.assert_allclose([m.similarity for m in matches], queries[0] @ index.embeddings[want_i[0]].T, atol=1e-5)


def test_brute_search_of_many_rows_goes_block_by_block_and_stays_exact():
    index = random_index(n=70_000, dim=8, engine="brute")  # 2 blocks of rows: one whole, a tail of 4,464
    queries = unit_vectors(20, 8, seed=1)
    for k in (1, 10, 300):
        distances, indices = index.kneighbors(queries, k)
        want_d, want_i = numpy_knn(index.embeddings, queries, k)
        np.testing.assert_array_equal(indices, want_i)
        np.testing.assert_allclose(distances, want_d, atol=1e-5)


def test_k_equal_to_the_index_size_returns_every_row_and_more_is_refused():
    index = random_index(n=30, engine="brute")
    _, indices = index.kneighbors(unit_vectors(2, 16, 1), k=30)
    assert sorted(indices[0]) == list(range(30))
    with pytest.raises(SiameseError, match=r"Expected 1 <= `k` <= 30 \(the index holds 30 images\)\. Received: 31"):
        index.kneighbors(unit_vectors(2, 16, 1), k=31)
    with pytest.raises(SiameseError, match=r"Expected query embeddings of shape \(n, 16\).*Received: \(2, 8\)"):
        index.kneighbors(unit_vectors(2, 8, 1), k=3)


@pytest.mark.parametrize("backend", ["balltree", "brute"])
def test_by_item_keeps_the_best_image_of_each_item(backend):
    index = random_index(n=400, items=40, engine=backend)
    query = unit_vectors(1, 16, seed=5)
    found = index.search(query, k=12, by_item=True)[0]
    d = np.linalg.norm(index.embeddings - query, axis=1)
    best = {}
    for row in np.argsort(d, kind="stable"):
        best.setdefault(index.items[row], row)
    assert [m.item for m in found] == list(best)[:12]
    assert [m.row for m in found] == [best[i] for i in list(best)[:12]]
    with pytest.raises(SiameseError, match=r"Expected 1 <= `k` <= 40 \(the index holds 40 items\)"):
        index.search(query, k=41, by_item=True)


def test_rows_must_be_finite_non_zero_and_match_their_metadata():
    with pytest.raises(SiameseError, match="Expected finite embeddings"):
        Index(np.full((2, 3), np.nan, np.float32), ["a", "b"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match="Expected non-zero embeddings"):
        Index(np.zeros((2, 3), np.float32), ["a", "b"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match=r"one item, filename and labels per row \(2 rows\)\. Received: 1 items"):
        Index(unit_vectors(2, 3, 0), ["a"], ["1", "2"], [[], []])
    with pytest.raises(SiameseError, match="Expected `engine` to be one of balltree, brute, hnsw, faiss. Rec"):
        Index(unit_vectors(2, 3, 0), ["a", "b"], ["1", "2"], [[], []], engine="kd")
    rows = Rows.from_lists(["a", "b"], ["1", "2"], [["x"], []])
    with pytest.raises(SiameseError, match=r"`filenames` and `labels`, or `rows`\. Received: `items`$"):
        Index(unit_vectors(2, 3, 0), ["a", "b"])
    with pytest.raises(SiameseError, match=r"not both\. Received: `rows` and `labels`"):
        Index(unit_vectors(2, 3, 0), labels=[[], []], rows=rows)
    with pytest.raises(SiameseError, match=r"per row \(3 rows\)\. Received: 2 rows"):
        Index(unit_vectors(3, 3, 0), rows=rows)
    given = Index(unit_vectors(2, 3, 0), rows=rows)
    assert given.rows is rows and list(given.labels) == [("x",), ()]
    assert list(given.labels) == list(Index(unit_vectors(2, 3, 0), ["a", "b"], ["1", "2"], [["x"], []]).labels)


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_agrees_with_numpy_on_2000_unit_vectors(name):
    tuned = {} if name in ("balltree", "brute") else {"target_recall": 0.995}
    index = random_index(n=2000, dim=64, engine=engine(name, **tuned))
    queries = unit_vectors(200, 64, seed=1)
    distances, indices = index.kneighbors(queries, k=10)
    want_d, want_i = numpy_knn(index.embeddings, queries, 10)
    # the same convention everywhere: Euclidean distance between unit vectors, similarity = cosine
    exact_d = np.linalg.norm(index.embeddings[indices] - queries[:, None], axis=2)
    np.testing.assert_allclose(distances, exact_d, atol=1e-5)
    if name in EXACT:
        np.testing.assert_array_equal(indices, want_i)
        np.testing.assert_allclose(distances, want_d, atol=1e-5)
        assert index.recall_at_10 is None
    else:
        assert recall(indices, want_i) >= 0.99
        assert index.recall_at_10 >= 0.995 and index.recall["queries"] == 200 and index.recall["held_out"]
    matches = index.search(queries[:1], k=3)[0]
    np.testing.assert_allclose([m.similarity for m in matches], queries[0] @ index.embeddings[indices[0, :3]].T,
                               atol=1e-5)


def test_faiss_picks_ivf_from_100000_rows_and_flat_below(monkeypatch):
    assert siamese.search.faiss.FAISS_IVF_MIN_ROWS == 100_000
    monkeypatch.setattr(siamese.search.faiss, "FAISS_IVF_MIN_ROWS", 1000)  # the same rule, at a size a test can afford
    assert random_index(n=999, dim=8, engine="faiss").engine.description == "faiss IndexFlatIP (exact)"
    index = random_index(n=1000, dim=8, engine="faiss")
    assert index.engine.params["type"] == "IndexIVFFlat" and index.engine.params["nlist"] == int(4 * 1000**0.5) == 126
    assert index.recall_at_10 >= 0.99 and index.recall["queries"] == 100
    assert 1 <= index.engine.params["nprobe"] <= 126


def test_ef_and_nprobe_trade_recall_for_speed_and_are_checked():
    queries = unit_vectors(100, 64, seed=1)
    hnsw = random_index(n=2000, dim=64, engine=Hnsw(m=4, ef_construction=8))
    ivf = random_index(n=2000, dim=64, engine=Faiss(nlist=16))
    truth = numpy_knn(hnsw.embeddings, queries, 10)[1]
    assert recall(hnsw.kneighbors(queries, ef=1)[1], truth) < recall(hnsw.kneighbors(queries, ef=400)[1], truth)
    assert recall(ivf.kneighbors(queries, nprobe=1)[1], truth) < 0.9
    np.testing.assert_array_equal(ivf.kneighbors(queries, nprobe=16)[1], truth)  # every list: exact
    assert [m.row for m in ivf.search(queries[:1], 3, nprobe=16)[0]] == list(truth[0, :3])
    assert len(hnsw.search(queries[:2], 5, by_item=True, ef=20)[1]) == 5
    cases = [
        (hnsw, {"ef": 0}, r"Expected 1 <= `ef` <= \d+ for this hnsw \(M 4, ef_construction 8, ef \d+\) index\. "
                          "Received: 0"),
        (ivf, {"nprobe": 17}, r"Expected 1 <= `nprobe` <= 16 for this faiss IndexIVFFlat .*Received: 17"),
        (hnsw, {"nprobe": 4}, r"Expected `nprobe` only with a faiss index of at least 100,000 rows .*Received: "
                              r"`nprobe=4` for a hnsw .*Fix: leave out `nprobe`"),
        (ivf, {"ef": 50}, r"Expected `ef` only with an hnsw index\. Received: `ef=50` for a faiss IndexIVFFlat"),
        (random_index(n=50, dim=64, engine="brute"), {"ef": 50}, "Expected `ef` only with an hnsw index.*for a brute "
                                                                  "index"),
        (random_index(n=50, dim=64, engine="faiss"), {"nprobe": 2}, "`nprobe=2` for a faiss IndexFlatIP"),
    ]
    for index, knob, message in cases:
        with pytest.raises(SiameseError, match=message):
            index.kneighbors(queries, 3, **knob)
    # given at build time: the default of queries, with its recall measured
    assert random_index(n=2000, dim=64, engine=Faiss(nlist=16, nprobe=16)).recall_at_10 == 1.0
    assert random_index(n=2000, dim=64, engine=Hnsw(ef=1)).engine.params["ef"] == 1
    with pytest.raises(SiameseError, match="Expected `nprobe` only with a faiss index.*for a faiss IndexFlatIP"):
        random_index(n=50, engine=Faiss(nprobe=4))
    for make, message in ((lambda: BallTree(leaf_size=0), "Expected `leaf_size` >= 1. Received: 0"),
                          (lambda: Hnsw(m=0), "Expected `m` >= 1. Received: 0"),
                          (lambda: Faiss(target_recall=1.5), r"Expected 0 < `target_recall` <= 1. Received: 1.5")):
        with pytest.raises(SiameseError, match=message):
            make()
    with pytest.raises(SiameseError, match=r"Expected 0 <= `nlist` <= 50 \(the rows to index"):
        random_index(n=50, engine=Faiss(nlist=51))


def test_a_query_the_graph_cannot_answer_in_full_is_answered_exactly():
    index = random_index(n=40, dim=16, engine=Hnsw(m=2, ef_construction=2))
    queries = unit_vectors(5, 16, seed=1)
    assert (index.engine.search(queries, 40, 1)[1] == -1).all()  # hnswlib found fewer than 40
    np.testing.assert_array_equal(index.kneighbors(queries, k=40, ef=1)[1], numpy_knn(index.embeddings, queries, 40)[1])


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_answers_alike_after_save_and_load(tmp_path, name):
    index = random_index(n=2000, dim=32, engine=engine(name))
    index.save(tmp_path)
    loaded = Index.load(tmp_path)
    queries = unit_vectors(50, 32, 1)
    for want, got in zip(index.kneighbors(queries, 10), loaded.kneighbors(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (loaded.engine.name, loaded.engine.params, loaded.recall, loaded.engine.description) == (
        index.engine.name, index.engine.params, index.recall, index.engine.description)
    settings = json.loads((tmp_path / "index.json").read_text())
    assert settings["version"] == 3 and settings["engine"] == {"name": index.engine.name, "params": index.engine.params}
    engine_files = sorted(p.suffix for p in tmp_path.glob("engine-*"))
    assert engine_files == {"hnsw": [".hnsw"], "faiss-flat": [".faiss"], "faiss-ivf": [".faiss"]}.get(name, [])
    if engine_files:
        assert settings["files"]["engine"].endswith(engine_files[0]) and len(settings["files"]["engine_sha256"]) == 64


@pytest.mark.parametrize("name", ["brute", "hnsw", "faiss-ivf"])
def test_an_index_built_from_memory_mapped_embeddings_equals_one_built_in_memory(tmp_path, name):
    vectors = unit_vectors(3000, 32, 0)
    np.save(tmp_path / "embeddings.npy", vectors)
    meta = ([f"item{i % 30}" for i in range(3000)], [f"{i}.png" for i in range(3000)], [("x",)] * 3000)
    built = engine(name, m=8) if name == "hnsw" else engine(name)
    mapped = Index(np.load(tmp_path / "embeddings.npy", mmap_mode="r"), *meta, engine=built)
    in_memory = Index(vectors, *meta, engine=built)
    mapped.save(tmp_path / "mapped")
    in_memory.save(tmp_path / "in_memory")
    saved = {d: json.loads((tmp_path / d / "index.json").read_text())["files"] for d in ("mapped", "in_memory")}
    assert saved["mapped"]["embeddings_sha256"] == saved["in_memory"]["embeddings_sha256"]
    # the file written block by block is np.save's, byte for byte
    assert (tmp_path / "mapped" / saved["mapped"]["embeddings"]).read_bytes() == (
        tmp_path / "embeddings.npy").read_bytes()
    queries = unit_vectors(100, 32, 1)
    truth = numpy_knn(vectors, queries, 10)[1]
    if name == "brute":
        np.testing.assert_array_equal(mapped.kneighbors(queries, 10)[1], truth)
        return
    # hnswlib links with every CPU, so two graphs (and the ef each picks) may differ a little
    knob = {"ef", "nprobe"}
    assert {k: v for k, v in mapped.engine.params.items() if k not in knob} == {
        k: v for k, v in in_memory.engine.params.items() if k not in knob}
    assert mapped.recall["queries"] == in_memory.recall["queries"] == 300 and mapped.recall_at_10 >= 0.99
    assert recall(mapped.kneighbors(queries, 10)[1], truth) >= 0.95


BUILD_PEAK = """
import sys
from pathlib import Path
import numpy as np
from siamese.index import Index
from siamese.search import Hnsw
def rss(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024
path, mode = sys.argv[1:]
rows = len(np.load(path, mmap_mode="r"))
meta = ([str(i) for i in range(rows)], [""] * rows, [()] * rows)
before = rss("VmRSS")
embeddings = np.load(path, mmap_mode="r" if mode == "mapped" else None)
Index(embeddings, *meta, engine=Hnsw(m=4, ef_construction=16, ef=16))
print(rss("VmHWM") - before)
"""


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from Linux's /proc")
def test_building_hnsw_from_a_memory_map_holds_a_block_of_it_not_all(tmp_path):
    """The memory the build adds at its peak, from memory-mapped embeddings against the same loaded in memory
    (each in a fresh process): the map spares nearly all of the 64 MiB file."""
    import subprocess
    import sys

    path = tmp_path / "embeddings.npy"
    with open(path, "wb") as f:  # 131,072 x 128 float32 (64 MiB), written in blocks
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (1 << 17, 128)})
        for seed in range(8):
            f.write(unit_vectors(1 << 14, 128, seed).data)
    peaks = {}
    for mode in ("mapped", "in_memory"):
        run = subprocess.run([sys.executable, "-c", BUILD_PEAK, str(path), mode], capture_output=True, text=True,
                             check=True)
        peaks[mode] = int(run.stdout) / 2**20
    assert peaks["in_memory"] - peaks["mapped"] > 0.75 * 64, peaks


def as_version_2(folder: Path) -> None:
    """Rewrite the index `folder` as format version 2 wrote it: the rows in JSON, the engine's name under "backend"
    and its params under "engine"."""
    settings = json.loads((folder / "index.json").read_text())
    arrow = folder / settings["files"]["rows"]
    rows = Rows.open(arrow)
    data = json.dumps({"items": list(rows.items), "filenames": list(rows.filenames),
                       "labels": [list(x) for x in rows.labels]}).encode()
    arrow.unlink()
    digest = hashlib.sha256(data).hexdigest()
    (folder / f"rows-{digest[:16]}.json").write_bytes(data)
    settings["files"].update(rows=f"rows-{digest[:16]}.json", rows_sha256=digest)
    engine = settings.pop("engine")
    settings.update(version=2, backend=engine["name"], engine=engine["params"])
    (folder / "index.json").write_text(json.dumps(settings))


def test_an_index_of_format_version_1_still_loads(tmp_path):
    index = random_index(engine="balltree")
    index.save(tmp_path)
    as_version_2(tmp_path)
    settings = json.loads((tmp_path / "index.json").read_text())
    for key in ("engine", "recall", "part"):
        del settings[key]
    (tmp_path / "index.json").write_text(json.dumps({**settings, "version": 1, "leaf_size": 40}))
    loaded = Index.load(tmp_path)
    assert loaded.engine.name == "balltree" and loaded.engine.params == {"leaf_size": 40}
    assert loaded.recall_at_10 is None
    queries = unit_vectors(5, 16, 3)
    np.testing.assert_array_equal(loaded.kneighbors(queries, 4)[1], index.kneighbors(queries, 4)[1])


def test_an_index_of_format_version_2_with_json_rows_answers_as_the_arrow_rows_do(tmp_path):
    labels = [("red", "big") if i % 3 else () for i in range(2000)]
    vectors = unit_vectors(2000, 32, 0)
    index = Index(vectors, [f"item{i % 70}" for i in range(2000)], [f"images/{i}.png" for i in range(2000)], labels,
                  engine="hnsw")
    index.save(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    as_version_2(tmp_path / "old")
    assert sorted(p.suffix for p in (tmp_path / "new").glob("rows-*")) == [".arrow"]
    assert sorted(p.suffix for p in (tmp_path / "old").glob("rows-*")) == [".json"]
    new, old = Index.load(tmp_path / "new"), Index.load(tmp_path / "old")
    assert (old.engine.name, old.engine.params, old.recall) == ("hnsw", index.engine.params, index.recall)
    assert (new.items, new.filenames, new.labels) == (old.items, old.filenames, old.labels) == (
        index.items, index.filenames, labels)
    queries = unit_vectors(20, 32, 3)
    for kwargs in ({"k": 10}, {"k": 5, "by_item": True}, {"k": 5, "label": "red"}):
        answers = [[[m.to_dict() for m in matches] for matches in i.search(queries, **kwargs)] for i in (new, old)]
        assert answers[0] == answers[1], kwargs
    assert new.search(queries[:1], k=1)[0][0].labels in {("red", "big"), ()}


def test_the_rows_are_memory_mapped_and_read_by_position(tmp_path):
    index = random_index(n=3000, items=300)
    index.save(tmp_path)
    loaded = Index.load(tmp_path)
    if Path("/proc/self/maps").exists():  # Linux: the file is mapped, not read into the heap
        rows_file = tmp_path / json.loads((tmp_path / "index.json").read_text())["files"]["rows"]
        assert str(rows_file) in Path("/proc/self/maps").read_text()
    assert loaded.rows.take(np.array([2999, 0, 5])) == [
        (index.items[r], index.filenames[r], index.labels[r]) for r in (2999, 0, 5)]
    assert (loaded.items[-1], loaded.items[2:4], len(loaded.items)) == (index.items[2999], index.items[2:4], 3000)
    with pytest.raises(IndexError, match="row 3000 of 3000"):
        loaded.items[3000]
    want = [r for r, item in enumerate(index.items) if item == index.items[7]]
    np.testing.assert_array_equal(loaded.rows.of_item(index.items[7]), want)
    assert loaded.rows.of_item("no such item").size == 0
    assert loaded.rows.all_labels() == sorted({label for labels in index.labels for label in labels})
    assert loaded.rows.item_count == len(set(index.items)) == 300


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_bytes(b"not an arrow file"),
     r"rows-.*\.arrow is unreadable \(ArrowInvalid: .*\)\. Fix: rebuild"),
    (lambda p: Rows.from_lists(["a"] * 499, ["a.png"] * 499, [()] * 499).write(p),
     r"rows-.*\.arrow holds 499 rows, not the 500 that index.json records"),
    (lambda p: pa.ipc.new_file(str(p), pa.schema([("item", pa.int64())])).close(), r"expected the columns item"),
])
def test_a_rows_file_of_other_rows_is_refused_even_with_its_hash(tmp_path, write, message):
    random_index().save(tmp_path)
    settings = json.loads((tmp_path / "index.json").read_text())
    path = tmp_path / settings["files"]["rows"]
    write(path)
    settings["files"]["rows_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "index.json").write_text(json.dumps(settings))
    with pytest.raises(SiameseError, match=message):
        Index.load(tmp_path)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    index = random_index(engine="balltree")
    random_index(seed=1).save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # replaces the first, leaving one set of files
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(names) == 3 and "index.json" in names, names
    loaded = Index.load(tmp_path / "idx")
    assert (loaded.items, loaded.filenames, loaded.labels) == (index.items, index.filenames, index.labels)
    assert loaded.engine.name == "balltree" and loaded.dim == 16 and len(loaded) == 500
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
        ("rows", lambda p: Rows.from_lists(["a"] * 499, ["a.png"] * 499, [()] * 499).write(p),
         r"rows-.*\.arrow was modified after the index was written"),
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


@pytest.mark.parametrize("backend", ["hnsw", "faiss"])
def test_a_tampered_or_foreign_engine_file_is_refused(tmp_path, backend):
    random_index(engine=backend).save(tmp_path / "idx")

    def flip_a_byte(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))

    tamper(tmp_path / "idx", "engine", flip_a_byte)
    with pytest.raises(SiameseError, match=rf"engine-\w+\.{backend} is missing or was modified after the index was "
                                           r"written \(SHA-256 mismatch\)\. Fix: rebuild the index"):
        Index.load(tmp_path / "idx")
    # a whole, untampered engine file of another index, its hash written into index.json: refused by content
    random_index(engine=backend).save(tmp_path / "idx")
    random_index(n=400, engine=backend, seed=1).save(tmp_path / "other")
    other = json.loads((tmp_path / "other" / "index.json").read_text())["files"]
    settings = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / other["engine"]).write_bytes((tmp_path / "other" / other["engine"]).read_bytes())
    settings["files"].update(engine=other["engine"], engine_sha256=other["engine_sha256"])
    (tmp_path / "idx" / "index.json").write_text(json.dumps(settings))
    with pytest.raises(SiameseError, match=r"engine-\w+\.\w+ does not agree with the embeddings: it holds 400.* not "
                                           r"the 500 .*rows .*that index.json records"):
        Index.load(tmp_path / "idx")


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
         "expected format siamese-index version 1 to 3, found 'other'"),
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
    embedder = Embedder(small_model, describe(small_model, "test"), {})
    index = Index.from_catalog(catalog, embeddings, engine="brute", model=embedder.info.to_dict())
    embedder.check(index)
    found = embedder.search(index, [catalog.paths[3], catalog.paths[3].read_bytes()], k=2)
    for matches in found:
        assert (matches[0].item, matches[0].filename, matches[0].labels) == ("b", "images/b/0.png", ("x",))
        assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_different_model_is_refused(tmp_path, small_model):
    index = Index(unit_vectors(4, 8, 0), list("abcd"), list("1234"), [[]] * 4,
                  model=describe(small_model, "trained.keras").to_dict())
    keras.utils.set_random_seed(1)
    other = build_embedding("small_cnn", 16, 8)
    with pytest.raises(SiameseError, match=r"built by a different model \(trained.keras, 8-d.*Received: other.keras"):
        Embedder(other, describe(other, "other.keras"), {}).check(index)
    wider = build_embedding("small_cnn", 16, 4)
    with pytest.raises(SiameseError, match="different model.*Received: wide, 4-d"):
        Embedder(wider, describe(wider, "wide"), {}).check(index)


@pytest.mark.parametrize("by_item", [False, True])
def test_a_label_keeps_the_nearest_images_that_have_it(by_item):
    n = 400
    labels = [["even"] if i % 2 == 0 else ["odd", *(["rare"] if i % 50 == 1 else [])] for i in range(n)]
    index = Index(unit_vectors(n, 16, 0), [f"item{i % 40}" for i in range(n)], [f"{i}.png" for i in range(n)], labels)
    query = unit_vectors(1, 16, seed=5)
    d = np.linalg.norm(index.embeddings - query, axis=1)
    for label, k in (("odd", 12), ("rare", 8)):  # 8 rare images only: every row is looked at to find them
        best: dict = {}
        for row in np.argsort(d, kind="stable"):
            if label in labels[row]:
                best.setdefault(index.items[row] if by_item else row, int(row))
        found = index.search(query, k=k, by_item=by_item, label=label)[0]
        assert [m.row for m in found] == list(best.values())[:k]
    assert len(index.search(query, k=20, label="rare")[0]) == 8  # fewer than k have it
    with pytest.raises(SiameseError, match=r"Expected 1 <= `k` <= 400 \(the index holds 400 images\)\. Received: 0"):
        index.search(query, k=0, label="odd")


class Plateau(Engine):
    """Finds the true neighbours in the first min(knob, 6) of its k places: recall@10 stops at 0.6 from knob 6."""

    knob = Knob("probe", "a test's index", "probes")

    def build(self, embeddings, held, half_norms):
        self.embeddings, self.half_norms = embeddings, half_norms.copy()
        self.half_norms[held] = np.inf
        self.params = {}

    @property
    def knob_range(self) -> tuple[int, int]:
        return (1, 1 << 20)

    def add(self, embeddings, rows):
        self.half_norms[rows] = 0.5 * (np.asarray(embeddings)[rows] ** 2).sum(axis=1)

    def search(self, queries, k, knob):
        distances, indices = kneighbors(self.embeddings, queries, k, self.half_norms)
        found = min(knob, 6)
        indices[:, found:] = np.where(indices[:, found:] >= 0, len(self.embeddings) - 1 - indices[:, found:], -1)
        return distances, indices


def test_tuning_stops_where_more_of_the_knob_stops_helping():
    index = random_index(n=2000, engine=Plateau())
    # 1, 2, 4: recall 0.1, 0.2, 0.4; 8: 0.6; 16: no better, so 8 is kept, not the whole range
    assert index.engine.params["probe"] == 8 and 0.55 <= index.recall_at_10 <= 0.65


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_loaded_faiss_index_is_memory_mapped_not_read_into_memory(tmp_path):
    index = random_index(n=2000, dim=32, engine=Faiss(nlist=16))
    index.save(tmp_path)
    loaded = Index.load(tmp_path)
    engine_file = tmp_path / json.loads((tmp_path / "index.json").read_text())["files"]["engine"]
    assert str(engine_file) in Path("/proc/self/maps").read_text()
    queries = unit_vectors(20, 32, 1)
    np.testing.assert_array_equal(loaded.kneighbors(queries, 10)[1], index.kneighbors(queries, 10)[1])
