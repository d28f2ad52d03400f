"""The embedding store, `embed_to_store` on both runners (a real Ray, never a mock), re-embedding only what
changed, and `index --embeddings`.

The Ray tests are slow (a Ray start and the actors' TensorFlow imports): those that start a Ray of their own (the
killed driver, the two-node cluster) come first, then the module's one Ray session of 2 CPUs serves the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from siamese import atomic
from siamese.catalog import load_catalog
from siamese.embed import Embedder, embed_catalog
from siamese.embedding_job import embed_to_store
from siamese.embedding_store import MANIFEST, EmbeddingStore, index_stores
from siamese.errors import SiameseError
from siamese.images import file_stamp
from siamese.models import build_embedding
from siamese.search import ENGINES, Faiss, Index

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """200 training and 200 test images of digits, a tiny model (small_cnn, 16 px, 8-d) and catalogs of them:
    base.json (the first 200 training images, labels on two items), grown.json (base less its last 5% of each
    item, plus 10% new: 20 test images), corrupt.json (base plus an image that does not decode)."""
    from siamese.datasets import make_dataset

    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, limit=200, progress=False)
    keras.utils.set_random_seed(0)
    build_embedding("small_cnn", 16, 8).save(root / "model.keras")
    train = json.loads((root / "train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    base = {item: {"images": v["images"], "labels": ["round"] if item in ("digit_0", "digit_8") else []}
            for item, v in train.items()}
    (root / "base.json").write_text(json.dumps(base))
    grown = {item: dict(v, images=list(v["images"])) for item, v in base.items()}
    dropped = [images.pop() for v in grown.values() for images in [v["images"]]]  # 10 of 200: 5%
    new = [(item, image) for item, v in test.items() for image in v["images"][:2]]  # 20: 10%
    for item, image in new:
        grown[item]["images"].append(image)
    (root / "grown.json").write_text(json.dumps(grown))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    corrupt = {**base, "digit_9": dict(base["digit_9"], images=[*base["digit_9"]["images"],
                                                                 {"filename": "images/broken.png"}])}
    (root / "corrupt.json").write_text(json.dumps(corrupt))
    assert (len(dropped), len(new)) == (10, 20)
    return root


@pytest.fixture(scope="module")
def embedder(data) -> Embedder:
    return Embedder.load(data / "model.keras")


def catalog(data: Path, name: str = "base"):
    return load_catalog(data / f"{name}.json", data)


def contents(path) -> tuple[list[dict], np.ndarray]:
    """A store's rows (as dicts) and embeddings, read block by block."""
    rows, blocks = [], []
    for meta, vectors in EmbeddingStore.open(path).batches(64):
        rows += meta.to_pylist()
        blocks.append(vectors)
    return rows, np.concatenate(blocks)


def assert_same_store(a, b, atol: float = 0.0) -> None:
    rows_a, vectors_a = contents(a)
    rows_b, vectors_b = contents(b)
    assert rows_a == rows_b
    np.testing.assert_allclose(vectors_a, vectors_b, rtol=0, atol=atol)


# --- the store, on the local runner ----------------------------------------------------------------------------


def test_a_store_round_trips_rows_and_embeddings_a_part_at_a_time(data, embedder, tmp_path):
    cat = catalog(data)
    result = embed_to_store(embedder, cat, tmp_path / "store", part_rows=64, labeled_data=data / "base.json",
                            progress=False, workers=1)
    assert (result.new, result.kept, result.dropped, result.skipped, result.rows) == (200, 0, 0, 0, 200)
    store = EmbeddingStore.open(tmp_path / "store")
    assert len(store) == 200 and store.dim == 8 and [p["rows"] for p in store.parts] == [64, 64, 64, 8]
    assert store.model == embedder.info.to_dict() and store.embedder == embedder.recipe
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == cat.digest() and manifest["counts"]["new"] == 200
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted([MANIFEST, *(p["name"] for p in
                                                                                         store.parts)])
    rows = store.rows().to_pylist()
    assert [r["row"] for r in rows] == list(range(200)) and [r["filename"] for r in rows] == list(cat.filenames)
    assert rows[0]["item"] == "digit_0" and rows[0]["labels"] == ["round"]
    assert rows[0]["sha256"] == hashlib.sha256(cat.paths[0].read_bytes()).hexdigest()
    sizes = [len(v) for _, v in store.batches(50)]
    assert sizes == [50, 14, 50, 14, 50, 14, 8]  # never across a part: one file at a time
    _, vectors = contents(tmp_path / "store")
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, embed_catalog(embedder.model, cat, progress=False, workers=1), atol=1e-6)


def tamper(store: Path, change: str) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    part = store / manifest["parts"][0]["name"]
    if change == "format":
        manifest["format"] = "something-else"
    elif change == "version":
        manifest["version"] = 99
    elif change == "dim":
        manifest["dim"] = 9
    elif change == "missing":
        part.unlink()
    elif change == "short":
        part.write_bytes(part.read_bytes()[:-10])
    elif change == "flipped":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    (store / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("change", "message"), [
    ("format", "Expected manifest.json of format 'siamese-embeddings'. Received: .* of 'something-else'"),
    ("version", "Expected an embedding store of format version 1 to 2. Received: .* of version 99"),
    ("dim", "the model makes 8-d embeddings, the store holds 9-d ones"),
    ("missing", r"part part-[0-9a-f]{16}\.parquet is missing\. Fix: embed the catalog again"),
    ("short", r"part part-[0-9a-f]{16}\.parquet is [\d,]+ bytes, manifest.json says [\d,]+: it was modified"),
    ("flipped", r"part part-[0-9a-f]{16}\.parquet was modified after the store was written \(SHA-256 mismatch\)"),
])
def test_a_tampered_store_is_refused_naming_the_file(data, embedder, tmp_path, change, message):
    embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    tamper(tmp_path / "store", change)
    with pytest.raises(SiameseError, match=message):
        contents(tmp_path / "store")
    if change == "format":  # another tool's manifest.json: never written over
        with pytest.raises(SiameseError, match=r"holds other files \(manifest.json, part-"):
            embed_to_store(embedder, catalog(data), tmp_path / "store", replace=True, progress=False, workers=1)
        return
    with pytest.raises(SiameseError, match=message):  # and an update of it, until `replace`
        embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    embed_to_store(embedder, catalog(data), tmp_path / "store", replace=True, progress=False, workers=1)
    assert len(contents(tmp_path / "store")[0]) == 200


def test_a_folder_that_is_not_a_store_is_refused(tmp_path, data, embedder):
    with pytest.raises(SiameseError, match=r"is not an embedding store: manifest.json is missing\. Fix: write one"):
        EmbeddingStore.open(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SiameseError, match=r"Expected a new or empty folder, or one that holds only an embedding "
                                           r"store siamese wrote\. Received: .* \(notes.txt\)"):
        embed_to_store(embedder, catalog(data), tmp_path, progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_rerun_embeds_only_new_images_drops_deleted_ones_and_equals_a_fresh_run(data, embedder, tmp_path):
    embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    before = (tmp_path / "store" / MANIFEST).read_bytes()
    same = embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    assert (same.new, same.kept, same.dropped) == (0, 200, 0)
    assert (tmp_path / "store" / MANIFEST).read_bytes() == before  # nothing changed: nothing written
    grown = catalog(data, "grown")
    result = embed_to_store(embedder, grown, tmp_path / "store", part_rows=50, progress=False, workers=1)
    assert (result.embedded, result.kept, result.dropped, result.rows) == (20, 190, 10, 210)
    assert result.summary() == ("Embedded 20 new images, kept 190, dropped 10 (local): "
                                f"{tmp_path / 'store'} holds 210 rows")
    embed_to_store(embedder, grown, tmp_path / "fresh", part_rows=50, progress=False, workers=1)
    assert_same_store(tmp_path / "store", tmp_path / "fresh", atol=1e-6)  # embedded in other batches
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(p.name for p in
                                                                            (tmp_path / "fresh").iterdir())


def test_an_edited_image_is_embedded_again_and_its_old_row_dropped(data, embedder, tmp_path):
    images = tmp_path / "data"
    shutil.copytree(data / "images", images / "images")
    shutil.copy(data / "base.json", images / "base.json")
    embed_to_store(embedder, catalog(images), tmp_path / "store", progress=False, workers=1)
    cat = catalog(images)
    shutil.copy(cat.paths[7], cat.paths[3])  # image 3 now holds image 7's bytes: a known SHA-256, nothing to embed
    shutil.copy(sorted((data / "images" / "test").glob("*/*.png"))[0], cat.paths[5])  # new bytes
    result = embed_to_store(embedder, catalog(images), tmp_path / "store", progress=False, workers=1)
    assert (result.new, result.kept, result.dropped) == (1, 199, 2)
    embed_to_store(embedder, catalog(images), tmp_path / "fresh", progress=False, workers=1)
    assert_same_store(tmp_path / "store", tmp_path / "fresh", atol=1e-6)  # embedded in other batches


def test_a_rerun_hashes_only_the_files_whose_stamp_changed(data, embedder, tmp_path):
    images = tmp_path / "data"
    shutil.copytree(data / "images", images / "images")
    shutil.copy(data / "base.json", images / "base.json")
    store = tmp_path / "store"
    assert embed_to_store(embedder, catalog(images), store, progress=False, workers=1).hashed == 200
    before = (store / MANIFEST).read_bytes()
    assert embed_to_store(embedder, catalog(images), store, progress=False, workers=1).hashed == 0
    assert (store / MANIFEST).read_bytes() == before
    cat = catalog(images)
    st = os.stat(cat.paths[4])
    os.utime(cat.paths[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the same bytes, a new stamp
    shutil.copy(sorted((data / "images" / "test").glob("*/*.png"))[0], cat.paths[6])  # new bytes
    result = embed_to_store(embedder, catalog(images), store, progress=False, workers=1)
    assert (result.hashed, result.new, result.kept, result.dropped) == (2, 1, 199, 1)
    again = embed_to_store(embedder, catalog(images), store, progress=False, workers=1)
    assert (again.hashed, again.new) == (0, 0)  # the touched file's new stamp was recorded
    rows = EmbeddingStore.open(store).rows().to_pylist()
    for i in (4, 6):
        assert rows[i]["stamp"] == file_stamp(cat.paths[i])
        assert rows[i]["sha256"] == hashlib.sha256(cat.paths[i].read_bytes()).hexdigest()


def as_version_1(store: Path) -> None:
    """Rewrite the store at `store` as format version 1 wrote it: parts without the stamp column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((store / MANIFEST).read_text())
    for part in manifest["parts"]:
        old = store / part["name"]
        sink = pa.BufferOutputStream()
        pq.write_table(pq.read_table(old).drop_columns(["stamp"]), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        part.update(name=f"part-{digest[:16]}.parquet", bytes=len(data), sha256=digest)
        (store / part["name"]).write_bytes(data)
        old.unlink()
    manifest["version"] = 1
    (store / MANIFEST).write_text(json.dumps(manifest))


def test_a_version_1_store_without_stamps_reads_and_updates_hashing_every_file(data, embedder, tmp_path):
    store = tmp_path / "store"
    embed_to_store(embedder, catalog(data), store, progress=False, workers=1)
    rows, vectors = contents(store)
    as_version_1(store)
    old = EmbeddingStore.open(store)
    assert old.version == 1 and "stamp" not in old.rows().column_names
    rows_v1, vectors_v1 = contents(store)
    assert rows_v1 == [{k: v for k, v in r.items() if k != "stamp"} for r in rows]
    np.testing.assert_array_equal(vectors_v1, vectors)
    result = embed_to_store(embedder, catalog(data), store, progress=False, workers=1)
    assert (result.hashed, result.new, result.kept, result.dropped) == (200, 0, 200, 0)
    assert EmbeddingStore.open(store).version == 2
    assert contents(store)[0] == rows
    assert embed_to_store(embedder, catalog(data), store, progress=False, workers=1).hashed == 0


def test_a_store_of_another_model_is_refused_unless_replaced(data, embedder, tmp_path):
    embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    keras.utils.set_random_seed(1)
    build_embedding("small_cnn", 16, 8).save(tmp_path / "other.keras")
    other = Embedder.load(tmp_path / "other.keras")
    with pytest.raises(SiameseError, match=r"was embedded by a different model \(.*model.keras, 8-d, fingerprint "
                                           r"[0-9a-f]{12}\)\. Received: .*other.keras.*Fix: .*`replace=True`"):
        embed_to_store(other, catalog(data), tmp_path / "store", progress=False, workers=1)
    result = embed_to_store(other, catalog(data), tmp_path / "store", replace=True, progress=False, workers=1)
    assert (result.new, result.kept) == (200, 0)
    assert EmbeddingStore.open(tmp_path / "store").model["fingerprint"] == other.info.fingerprint


def test_bad_images_fail_naming_them_or_are_skipped_with_a_warning(data, embedder, tmp_path):
    with pytest.raises(SiameseError, match=r"1 image in .* cannot be used \(first: item 'digit_9': "
                                           r"images/broken.png: .*\)\. Fix: replace or remove it"):
        embed_to_store(embedder, catalog(data, "corrupt"), tmp_path / "store", progress=False, workers=1)
    assert not (tmp_path / "store" / MANIFEST).exists()
    with pytest.warns(UserWarning, match=r"Skipping 1 image that cannot be decoded \(first: item 'digit_9': "
                                         r"images/broken.png"):
        result = embed_to_store(embedder, catalog(data, "corrupt"), tmp_path / "store", on_bad_image="skip",
                                progress=False, workers=1)
    assert (result.new, result.skipped, result.rows) == (200, 1, 200)
    assert "images/broken.png" not in [r["filename"] for r in contents(tmp_path / "store")[0]]


def test_a_second_run_on_one_store_fails_at_once(data, embedder, tmp_path):
    hold = ("import sys, time\nfrom siamese.embedding_store import claim_store\nwith claim_store(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    first = subprocess.Popen([sys.executable, "-c", hold, tmp_path / "store"], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline() == b"held\n"
        started = time.monotonic()
        with pytest.raises(SiameseError, match=rf"store is being written by another run \(pid {first.pid}\)\. "
                                               "Expected one run at a time"):
            embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
        assert time.monotonic() - started < 1  # at once: before hashing or embedding anything
    finally:
        first.kill()
        first.wait()


def test_a_crash_before_the_manifest_leaves_the_old_store_and_the_next_run_tidies_up(data, embedder, tmp_path,
                                                                                     monkeypatch):
    embed_to_store(embedder, catalog(data), tmp_path / "store", part_rows=64, progress=False, workers=1)
    before = contents(tmp_path / "store")
    names = sorted(p.name for p in (tmp_path / "store").iterdir())
    write_bytes = atomic.write_bytes

    def crash(path, data):
        if Path(path).name == MANIFEST:
            raise OSError(28, "No space left on device")
        write_bytes(path, data)

    monkeypatch.setattr(atomic, "write_bytes", crash)
    with pytest.raises(OSError, match="No space left"):
        embed_to_store(embedder, catalog(data, "grown"), tmp_path / "store", part_rows=64, progress=False, workers=1)
    monkeypatch.undo()
    after = contents(tmp_path / "store")
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert len(list((tmp_path / "store").iterdir())) > len(names)  # the new parts, unnamed by the manifest
    embed_to_store(embedder, catalog(data, "grown"), tmp_path / "store", part_rows=64, progress=False, workers=1)
    store = EmbeddingStore.open(tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted([MANIFEST, *(p["name"] for p in
                                                                                         store.parts)])


# --- index --embeddings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", list(ENGINES))
def test_an_index_of_stores_finds_the_neighbours_an_index_of_the_catalog_does(data, embedder, tmp_path, engine):
    cat = catalog(data)
    embed_to_store(embedder, cat, tmp_path / "store", part_rows=64, progress=False, workers=1)
    first, second = cat.slice_images(0, 90), cat.slice_images(90, 200)
    embed_to_store(embedder, first, tmp_path / "first", progress=False, workers=1)
    embed_to_store(embedder, second, tmp_path / "second", progress=False, workers=1)
    direct = embedder.index(cat, engine, progress=False)
    queries = direct.embeddings[::7]
    for index in (index_stores([tmp_path / "store"], engine),
                  index_stores([tmp_path / "first", tmp_path / "second"], engine)):
        assert (index.items, index.filenames, index.labels) == (direct.items, direct.filenames, direct.labels)
        assert index.model == direct.model and index.embedder == direct.embedder == embedder.recipe
        np.testing.assert_array_equal(index.kneighbors(queries, 5)[1], direct.kneighbors(queries, 5)[1])
        index.save(tmp_path / "index")
        loaded = Index.load(tmp_path / "index")
        found = Embedder.of_index(loaded).search(loaded, [cat.paths[11]], k=1)  # queries load the stores' model
        assert found[0][0].filename == cat.filenames[11]
        assert loaded.rows.table.equals(index.rows.table)  # the rows' file, copied as built
    before = sorted(p.name for p in (tmp_path / "store").iterdir())
    index = index_stores([tmp_path / "store"], engine)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before  # its scratch files have no names


def test_stores_of_different_models_are_not_indexed_together(data, embedder, tmp_path):
    embed_to_store(embedder, catalog(data), tmp_path / "a", progress=False, workers=1)
    keras.utils.set_random_seed(2)
    build_embedding("small_cnn", 16, 4).save(tmp_path / "other.keras")
    embed_to_store(Embedder.load(tmp_path / "other.keras"), catalog(data), tmp_path / "b", progress=False, workers=1)
    with pytest.raises(SiameseError, match=r"Expected stores embedded by one model\. Received: .*b by .*other.keras "
                                           r"\(4-d, fingerprint [0-9a-f]{12}\), .*a by .*model.keras \(8-d"):
        index_stores([tmp_path / "a", tmp_path / "b"])


def test_the_embed_and_index_commands(data, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("embed", "--keras-model", data / "model.keras", "--labeled-data", data / "base.json",
            "--image-dir", data, "--output", "store", "--no-progress")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert out.splitlines()[0] == "Embedded 200 new images, kept 0, dropped 0 (local): store holds 200 rows"
    code, out, err = run_cli(*args)
    assert out.splitlines()[0] == "Embedded 0 new images, kept 200, dropped 0 (local): store holds 200 rows"
    code, out, err = run_cli("index", "--embeddings", "store", "--engine", "hnsw", "--output", "index")
    assert code == 0, err
    assert out.startswith("Indexed 200 images of 1 embedding store (8-d, hnsw")
    code, out, err = run_cli("query", "--index", "index", data / "images/train/digit_3/00003.png", "--k", "1",
                             "--json")
    assert code == 0, err
    assert json.loads(out)[0]["neighbours"][0]["filename"] == "images/train/digit_3/00003.png"
    keras.utils.set_random_seed(1)
    build_embedding("small_cnn", 16, 8).save(tmp_path / "other.keras")
    code, _, err = run_cli(*args[:2], "other.keras", *args[3:])
    assert code == 2 and "Fix: embed with the model of the store, or pass --replace to embed every image" in err
    code, _, err = run_cli("index", "--embeddings", "store", "--labeled-data", data / "base.json", "--output", "i2")
    assert code == 2 and "Expected --embeddings alone, or a catalog (--labeled-data and --image-dir)" in err
    code, _, err = run_cli("index", "--output", "i2")
    assert code == 2 and "Received: neither alone" in err
    code, _, err = run_cli(*args[:-3], "--output", "s2", "--batch-size", "0")
    assert code == 2 and "Expected --batch-size >= 1. Received: 0" in err
    from siamese.cli import build_parser

    parser = build_parser()
    assert "Deprecated: across machines, embed with `embed --runner ray`" in " ".join(
        parser.commands["merge-index"].format_help().split())
    assert "deprecated: use `embed --runner ray` and `index --embeddings STORE`" in " ".join(
        parser.commands["index"].format_help().split())


# --- a real Ray -----------------------------------------------------------------------------------------------


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = (int(stat.rpartition(")")[2].split()[1]), cmdline)
    return found


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`."""
    table, out, todo = processes(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in out:
                out[child] = cmdline
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def actor_pids(within: dict[int, str] | None = None) -> list[int]:
    """The processes of the embedding actors (Ray titles them after the class)."""
    table = within if within is not None else {pid: cmd for pid, (_, cmd) in processes().items()}
    return [pid for pid, cmdline in table.items() if "EmbedActor" in cmdline and alive(pid)]


def test_index_embeddings_refuses_a_budget_too_small_before_reading_a_part(data, embedder, tmp_path, monkeypatch):
    embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)

    def not_read(*args, **kwargs):
        raise AssertionError("a part was read")

    monkeypatch.setattr(EmbeddingStore, "batches", not_read)
    with pytest.raises(SiameseError, match=r"^Expected `max_memory` >= .* for 200 rows of 8 dimensions\. Received"):
        index_stores([tmp_path / "store"], Faiss(max_memory=1))


@pytest.mark.slow  # a Ray of its own and the actors' TensorFlow: about 40 s
def test_a_killed_embed_driver_leaves_the_old_store_and_no_ray_processes(data, embedder, tmp_path):
    import ray

    assert not ray.is_initialized()
    embed_to_store(embedder, catalog(data), tmp_path / "store", progress=False, workers=1)
    before = (tmp_path / "store" / MANIFEST).read_bytes(), contents(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "siamese", "embed", "--keras-model", data / "model.keras", "--labeled-data",
         data / "grown.json", "--image-dir", data, "--output", tmp_path / "store", "--runner", "ray", "--batch-size",
         "2", "--no-progress"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not actor_pids(descendants(driver.pid)):  # the run is under way: Ray up, the actors started
            assert driver.poll() is None, driver.stdout.read().decode()
            assert time.monotonic() < deadline, "no embedding actor started in 120 s"
            time.sleep(0.2)
        ray_processes = descendants(driver.pid)
        assert any("raylet" in cmd for cmd in ray_processes.values())
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.monotonic() + 60
    while (left := [pid for pid in ray_processes if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {[ray_processes[p][:80] for p in left]}"
    assert (tmp_path / "store" / MANIFEST).read_bytes() == before[0]
    after = contents(tmp_path / "store")
    assert after[0] == before[1][0] and np.array_equal(after[1], before[1][1])
    result = embed_to_store(embedder, catalog(data, "grown"), tmp_path / "store", progress=False, workers=1)
    assert (result.new, result.kept, result.dropped) == (20, 190, 10)


@pytest.mark.slow  # a two-node Ray of its own: about 40 s
def test_a_two_node_cluster_writes_the_store_the_local_runner_does(data, embedder, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    embed_to_store(embedder, catalog(data, "grown"), tmp_path / "local", progress=False, workers=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        result = embed_to_store(embedder, catalog(data, "grown"), tmp_path / "ray", runner="ray", batch_size=16,
                                progress=False)
        assert (result.new, result.rows, result.runner) == (210, 210, "ray")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same_store(tmp_path / "local", tmp_path / "ray", atol=1e-6)


@pytest.fixture(scope="module")
def local_ray():
    """The module's one Ray session: a real local Ray of 2 CPUs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # the actors' TensorFlow: about 20 s
def test_the_ray_runner_writes_the_store_the_local_runner_does(data, embedder, tmp_path, local_ray):
    kwargs = {"on_bad_image": "skip", "part_rows": 64, "batch_size": 16, "progress": False}
    with pytest.warns(UserWarning, match="Skipping 1 image .*first: item 'digit_9': images/broken.png"):
        embed_to_store(embedder, catalog(data, "corrupt"), tmp_path / "local", workers=1, **kwargs)
    with pytest.warns(UserWarning, match="Skipping 1 image .*first: item 'digit_9': images/broken.png"):
        result = embed_to_store(embedder, catalog(data, "corrupt"), tmp_path / "ray", runner="ray", **kwargs)
    assert (result.new, result.skipped, result.rows) == (200, 1, 200)
    assert local_ray.is_initialized()  # a session it joined is left running
    assert_same_store(tmp_path / "local", tmp_path / "ray", atol=1e-6)
    grown = embed_to_store(embedder, catalog(data, "grown"), tmp_path / "ray", runner="ray", **kwargs)
    assert (grown.new, grown.kept, grown.dropped) == (20, 190, 10)
    embed_to_store(embedder, catalog(data, "grown"), tmp_path / "local", workers=1, **kwargs)
    assert_same_store(tmp_path / "local", tmp_path / "ray", atol=1e-6)


@pytest.mark.slow  # the actors' TensorFlow, twice (one restarted): about 30 s
def test_an_actor_killed_mid_run_is_restarted_and_every_image_is_stored_once(data, embedder, tmp_path, local_ray,
                                                                             monkeypatch):
    from siamese import embedding_job

    killed, after_kill = [], []
    check = embedding_job.check_finite

    def kill_an_actor_at_the_first_batch(embeddings, source, filenames):
        if not killed:
            victim = actor_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            while alive(victim):
                time.sleep(0.05)
        else:
            after_kill.append(len(filenames))
        check(embeddings, source, filenames)

    monkeypatch.setattr(embedding_job, "check_finite", kill_an_actor_at_the_first_batch)
    result = embed_to_store(embedder, catalog(data, "grown"), tmp_path / "ray", runner="ray", batch_size=2,
                            progress=False)
    assert killed and sum(after_kill) > 0  # batches came back after the kill
    assert result.new == result.rows == 210
    rows, _ = contents(tmp_path / "ray")
    assert sorted(r["filename"] for r in rows) == sorted(catalog(data, "grown").filenames)  # each image once
    monkeypatch.undo()
    embed_to_store(embedder, catalog(data, "grown"), tmp_path / "local", progress=False, workers=1)
    assert_same_store(tmp_path / "local", tmp_path / "ray", atol=1e-6)


def test_the_actors_leave_room_for_a_decode_task_on_every_node():
    from siamese.ray_runner import placement

    assert placement(2, [2], 0, 2) == {"decode_cpus": 1.0, "actor_cpus": 0.5, "actor_gpus": None, "threads": 1}
    two_nodes = placement(2, [1, 1], 0, 2)  # an actor on each node: half a CPU each leaves half for decoding
    assert two_nodes["decode_cpus"] + two_nodes["actor_cpus"] <= 1
    assert two_nodes["decode_cpus"] != two_nodes["actor_cpus"]  # else Ray Data runs decoding inside the actors
    assert placement(64, [16] * 4, 0, 8)["actor_cpus"] == 0.99
    assert placement(64, [16] * 4, 8, 8) == {"decode_cpus": 1.0, "actor_cpus": 1.0, "actor_gpus": 1, "threads": 4}


def test_blocks_hold_16_batches_where_every_actor_still_gets_4_and_never_number_over_10000():
    from siamese.ray_runner import block_rows

    assert block_rows(200, 64, 2) == 64  # 4 batches: one a block
    assert block_rows(60_000, 64, 2) == 1024  # 938 batches: 16 a block, 59 blocks
    assert block_rows(4_000, 64, 2) == 7 * 64  # 63 batches: 8 blocks would be too few, so 7 batches a block
    assert block_rows(4_000, 64, 8) == 64  # 32 blocks for 8 actors
    assert block_rows(100_000_000, 64, 2) == 157 * 64  # 1,562,500 batches in at most 10,000 blocks
    for images, actors in ((1, 1), (10**6, 3), (10**8, 64), (12_345, 2)):
        size = block_rows(images, 64, actors)
        assert size % 64 == 0 and -(-images // size) <= 10_000
