"""make demo's job, end to end on digits in a short run: every step writes what it says."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from siamese.errors import SiameseError
from siamese.index import Index

pytestmark = pytest.mark.slow  # trains or runs end to end: make test runs it, make test-fast not


def test_demo_runs_every_step_and_says_where_everything_went(tmp_path, run_cli):
    out = tmp_path / "demo"
    code, stdout, err = run_cli("demo", "--output", out, "--source", "digits", "--epochs", "1",
                                "--images-per-epoch", "1024", "--no-progress")
    assert code == 0, err
    for n in range(1, 9):
        assert f"\n== {n}. " in stdout
    assert "Using digits" in stdout and "== Done in" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits" and set(summary["seconds"]) >= {"1", "3", "8", "total"}
    assert 0 < summary["evaluation"]["trained"]["metrics"]["precision_at_1"] <= 1
    assert (out / "checkpoints" / "digits.keras").is_file()
    assert (out / "checkpoints" / "digits.config.json").is_file()
    assert (out / "exports" / "savedmodel" / "1" / "saved_model.pb").is_file()
    assert len(Index.load(out / "exports" / "index")) == 1437
    with Image.open(out / "query_results.png") as picture:
        assert picture.width > 800 and picture.height > 600
    assert len(list((out / "similarity_out").glob("digit_*.json"))) == 8
    assert json.loads((out / "demo.config.json").read_text())["epochs"] == 1


def test_demo_never_clears_a_folder_that_is_not_its_own(tmp_path):
    from siamese.demo import DemoConfig, run_demo

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SiameseError, match="is not a demo folder. Fix: pass another `out`"):
        run_demo(DemoConfig(out=str(tmp_path)))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
