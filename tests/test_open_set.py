"""Open set: a short run on glyphs of some scripts searches letters of a script it never saw better than the
network it started from and than raw pixels. The full figures are benchmarks/open_set.py's (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_package

from siamese.catalog import load_catalog
from siamese.config import TrainConfig
from siamese.evaluation import RAW_PIXELS, evaluate_models
from siamese.glyphs import FONT_PACKAGES, make_glyphs
from siamese.training import train

pytestmark = pytest.mark.slow  # trains or runs end to end: make test runs it, make test-fast not


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> Path:
    require_package(*FONT_PACKAGES.split())
    out = tmp_path_factory.mktemp("glyphs")
    scripts = {"train": ("latin", "greek", "cyrillic"), "test": ("armenian",)}
    make_glyphs(out, scripts=scripts, max_items_per_script=80, image_size=24, progress=False)
    return out


def test_training_beats_the_untrained_network_on_a_script_it_never_saw(glyphs, tmp_path):
    out = tmp_path / "glyphs.keras"
    config = TrainConfig(labeled_data=str(glyphs / "train.json"), image_dir=str(glyphs), out=str(out), epochs=3,
                         images_per_epoch=4096, image_size=24)
    result = train(config, verbose=0)
    assert result.monitor == "val_map_at_r" and not result.kept_untrained

    test = load_catalog(glyphs / "test.json", glyphs)
    trained, untrained, pixels = evaluate_models(test, out, progress=False)
    assert untrained[0].source.startswith("untrained small_cnn") and pixels[0].source == RAW_PIXELS
    map_at_r = {name: e.metrics["map_at_r"] for name, (_, e) in zip(("trained", "untrained", "pixels"),
                                                                    (trained, untrained, pixels), strict=True)}
    assert map_at_r["trained"] > map_at_r["untrained"] + 0.05, map_at_r
    assert map_at_r["trained"] > map_at_r["pixels"] + 0.05, map_at_r
