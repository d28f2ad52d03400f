"""make_glyphs: an Omniglot-style catalog of letters drawn by the installed fonts, split by script."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import require_package
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from PIL import Image

from siamese.catalog import load_catalog
from siamese.datasets import make_dataset
from siamese.errors import SiameseError
from siamese.glyphs import FONT_PACKAGES, MIN_IMAGES, SCRIPTS, find_fonts, has_glyph, make_glyphs

SMALL = {"train": ("latin", "cyrillic"), "test": ("armenian",)}
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
LIBERATION = Path("/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf")
ITEM_ID = re.compile(r"([a-z]+)-([0-9A-F]{4,})")


@pytest.fixture(scope="session")
def fonts():
    """The installed fonts of the five font packages (make test installs them; see `require_package`)."""
    require_package(*FONT_PACKAGES.split())
    fonts = find_fonts()
    assert len(fonts) >= 50 and DEJAVU.is_file() and LIBERATION.is_file()
    return fonts


@pytest.fixture(scope="session")
def glyphs(fonts, tmp_path_factory) -> Path:
    """A small catalog: the first 30 letters of latin and cyrillic (train) and of armenian (test)."""
    out = tmp_path_factory.mktemp("glyphs")
    make_glyphs(out, scripts=SMALL, max_items_per_script=30, progress=False)
    return out


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_counts_and_files_match_the_json(glyphs):
    source = read(glyphs, "source.json")
    on_disk = {str(p.relative_to(glyphs)) for p in (glyphs / "images").rglob("*.png")}
    listed = set()
    for split in ("train", "test"):
        catalog = load_catalog(glyphs / f"{split}.json", glyphs)
        assert all(len(item.filenames) >= MIN_IMAGES and item.labels == () for item in catalog.items)
        assert source["splits"][split]["items"] == len(catalog)
        assert source["splits"][split]["images"] == len(catalog.filenames)
        listed |= set(catalog.filenames)
    assert listed == on_disk
    assert 40 <= source["splits"]["train"]["items"] <= 60 and 25 <= source["splits"]["test"]["items"] <= 30
    assert source["seed"] == 0 and source["image_size"] == 32


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_item_ids_name_letters_of_disjoint_scripts(glyphs):
    scripts = {}
    for split, names in SMALL.items():
        ids = list(read(glyphs, f"{split}.json"))
        for item_id in ids:
            script, hex_code = ITEM_ID.fullmatch(item_id).groups()
            cp = int(hex_code, 16)
            assert script in names and any(a <= cp <= b for a, b in SCRIPTS[script])
            assert unicodedata.category(chr(cp)).startswith("L")
        scripts[split] = {i.split("-")[0] for i in ids}
    assert scripts == {"train": {"latin", "cyrillic"}, "test": {"armenian"}}
    train = read(glyphs, "train.json")
    # Cyrillic A (U+0410) is Latin A in every font: an impossible negative pair, so it is dropped; Be is kept.
    assert "latin-0041" in train and "cyrillic-0410" not in train and "cyrillic-0411" in train


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_images_are_distinct_dark_glyphs_on_white(glyphs):
    for split in ("train", "test"):
        for item in read(glyphs, f"{split}.json").values():
            files = [(glyphs / image["filename"]).read_bytes() for image in item["images"]]
            assert len({hashlib.sha256(f).digest() for f in files}) == len(files)
            pixels = np.asarray(Image.open(glyphs / item["images"][0]["filename"]))
            assert pixels.shape == (32, 32) and pixels.min() < 100 and np.median(pixels) > 200


def test_every_image_is_a_real_glyph_of_its_font(glyphs, fonts):
    source = read(glyphs, "source.json")
    cmaps = {(f.path, f.index): f.cmap for f in fonts}
    drawn = [(item_id, source["fonts"][f]) for item_id, used in source["item_fonts"].items() for f in used]
    for item_id, font in drawn:
        assert int(item_id.split("-")[1], 16) in cmaps[Path(font["file"]), font["index"]]
    for item_id, font in drawn[::40]:
        assert has_glyph(font["file"], chr(int(item_id.split("-")[1], 16)), font["index"])


def test_has_glyph_with_installed_fonts(fonts):
    assert has_glyph(DEJAVU, "A") and has_glyph(LIBERATION, "A")
    assert not has_glyph(DEJAVU, "\u1200")  # DejaVu has no Ethiopic
    assert not has_glyph(LIBERATION, "\u0531")  # nor Liberation Armenian


def _box(pen: TTGlyphPen, x0: int, y0: int, x1: int, y1: int) -> None:
    pen.moveTo((x0, y0))
    pen.lineTo((x0, y1))
    pen.lineTo((x1, y1))
    pen.lineTo((x1, y0))
    pen.closePath()


def build_font(path: Path, family: str, names: dict[str, str]) -> Path:
    """A TrueType font whose .notdef is a box, mapping char -> glyph name; glyphs named "box", "A" or
    "a10" draw the same box as .notdef, a triangle, or the triangle; "empty" draws nothing."""
    order = [".notdef", *dict.fromkeys(names.values())]
    glyphs = {}
    for name in order:
        pen = TTGlyphPen(None)
        if name in (".notdef", "box"):
            _box(pen, 50, 0, 450, 700)
        elif name != "empty":
            pen.moveTo((50, 0))
            pen.lineTo((250, 700))
            pen.lineTo((450, 0))
            pen.closePath()
        glyphs[name] = pen.glyph()
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({ord(c): name for c, name in names.items()})
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({name: (500, 0 if name == "empty" else 50) for name in order})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    fb.save(str(path))
    return path


def test_a_missing_empty_or_tofu_glyph_is_not_real(tmp_path):
    font = build_font(tmp_path / "made.ttf", "Made", {"A": "A", "B": "empty", "C": "box"})
    assert has_glyph(font, "A")
    assert not has_glyph(font, "B"), "draws nothing"
    assert not has_glyph(font, "C"), "draws the .notdef box"
    assert not has_glyph(font, "D"), "not in the cmap"


def test_find_fonts_skips_broken_duplicate_and_symbol_fonts(tmp_path):
    build_font(tmp_path / "a.ttf", "Made", {"A": "A"})
    build_font(tmp_path / "b.otf", "Made", {"A": "A"})  # the same family and style again
    build_font(tmp_path / "c.ttf", "Pictures", {"A": "a10", "B": "box"})  # letters mapped to pictures
    (tmp_path / "d.ttf").write_bytes(b"not a font")
    (tmp_path / "e.t1").write_bytes(b"a Type 1 font")
    assert [(f.path.name, f.family) for f in find_fonts([tmp_path])] == [("a.ttf", "Made")]
    assert not has_glyph(tmp_path / "c.ttf", "A")


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_same_seed_same_bytes_other_seed_other_bytes(fonts, tmp_path):
    def files(seed: int, name: str) -> dict[str, bytes]:
        out = tmp_path / name
        make_glyphs(out, seed=seed, scripts={"train": ("latin",), "test": ("georgian",)}, max_items_per_script=4,
                    progress=False)
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = files(0, "a"), files(0, "b"), files(1, "c")
    assert first == again
    pngs = [name for name in first if name.endswith(".png")]
    assert len(pngs) > 100 and not any(first[name] == other.get(name) for name in pngs)


def test_make_dataset_dispatches_seed_and_image_size(fonts, tmp_path):
    written = make_dataset("glyphs", tmp_path, limit=2, progress=False, seed=3, image_size=16)
    assert set(written) == {"train", "test"}
    source = read(tmp_path, "source.json")
    assert source["seed"] == 3 and source["image_size"] == 16
    first = next(iter(read(tmp_path, "test.json").values()))["images"][0]["filename"]
    assert Image.open(tmp_path / first).size == (16, 16)
    with pytest.raises(SiameseError, match="Expected `image_size` only with `source='glyphs'`. Received: `source=dig"):
        make_dataset("digits", tmp_path, image_size=16)


def test_too_few_fonts_names_the_packages(tmp_path):
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    fix = "Fix: apt-get install fonts-noto-core fonts-dejavu-core fonts-freefont-ttf fonts-liberation2 fonts-urw-base35"
    message = f"Expected at least 1,000 train letters .* Received: 0 from 0 usable fonts. {fix}$"
    with pytest.raises(SiameseError, match=message):
        make_glyphs(tmp_path / "out", font_dirs=[empty], progress=False)
    with pytest.raises(SiameseError, match="Expected at least 2 train letters drawn by 5[+] fonts each"):
        make_glyphs(tmp_path / "out", font_dirs=[empty], scripts=SMALL, progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(SiameseError, match="Expected `image_size` >= 8. Received: 4"):
        make_glyphs(tmp_path, image_size=4)
    with pytest.raises(SiameseError, match="Expected `seed` >= 0. Received: -1"):
        make_glyphs(tmp_path, seed=-1)
    with pytest.raises(SiameseError, match="Expected scripts from latin, greek, .*. Received: 'klingon'"):
        make_glyphs(tmp_path, scripts={"train": ("klingon",)})
    with pytest.raises(SiameseError, match="Expected each script in one split only. Received: 'latin' more than once"):
        make_glyphs(tmp_path, scripts={"train": ("latin",), "test": ("latin",)})
