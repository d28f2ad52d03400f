"""Folder similarity (the ImageSim job) on a folder of mixed formats, sizes and a broken file."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from siamese.embed import embed_images
from siamese.errors import SiameseError
from siamese.models import build_embedding
from siamese.similarity import folder_similarity, list_images, output_names
from tests.conftest import write_image


@pytest.fixture
def folder(tmp_path):
    """Seven readable images in five formats and sizes, one broken file, one non-image and a sub-folder."""
    d = tmp_path / "images"
    rng = np.random.default_rng(0)
    specs = [("cabin0.jpg", "JPEG", (40, 30)), ("cabin1.JPEG", "JPEG", (64, 64)), ("modern0.png", "PNG", (20, 50)),
             ("modern1.webp", "WEBP", (33, 33)), ("anim.gif", "GIF", (16, 16)), ("scan.bmp", "BMP", (100, 80)),
             ("cabin0.png", "PNG", (24, 24))]  # same stem as cabin0.jpg
    for name, fmt, size in specs:
        write_image(d / name, tuple(int(c) for c in rng.integers(0, 256, 3)), size=size, fmt=fmt)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    write_image(d / "sub" / "ignored.png")
    return d


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    return build_embedding("small_cnn", 16, 8)


def test_every_readable_image_gets_its_similarities_sorted_itself_first(folder, tmp_path, model):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"Skipping 1 image that cannot be decoded \(first: broken.jpg: "):
        result = folder_similarity(model, folder, out, progress=False)
    names = ["anim", "cabin0.jpg", "cabin0.png", "cabin1", "modern0", "modern1", "scan"]
    assert sorted(result.written) == names
    assert sorted(p.name for p in out.iterdir()) == [".siamese.json", *(f"{n}.json" for n in names)]
    assert [f for f, _ in result.skipped] == ["broken.jpg"]

    files = {n: p for n, p in zip(output_names(list_images(folder)), list_images(folder), strict=True)}
    vectors = embed_images(model, [files[n] for n in names])
    cosine = vectors @ vectors.T
    for i, name in enumerate(names):
        entries = json.loads((out / f"{name}.json").read_text())
        assert entries[0] == {"similarity": 1.0, "filename": name}
        assert sorted(e["filename"] for e in entries) == names
        sims = [e["similarity"] for e in entries]
        assert sims == sorted(sims, reverse=True)
        for e in entries[1:]:
            assert e["similarity"] == round(float(cosine[i, names.index(e["filename"])]), 4)
    run = json.loads((out / ".siamese.json").read_text())
    assert run["written"] == 7 and run["skipped"][0]["file"] == "broken.jpg"


def test_top_k_keeps_the_most_similar(folder, tmp_path, model):
    with pytest.warns(UserWarning):
        folder_similarity(model, folder, tmp_path / "all", progress=False)
        folder_similarity(model, folder, tmp_path / "top", top_k=3, progress=False)
    full = json.loads((tmp_path / "all" / "scan.json").read_text())
    assert json.loads((tmp_path / "top" / "scan.json").read_text()) == full[:3]


def test_names_collide_only_when_stems_do():
    from pathlib import Path

    paths = [Path("a.jpg"), Path("A.png"), Path("b.png"), Path("c.gif")]
    assert output_names(paths) == ["a.jpg", "A.png", "b", "c"]


def test_bad_folders_and_settings_are_refused(tmp_path, model):
    with pytest.raises(SiameseError, match="Expected `image_dir` to be a folder. Received: .*missing"):
        folder_similarity(model, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiameseError, match="holds no images"):
        folder_similarity(model, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SiameseError, match="Expected `top_k` >= 1. Received: 0"):
        folder_similarity(model, tmp_path, tmp_path / "out", top_k=0)
