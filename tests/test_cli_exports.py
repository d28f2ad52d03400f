"""The original's export and indexing commands as written, then query and similarity, end to end from the CLI."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

from siamese.catalog import load_catalog
from siamese.embed import describe, embed_images
from siamese.images import decode_image
from siamese.index import Index, merge_parts
from siamese.models import build_embedding
from tests.conftest import solid_catalog, write_image

PRETRAINED_OFFLINE = ("--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder like the repo's: checkpoints/file_saved_by_notebook.hdf5 and /data with a catalog."""
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    model = build_embedding("small_cnn", 16, 8)
    (tmp_path / "checkpoints").mkdir()
    model.save(tmp_path / "checkpoints" / "file_saved_by_notebook.hdf5")
    solid_catalog(tmp_path / "data", {"a": (3, []), "b": (2, ["red"]), "c": (2, [])})
    return tmp_path


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_original_export_savedmodel_with_a_trained_model(workdir, run_cli):
    code, out, err = run_cli("--export", "savedmodel", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5")
    assert code == 0, err
    assert (workdir / "exports" / "savedmodel" / "1" / "saved_model.pb").is_file()
    assert "SavedModel of checkpoints/file_saved_by_notebook.hdf5 (16 px in, 8-d out): exports/savedmodel/1" in out
    code, out, err = run_cli("--export", "savedmodel", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5")
    assert code == 0 and (workdir / "exports" / "savedmodel" / "2" / "saved_model.pb").is_file()


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_original_export_savedmodel_of_a_pretrained_backbone(workdir, run_cli):
    code, _, err = run_cli("--export", "savedmodel", *PRETRAINED_OFFLINE, "--output", "pretrained")
    assert code == 0, err
    info = json.loads((workdir / "pretrained" / "1" / "siamese.json").read_text())
    assert info["embedding_dim"] == 1280 and info["image_size"] == 32


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_original_index_commands_with_a_trained_model_then_query(workdir, run_cli):
    code, out, err = run_cli("--export", "balltree", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5",
                             "--labeled-data", "data/labeled.json", "--image-dir", "data", "--no-progress")
    assert code == 0, err
    assert ("Indexed 7 images of 3 items (8-d, balltree) embedded by checkpoints/file_saved_by_notebook.hdf5: "
            "exports/index") in out
    index = Index.load(workdir / "exports" / "index")
    assert index.engine.name == "balltree" and index.items == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    catalog = load_catalog(workdir / "data" / "labeled.json", workdir / "data")
    model = keras.saving.load_model(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    np.testing.assert_allclose(index.embeddings, embed_images(model, list(catalog.paths)), atol=1e-5)

    query = str(workdir / "data" / "images" / "b" / "1.png")
    code, out, err = run_cli("query", "--index", "exports/index", query, "--k", "2", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer[0]["query"] == query
    first = answer[0]["neighbours"][0]
    assert [m["rank"] for m in answer[0]["neighbours"]] == [1, 2]
    assert (first["item"], first["filename"], first["labels"]) == ("b", "images/b/1.png", ["red"])
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)

    code, out, err = run_cli("query", "--index", "exports/index", query, "--k", "3", "--by-item")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == query and len(lines) == 4
    assert sorted(line.split()[2] for line in lines[1:]) == ["a", "b", "c"]


def test_original_index_commands_with_a_pretrained_backbone_and_brute(workdir, run_cli):
    code, out, err = run_cli("--export", "balltree", "--labeled-data", "data/labeled.json", "--image-dir", "data",
                             *PRETRAINED_OFFLINE, "--engine", "brute", "--output", "brute", "--no-progress")
    assert code == 0, err
    assert "(1280-d, brute) embedded by pretrained mobilenet_v2 (weights none)" in out
    code, out, err = run_cli("query", "--index", "brute", "data/images/c/0.png", "--k", "1")
    assert code == 0, err
    assert out.splitlines()[1].split()[2:] == ["c", "images/c/0.png"]


def test_hnsw_and_faiss_indexes_report_their_recall_and_take_ef_and_nprobe(workdir, run_cli):
    args = ("index", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--labeled-data", "data/labeled.json",
            "--image-dir", "data", "--no-progress")
    code, out, err = run_cli(*args, "--engine", "hnsw", "--output", "hnsw", "--hnsw-m", "8", "--ef-construction", "50")
    assert code == 0, err
    assert "(8-d, hnsw (M 8, ef_construction 50, ef 16)) embedded by" in out
    assert "Recall@10 1.0000 on 7 held-out images (target 0.99); query with --ef N" in out
    assert Index.load(workdir / "hnsw").recall_at_10 == 1.0
    code, out, err = run_cli(*args, "--engine", "faiss", "--output", "faiss", "--nlist", "2")
    assert code == 0, err
    assert "(8-d, faiss IndexIVFFlat (nlist 2, nprobe 2)) embedded by" in out and "query with --nprobe N" in out
    query = "data/images/b/1.png"
    for index, knob in (("hnsw", ("--ef", "3")), ("faiss", ("--nprobe", "2"))):
        code, out, err = run_cli("query", "--index", index, query, "--k", "2", *knob)
        assert code == 0, err
        assert out.splitlines()[1].split()[1:] == ["1.0000", "b", "images/b/1.png"]
    code, out, err = run_cli("query", "--index", "hnsw", query, "--k", "2", "--nprobe", "2")
    assert code == 2 and "Expected --nprobe only with a faiss index" in err and "Fix: leave out --nprobe" in err
    code, out, err = run_cli("query", "--index", "faiss", query, "--k", "2", "--nprobe", "3")
    assert code == 2 and "Expected 1 <= --nprobe <= 2 for this faiss IndexIVFFlat (nlist 2, nprobe 2) index" in err


SHARD_ARGS = ("--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--labeled-data", "data/labeled.json",
              "--image-dir", "data", "--no-progress", "--batch-size", "2")


def test_shards_merge_into_the_index_of_the_whole_catalog_byte_for_byte(workdir, run_cli):
    code, out, err = run_cli("index", *SHARD_ARGS, "--engine", "brute", "--output", "whole")
    assert code == 0, err
    # 7 images make 4 batches of 2: shards of images 0-2, 2-4 and 4-7 (item a's 3 images are cut in two)
    code, out, err = run_cli("--export", "balltree", *SHARD_ARGS, "--shard", "1/3", "--output", "parts/1")
    assert code == 0, err
    assert "Indexed shard 1/3 (images 0 to 2 of 7): 2 images of 1 item (8-d, balltree)" in out
    assert "merge-index PART... --output DIR" in out
    for shard in (2, 3):
        assert run_cli("index", *SHARD_ARGS, "--shard", f"{shard}/3", "--output", f"parts/{shard}")[0] == 0
    assert Index.load(workdir / "parts" / "3").part == {
        "shard": 3, "shards": 3, "batch_size": 2, "rows": [4, 7], "images": 7,
        "catalog_sha256": json.loads((workdir / "whole" / "index.json").read_text())["source"]["sha256"]}

    code, out, err = run_cli("merge-index", "parts/3", "parts/1", "parts/2", "--output", "merged", "--engine", "brute")
    assert code == 0, err
    assert "Merged 3 parts: 7 images of 3 items (8-d, brute) embedded by" in out
    whole, merged = (json.loads((workdir / name / "index.json").read_text()) for name in ("whole", "merged"))
    for key in ("embeddings", "embeddings_sha256", "rows", "rows_sha256"):
        assert merged["files"][key] == whole["files"][key]
    assert merged["source"]["sha256"] == whole["source"]["sha256"] and merged["model"] == whole["model"]
    assert (workdir / "merged" / whole["files"]["embeddings"]).read_bytes() == (
        workdir / "whole" / whole["files"]["embeddings"]).read_bytes()
    code, out, err = run_cli("query", "--index", "merged", "data/images/a/2.png", "--k", "1")
    assert code == 0 and out.splitlines()[1].split()[2:] == ["a", "images/a/2.png"]
    assert Index.load(workdir / "merged").part is None
    joined = merge_parts([workdir / "parts" / str(shard) for shard in (1, 2, 3)], "brute").embeddings
    assert isinstance(joined.base, np.memmap) and np.array_equal(joined, Index.load(workdir / "whole").embeddings)

    code, out, err = run_cli("merge-index", "parts/1", "parts/2", "parts/3", "--output", "merged_hnsw",
                             "--engine", "hnsw")
    assert code == 0 and "hnsw (M 16, ef_construction 200, ef 16)" in out and "Recall@10" in out
    assert run_cli("merge-index", "parts/1", "parts/2", "parts/3", "--output", "default")[0] == 0
    assert Index.load(workdir / "default").engine.name == "balltree"  # the parts'


def test_a_finished_shard_is_skipped_and_a_changed_one_redone(workdir, run_cli):
    assert run_cli("index", *SHARD_ARGS, "--shard", "2/3", "--output", "part")[0] == 0
    written = (workdir / "part" / "index.json").stat().st_mtime_ns
    code, out, err = run_cli("index", *SHARD_ARGS, "--shard", "2/3", "--output", "part")
    assert code == 0, err
    assert out.splitlines() == ["Skipped shard 2/3: part already holds it (same model, catalog, shard and --engine)"]
    assert (workdir / "part" / "index.json").stat().st_mtime_ns == written
    for changed in (("--shard", "3/3"), ("--shard", "2/3", "--engine", "brute")):
        code, out, err = run_cli("index", *SHARD_ARGS, *changed, "--output", "part")
        assert code == 0 and out.startswith("Indexed shard"), err


def test_merge_refuses_missing_shards_other_models_and_whole_indexes(workdir, run_cli):
    for shard in (1, 2, 3):
        assert run_cli("index", *SHARD_ARGS, "--shard", f"{shard}/3", "--output", f"parts/{shard}")[0] == 0
    keras.utils.set_random_seed(1)
    build_embedding("small_cnn", 16, 8).save(workdir / "other.keras")
    other = [a if a != "checkpoints/file_saved_by_notebook.hdf5" else "other.keras" for a in SHARD_ARGS]
    assert run_cli("index", *other, "--shard", "2/3", "--output", "other2")[0] == 0
    assert run_cli("index", *SHARD_ARGS, "--output", "whole")[0] == 0
    assert run_cli("index", *SHARD_ARGS[:-1], "4", "--shard", "1/2", "--output", "by4")[0] == 0
    cases = [
        (("parts/1", "parts/3"), r"Expected every shard of 3\. Received: no part for shard 2/3\. Fix: build it with "
                                 r"`index \.\.\. --shard 2/3` and pass every part"),
        (("parts/1", "other2", "parts/3"), r"Expected parts embedded by one model\. Received: other2 by .*other.keras "
                                           r"\(fingerprint \w+\), parts/1 by .*Fix: rebuild other2 with the model"),
        (("parts/1", "parts/2", "parts/2", "parts/3"), r"shard 2/3 twice, in parts/2 and parts/2"),
        (("parts/1", "whole"), r"Expected shard parts\. Received: whole, an index of a whole catalog"),
        (("parts/2", "by4"), r"Expected parts of one split\. Received: by4 is shard 1/2 of batches of 4"),
        (("parts/1", "nowhere"), "nowhere is not an index: no index.json"),
    ]
    for parts, message in cases:
        code, out, err = run_cli("merge-index", *parts, "--output", "merged")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    assert not (workdir / "merged").exists()


@pytest.mark.parametrize(("shard", "message"), [
    ("0/3", r"argument --shard: Expected I/N with 1 <= I <= N \(shards count from 1: 1/4 \.\.\. 4/4\)\. "
            r"Received: '0/3'"),
    ("4/3", r"Received: '4/3'"),
    ("two", r"Received: 'two'"),
    ("5/5", r"Expected --shard I/N with 1 <= I <= N <= 4 \(the catalog's 7 images make 4 batches of --batch-size 2\)\. "
            r"Received: --shard 5/5"),
])
def test_a_bad_shard_is_refused_in_one_line(workdir, run_cli, capsys, shard, message):
    try:
        code, _, err = run_cli("index", *SHARD_ARGS, "--shard", shard)
    except SystemExit as e:  # refused by argparse, before anything runs
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_query_errors_are_one_line(workdir, run_cli):
    assert run_cli("--export", "balltree", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5",
                   "--labeled-data", "data/labeled.json", "--image-dir", "data", "--no-progress")[0] == 0
    (workdir / "broken.png").write_bytes(b"not an image")
    keras.utils.set_random_seed(1)
    build_embedding("small_cnn", 16, 8).save(workdir / "other.keras")
    cases = [
        (("data/images/a/0.png", "--k", "8"), r"Expected 1 <= --k <= 7 \(the index holds 7 images\). Received: 8"),
        (("broken.png",), "broken.png: not an image Pillow can read"),
        (("data/images/a/0.png", "--keras-model", "other.keras"), "built by a different model"),
    ]
    for args, message in cases:
        code, out, err = run_cli("query", "--index", "exports/index", *args)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    code, _, err = run_cli("query", "--index", "nowhere", "data/images/a/0.png")
    assert code == 2 and "nowhere is not an index: no index.json" in err


def test_index_skips_bad_images_when_asked(workdir, run_cli):
    (workdir / "data" / "images" / "a" / "1.png").write_bytes(b"truncated")
    args = ("--export", "balltree", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5",
            "--labeled-data", "data/labeled.json", "--image-dir", "data", "--no-progress")
    code, _, err = run_cli(*args)
    assert code == 2 and "images/a/1.png" in err and "--on-bad-image skip" in err
    code, out, err = run_cli(*args, "--on-bad-image", "skip")
    assert code == 0 and "Indexed 6 images" in out and "Skipping 1 image" in err


def test_similarity_command_like_imagesim(workdir, run_cli):
    images = workdir / "imagesim_images"
    for n, color in enumerate([(200, 30, 30), (190, 40, 35), (20, 30, 200), (25, 35, 190)]):
        write_image(images / f"{'cabin' if n < 2 else 'modern'}{n % 2}.jpg", color, size=(48, 32), fmt="JPEG")
    code, out, err = run_cli("similarity", "--image-dir", images, "--output", "imagesim_out",
                             "--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--no-progress")
    assert code == 0, err
    assert "Wrote 4 similarity files" in out
    entries = json.loads((workdir / "imagesim_out" / "cabin0.json").read_text())
    assert entries[0] == {"similarity": 1.0, "filename": "cabin0"}
    assert {e["filename"] for e in entries} == {"cabin0", "cabin1", "modern0", "modern1"}


def test_evaluate_reports_the_model_its_untrained_baseline_and_raw_pixels(workdir, run_cli):
    args = ("evaluate", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--labeled-data",
            "data/labeled.json", "--image-dir", "data", "--no-progress", "--k", "1", "2", "--pairs", "64")
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    model_report, baseline, pixels = json.loads(out)
    assert model_report["model"]["source"].endswith("file_saved_by_notebook.hdf5")
    assert baseline["model"]["source"] == "untrained copy of the architecture (random weights, seed 0)"
    assert baseline["model"]["fingerprint"] != model_report["model"]["fingerprint"]

    from siamese.retrieval import retrieval_metrics

    catalog = load_catalog(workdir / "data" / "labeled.json", workdir / "data")
    model = keras.saving.load_model(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    want = retrieval_metrics(embed_images(model, list(catalog.paths)), catalog.image_item, (1, 2))
    assert model_report["metrics"] == pytest.approx(want)
    assert set(model_report["threshold"]) >= {"distance", "precision", "recall", "f1"}
    # raw pixels: the images as the model sees them, flattened and L2-normalised, searched the same way
    size = model.input_shape[1]
    assert pixels["model"] == {"source": "raw pixels", "fingerprint": "", "image_size": size,
                               "embedding_dim": size * size * 3}
    raw = np.stack([decode_image(p, size) for p in catalog.paths]).reshape(len(catalog.paths), -1).astype(float)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert pixels["metrics"] == pytest.approx(retrieval_metrics(raw, catalog.image_item, (1, 2)))

    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "precision@1  R-precision        MAP@R     recall@1     recall@2" in out
    assert "untrained copy of the architecture" in out and "Same item when distance <=" in out
    assert "\n  raw pixels " in out
    code, out, err = run_cli(*args, "--json", "--no-pixels", "--no-baseline")
    assert code == 0 and len(json.loads(out)) == 1


def test_the_baseline_is_rebuilt_from_the_training_settings(workdir):
    from siamese.config import TrainConfig
    from siamese.evaluation import untrained_like

    settings = TrainConfig("x.json", "x", image_size=16, embedding_dim=8, seed=3).resolved().to_dict()
    (workdir / "checkpoints" / "file_saved_by_notebook.config.json").write_text(json.dumps(settings))
    _, info = untrained_like(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    assert info.source == "untrained small_cnn (weights none, seed 3)"
    assert (info.image_size, info.embedding_dim) == (16, 8)
    keras.utils.set_random_seed(3)
    assert info.fingerprint == describe(build_embedding("small_cnn", 16, 8), "").fingerprint
