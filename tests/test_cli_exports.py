"""The seed's export and indexing commands as written, then query and similarity, end to end from the CLI."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

from siamese.catalog import load_catalog
from siamese.embed import describe, embed_images
from siamese.index import Index
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


def test_seed_export_savedmodel_with_a_trained_model(workdir, run_cli):
    code, out, err = run_cli("--export", "savedmodel", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5")
    assert code == 0, err
    assert (workdir / "exports" / "savedmodel" / "1" / "saved_model.pb").is_file()
    assert "exports/savedmodel/1" in out
    code, out, err = run_cli("--export", "savedmodel", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5")
    assert code == 0 and (workdir / "exports" / "savedmodel" / "2" / "saved_model.pb").is_file()


def test_seed_export_savedmodel_of_a_pretrained_backbone(workdir, run_cli):
    code, _, err = run_cli("--export", "savedmodel", *PRETRAINED_OFFLINE, "--output", "pretrained")
    assert code == 0, err
    info = json.loads((workdir / "pretrained" / "1" / "siamese.json").read_text())
    assert info["embedding_dim"] == 1280 and info["image_size"] == 32


def test_seed_index_commands_with_a_trained_model_then_query(workdir, run_cli):
    code, out, err = run_cli("--export", "balltree", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5",
                             "--labeled-data", "data/labeled.json", "--image-dir", "data", "--no-progress")
    assert code == 0, err
    assert "Indexed 7 images of 3 items (8-d, balltree)" in out
    index = Index.load(workdir / "exports" / "index")
    assert index.backend == "balltree" and index.items == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    catalog = load_catalog(workdir / "data" / "labeled.json", workdir / "data")
    model = keras.saving.load_model(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    np.testing.assert_allclose(index.embeddings, embed_images(model, list(catalog.paths)), atol=1e-5)

    query = str(workdir / "data" / "images" / "b" / "1.png")
    code, out, err = run_cli("query", "--index", "exports/index", query, "--k", "2", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer[0]["query"] == query
    first = answer[0]["neighbours"][0]
    assert (first["item"], first["filename"], first["labels"]) == ("b", "images/b/1.png", ["red"])
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)

    code, out, err = run_cli("query", "--index", "exports/index", query, "--k", "3", "--by-item")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == query and len(lines) == 4
    assert sorted(line.split()[2] for line in lines[1:]) == ["a", "b", "c"]


def test_seed_index_commands_with_a_pretrained_backbone_and_brute(workdir, run_cli):
    code, out, err = run_cli("--export", "balltree", "--labeled-data", "data/labeled.json", "--image-dir", "data",
                             *PRETRAINED_OFFLINE, "--index", "brute", "--output", "brute", "--no-progress")
    assert code == 0, err
    assert "(1280-d, brute) embedded by pretrained mobilenet_v2 (weights none)" in out
    code, out, err = run_cli("query", "--index", "brute", "data/images/c/0.png", "--k", "1")
    assert code == 0, err
    assert out.splitlines()[1].split()[2:] == ["c", "images/c/0.png"]


def test_query_errors_are_one_line(workdir, run_cli):
    assert run_cli("--export", "balltree", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5",
                   "--labeled-data", "data/labeled.json", "--image-dir", "data", "--no-progress")[0] == 0
    (workdir / "broken.png").write_bytes(b"not an image")
    keras.utils.set_random_seed(1)
    build_embedding("small_cnn", 16, 8).save(workdir / "other.keras")
    cases = [
        (("data/images/a/0.png", "--k", "8"), r"Expected 1 <= k <= 7 \(the index holds 7 images\). Received: 8"),
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
    code, out, err = run_cli("similarity", "--image-dir", images, "--out", "imagesim_out",
                             "--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--no-progress")
    assert code == 0, err
    assert "Wrote 4 similarity files" in out
    entries = json.loads((workdir / "imagesim_out" / "cabin0.json").read_text())
    assert entries[0] == {"similarity": 1.0, "filename": "cabin0"}
    assert {e["filename"] for e in entries} == {"cabin0", "cabin1", "modern0", "modern1"}


def test_evaluate_reports_the_model_and_its_untrained_baseline(workdir, run_cli):
    args = ("evaluate", "--keras-model", "checkpoints/file_saved_by_notebook.hdf5", "--labeled-data",
            "data/labeled.json", "--image-dir", "data", "--no-progress", "--k", "1", "2", "--pairs", "64")
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    model_report, baseline = json.loads(out)
    assert model_report["model"]["source"].endswith("file_saved_by_notebook.hdf5")
    assert baseline["model"]["source"] == "untrained copy of the architecture (random weights, seed 0)"
    assert baseline["model"]["fingerprint"] != model_report["model"]["fingerprint"]

    from siamese.evaluate import retrieval_metrics

    catalog = load_catalog(workdir / "data" / "labeled.json", workdir / "data")
    model = keras.saving.load_model(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    want = retrieval_metrics(embed_images(model, list(catalog.paths)), catalog.image_item, (1, 2))
    assert model_report["metrics"] == pytest.approx(want)
    assert set(model_report["threshold"]) >= {"distance", "precision", "recall", "f1"}

    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "precision@1  R-precision        MAP@R     recall@1     recall@2" in out
    assert "untrained copy of the architecture" in out and "Same item when distance <=" in out


def test_the_baseline_is_rebuilt_from_the_training_settings(workdir):
    from siamese.config import TrainConfig
    from siamese.embed import untrained_like

    settings = TrainConfig("x.json", "x", image_size=16, embedding_dim=8, seed=3).resolved().to_dict()
    (workdir / "checkpoints" / "file_saved_by_notebook.config.json").write_text(json.dumps(settings))
    _, info = untrained_like(workdir / "checkpoints" / "file_saved_by_notebook.hdf5")
    assert info.source == "untrained small_cnn (weights none, seed 3)"
    assert (info.image_size, info.embedding_dim) == (16, 8)
    keras.utils.set_random_seed(3)
    assert info.fingerprint == describe(build_embedding("small_cnn", 16, 8), "").fingerprint
