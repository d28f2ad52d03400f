"""The public API: README.md's Python example of the whole job runs as written, and light modules stay light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_siamese_and_its_catalog_loads_no_tensorflow():
    code = ("import sys, siamese, siamese.catalog; siamese.load_catalog; siamese.TrainConfig\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
            "assert not heavy, heavy[:5]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_an_unknown_name_is_an_attribute_error():
    import siamese

    with pytest.raises(AttributeError, match="module 'siamese' has no attribute 'trian'"):
        siamese.trian  # noqa: B018


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"^## Python\n.*?```python\n(.*?)```", readme, re.S | re.M).group(1)
    assert len(example.strip().splitlines()) <= 14, "the example stays short"
    (tmp_path / "example.py").write_text(example)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert (tmp_path / "exports" / "digits-index" / "index.json").is_file()
    assert (tmp_path / "exports" / "digits-savedmodel" / "1" / "saved_model.pb").is_file()
    assert "precision@1" in out and "digit_" in out
