"""The walkthrough notebook runs top to bottom on a real catalog and shows its pictures."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nbformat
import papermill
import pytest

from siamese.embed import Embedder
from siamese.index import Index

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train_siamese.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"]["tags"]


@pytest.mark.slow
def test_notebook_runs_on_digits(digits, tmp_path):
    out = tmp_path / "executed.ipynb"
    checkpoint, export_dir, index_dir = tmp_path / "nb.hdf5", tmp_path / "savedmodel", tmp_path / "index"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), cwd=str(NOTEBOOK.parent), progress_bar=False, kernel_name="python3",
        parameters={"LABELED_DATA": str(digits / "train.json"), "IMAGE_DIR": str(digits), "IMAGE_SIZE": 16,
                    "EPOCHS": 2, "IMAGES_PER_EPOCH": 512, "BATCH_SIZE": 32, "EMBEDDING_DIM": 16,
                    "CHECKPOINT": str(checkpoint), "EXPORT_DIR": str(export_dir), "INDEX_DIR": str(index_dir)},
    )
    cells = nbformat.read(out, as_version=4)["cells"]
    text = "".join(o.get("text", "") for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    assert "10 items, 1,437 images, 0 labels, 0 items with one image" in text
    assert "training: 8 items" in text and "validation: 2 items" in text
    # the P x K batch training draws: 8 items x 4 images, C(4, 2) x 8 = 48 positive pairs of C(32, 2) = 496
    assert "epoch 0, first batch: 32 images of 8 items, 48 positive and 448 negative pairs" in text
    assert "Best val_map_at_r " in text and str(checkpoint) in text
    assert "Retrieval among 2 items" in text and "precision@1" in text
    assert "untrained small_cnn (weights none, seed 0)" in text and "\n  raw pixels " in text
    pictures = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if "image/png" in o.get("data", {})]
    # item grid, batch grid, training curves, distance histograms, neighbour grid, 2-D projection
    assert len(pictures) == 6
    assert h5py.is_hdf5(checkpoint)
    assert (export_dir / "1" / "saved_model.pb").is_file()
    index = Index.load(index_dir)
    assert len(index) == 1437 and index.model["fingerprint"] == Embedder.load(checkpoint).info.fingerprint
