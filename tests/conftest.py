"""Shared fixtures: an isolated cache folder, image and catalog writers, a digits catalog, the CLI, a free port, and
`require_package` for the tests that read a Debian package."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamese import cli
from siamese.datasets import make_dataset

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "scripts" / "packages.txt"
STRICT = "SIAMESE_TESTS_STRICT"
"""Set to 1 (.ci/run does), a test whose Debian package is missing fails instead of skipping."""


def debian_packages(path: Path = PACKAGES) -> dict[str, Path]:
    """{package: the file that shows it is installed} of scripts/packages.txt, the one list of them."""
    rows = (line.split(maxsplit=3) for line in path.read_text().splitlines())
    return {row[1]: Path(row[2]) for row in rows if row and not row[0].startswith("#")}


def require_package(*names: str, packages: dict[str, Path] | None = None) -> None:
    """Skip the calling test unless Debian's packages `names` are installed, naming them and the command that
    installs them; under SIAMESE_TESTS_STRICT=1 fail instead, so CI cannot pass with a part of the suite skipped."""
    packages = debian_packages() if packages is None else packages
    missing = [name for name in names if not packages[name].exists()]
    if not missing:
        return
    files = ", ".join(str(packages[name]) for name in missing)
    fix = f"apt-get install {' '.join(missing)} (make test installs them where it can: scripts/debian-packages.sh)"
    if os.environ.get(STRICT) == "1":
        pytest.fail(f"Debian package {', '.join(missing)} is not installed ({files} is missing), and {STRICT}=1 "
                    f"allows no skip. Fix: {fix}", pytrace=False)
    pytest.skip(f"needs Debian's {', '.join(missing)}: {fix}")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty siamese cache folder."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SIAMESE_CACHE_DIR", str(path))
    return path


def write_image(path: Path, color=(255, 0, 0), size=(16, 16), mode="RGB", fmt=None, **save) -> Path:
    """Write a solid image with Pillow (any mode Pillow can save) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **save)
    return path


def write_catalog(root: Path, items: dict, name: str = "labeled.json") -> Path:
    """Write `items` as the labeled JSON at root/name; return its path."""
    path = root / name
    path.write_text(json.dumps(items))
    return path


def solid_catalog(root: Path, spec: dict[str, tuple[int, list[str]]]) -> Path:
    """Items with `n` distinct solid-colour PNGs each: spec = {item_id: (n_images, labels)}."""
    rng = np.random.default_rng(0)
    items = {}
    for item_id, (n, labels) in spec.items():
        files = []
        for k in range(n):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            image = write_image(root / "images" / item_id / f"{k}.png", color)
            files.append({"filename": str(image.relative_to(root))})
        items[item_id] = {"images": files, "labels": labels}
    return write_catalog(root, items)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits written by make-dataset (train.json, test.json, images/)."""
    out = tmp_path_factory.mktemp("digits")
    make_dataset("digits", out, progress=False)
    return out


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
