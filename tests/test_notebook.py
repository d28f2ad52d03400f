"""The walkthrough notebook runs top to bottom on a real catalog and shows its pictures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train_siamese.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"]["tags"]


def test_notebook_runs_on_digits(digits, tmp_path):
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), cwd=str(NOTEBOOK.parent), progress_bar=False, kernel_name="python3",
        parameters={"LABELED_DATA": str(digits / "train.json"), "IMAGE_DIR": str(digits), "IMAGE_SIZE": 32},
    )
    cells = nbformat.read(out, as_version=4)["cells"]
    text = "".join(o.get("text", "") for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    assert "10 items, 1,437 images, 0 labels, 0 items with one image" in text
    assert "training: 8 items" in text and "validation: 2 items" in text
    assert "epoch 0: 8 positive and 8 negative pairs" in text
    pictures = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # the item grid and the pair grid
