"""make-dataset: real data with no download, round-tripped into validate."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import require_package
from PIL import Image

from siamese.catalog import load_catalog
from siamese.datasets import FASHION_MNIST_CLASSES, find_fashion_mnist, make_dataset, read_idx
from siamese.errors import SiameseError


def test_digits_round_trip_into_validate(digits, run_cli):
    train = json.loads((digits / "train.json").read_text())
    assert sorted(train) == [f"digit_{d}" for d in range(10)]
    code, out, err = run_cli("validate", "--labeled-data", digits / "train.json", "--image-dir", digits,
                             "--no-progress")
    assert code == 0, err
    assert "Summary: 10 items, 1,437 images, 0 labels, 0 items with one image" in out
    assert "Split (--val-fraction 0.2, --seed 0): 8 training items" in out
    test = load_catalog(digits / "test.json", digits)
    assert len(test.filenames) == 360
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for filename in test.filenames[::40]:
        index = 1437 + int(filename.rsplit("/", 1)[1].removesuffix(".png"))
        assert filename.startswith(f"images/test/digit_{bunch.target[index]}/")
        pixels = np.asarray(Image.open(digits / filename))
        assert (pixels == np.rint(bunch.images[index] * 255 / 16).astype(np.uint8)).all()


def test_cli_make_dataset_with_limit(tmp_path, run_cli):
    code, out, _ = run_cli("make-dataset", "--source", "digits", "--output", tmp_path, "--limit", "50", "--no-progress")
    assert code == 0
    assert f"Next: python utilities.py validate --labeled-data {tmp_path / 'train.json'} --image-dir {tmp_path}" in out
    catalog = load_catalog(tmp_path / "train.json", tmp_path)
    assert len(catalog.filenames) == 50
    assert json.loads((tmp_path / "source.json").read_text())["limit"] == 50


def test_fashion_mnist_from_the_debian_package(tmp_path):
    require_package("dataset-fashion-mnist")
    written = make_dataset("fashion-mnist", tmp_path, limit=300, progress=False)
    catalog = load_catalog(written["train"], tmp_path)
    assert {i.id for i in catalog.items} == set(FASHION_MNIST_CLASSES)
    assert len(catalog.filenames) == 300
    folder = find_fashion_mnist()
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")[:300]
    pixels = read_idx(folder / "train-images-idx3-ubyte.gz")[:300]
    assert labels.shape == (300,) and pixels.shape == (300, 28, 28)
    name = f"images/train/{FASHION_MNIST_CLASSES[labels[7]]}/00007.png"
    assert (np.asarray(Image.open(tmp_path / name)) == pixels[7]).all()


def test_idx_files_are_checked(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(SiameseError, match="is not an unsigned-byte IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(b"\0\0\x08\x01" + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(SiameseError, match="is truncated: expected 10 values, found 2"):
        read_idx(short)


def test_unknown_source_and_bad_limit(tmp_path):
    message = "Expected `source` to be one of fashion-mnist, digits, glyphs. Received: 'cifar'"
    with pytest.raises(SiameseError, match=message):
        make_dataset("cifar", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(SiameseError, match="Expected `limit` >= 2. Received: 1"):
        make_dataset("digits", tmp_path, limit=1)
