"""A glyph catalog, Omniglot-style, drawn from the fonts installed on this machine: no download.

An item is one letter (`latin-0041` is "A"); its images are that letter drawn by each installed font with a
real glyph for it (at most `MAX_FONTS_PER_ITEM`, picked with the seed), each slightly scaled, rotated and
shifted. Items have no labels, so any two letters are a negative pair. Like Omniglot's background and
evaluation alphabets, the splits hold disjoint scripts (`SPLITS`, over the Unicode blocks of `SCRIPTS`).

`make_glyphs(out)` writes `out/images/{train,test}/<item>/<n>.png`, `out/train.json`, `out/test.json` and
`out/source.json` (the fonts, scripts, counts, and which font drew each image). The output is a pure
function of the seed and the installed fonts.
"""

from __future__ import annotations

import hashlib
import os
import string
import threading
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont, ImageOps

from siamese import atomic
from siamese.errors import SiameseError
from siamese.util import parallel_map, plural

SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    # script: its Unicode blocks (first, last codepoint); only their letters are drawn (see `is_letter`).
    "latin": ((0x0000, 0x024F),),  # Basic Latin, Latin-1 Supplement, Latin Extended-A and -B
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),  # Greek and Coptic, Greek Extended
    "cyrillic": ((0x0400, 0x052F),),  # Cyrillic, Cyrillic Supplement
    "armenian": ((0x0530, 0x058F),),
    "hebrew": ((0x0590, 0x05FF),),
    "arabic": ((0x0600, 0x06FF),),
    "devanagari": ((0x0900, 0x097F),),
    "bengali": ((0x0980, 0x09FF),),
    "thai": ((0x0E00, 0x0E7F),),
    "lao": ((0x0E80, 0x0EFF),),
    "georgian": ((0x10D0, 0x10FF),),  # Mkhedruli; fonts disagree on how to draw the old capitals 10A0-10C5
    "ethiopic": ((0x1200, 0x139F),),  # Ethiopic, Ethiopic Supplement
    "cherokee": ((0x13A0, 0x13FF),),
    "canadian": ((0x1400, 0x167F),),  # Unified Canadian Aboriginal Syllabics
    "tifinagh": ((0x2D30, 0x2D7F),),
}
# With the five font packages (FONT_PACKAGES) installed: 1,115 train letters (21,460 images) and 360 test letters
# (5,033 images). The other scripts of SCRIPTS are there for make_glyphs(scripts=...).
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("latin", "greek", "cyrillic", "arabic"),
    "test": ("armenian", "georgian", "hebrew", "devanagari", "thai", "cherokee"),
}
MIN_ITEMS = {"train": 1000, "test": 300}
"""Fewest items the default catalog (`SPLITS`, every letter) must reach, else too few fonts are installed."""
MIN_IMAGES = 5
"""Letters drawn by fewer fonts than this are dropped."""
MAX_FONTS_PER_ITEM = 20
FONT_DIRS = (Path("/usr/share/fonts"),)
FONT_PACKAGES = "fonts-noto-core fonts-dejavu-core fonts-freefont-ttf fonts-liberation2 fonts-urw-base35"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")  # not .t1/.pfb: fonts-urw-base35 ships each face as .otf too
SUPERSAMPLE = 4  # draw at 4x the image size, then downsample with LANCZOS
EM_SCALE = (0.9, 1.1)  # the font's em square is 90-110% of the image: capitals fill ~65-80% of it
MAX_FILL = 0.9  # and no glyph more than 90%
MAX_ANGLE = 8.0  # degrees either way
MAX_SHIFT = 0.05  # of the image side, either way
CHECK_SIZE = 64  # pixels per em when telling real glyphs from .notdef boxes
_NOTDEF = chr(0x10FFFF)  # a noncharacter: no font maps it, so it draws the font's .notdef box


@dataclass(frozen=True)
class Font:
    """One usable face of an installed font file."""

    path: Path
    index: int  # face index within a .ttc collection
    family: str
    style: str
    cmap: frozenset[int]
    notdef: Image.Image | None  # ink of its .notdef box at CHECK_SIZE (None: it draws nothing)

    def face(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at `size` pixels per em, with Pillow's basic layout (one glyph per codepoint)."""
        return ImageFont.truetype(str(self.path), size, index=self.index, layout_engine=ImageFont.Layout.BASIC)


def is_letter(codepoint: int) -> bool:
    """A letter (Unicode category Lu, Ll, Lt or Lo) that is its own NFKC form.

    This leaves out marks, controls, spaces, digits, punctuation, modifier letters, and duplicates such as
    U+1F71 (= U+03AC) or U+00B5 MICRO SIGN (= Greek mu).
    """
    char = chr(codepoint)
    return unicodedata.category(char) in ("Lu", "Ll", "Lt", "Lo") and unicodedata.normalize("NFKC", char) == char


def ink(face: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """`char` drawn by `face` as a mask (ink 255 on 0) cropped to its ink, or None when it draws nothing."""
    left, top, right, bottom = face.getbbox(char)
    if right <= left or bottom <= top:
        return None
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), char, font=face, fill=255)
    box = mask.getbbox()
    return mask.crop(box) if box else None


def _same_drawing(mask: Image.Image, other: Image.Image | None) -> bool:
    """Whether two ink masks draw the same thing: their sizes within a pixel and their pixels within 8/255 on
    average (the hinting of a glyph can move an edge: FreeType autohints a mapped glyph and .notdef apart)."""
    if other is None or max(abs(a - b) for a, b in zip(mask.size, other.size, strict=True)) > 1:
        return False
    difference = np.asarray(mask.resize(other.size), np.int16) - np.asarray(other, np.int16)
    return float(np.abs(difference).mean()) < 8


def _real_glyph(font: Font, face: ImageFont.FreeTypeFont, codepoint: int) -> str | None:
    """A short hash of `font`'s drawing of `codepoint` (`face` is at CHECK_SIZE), or None unless it is a
    real glyph: mapped by the font's cmap, drawing ink, and not its .notdef box."""
    mask = ink(face, chr(codepoint)) if codepoint in font.cmap else None
    if mask is None or _same_drawing(mask, font.notdef):
        return None
    return hashlib.blake2b(b"%dx%d" % mask.size + mask.tobytes(), digest_size=8).hexdigest()


def _open_faces(path: Path) -> list[Font]:
    """The faces of one font file (every face of a .ttc); raises whatever fontTools or Pillow raise.

    Symbol fonts are left out (see `find_fonts`).
    """
    with TTCollection(path, lazy=True) if path.suffix.lower() == ".ttc" else TTFont(path, lazy=True) as opened:
        faces = [(tt["name"], tt.getBestCmap()) for tt in getattr(opened, "fonts", [opened])]
    fonts = []
    for index, (names, cmap) in enumerate(faces):
        named = [cmap[ord(c)] == c for c in string.ascii_letters if ord(c) in cmap]
        if cmap and not (named and not any(named)):
            font = Font(path, index, names.getBestFamilyName() or path.stem, names.getBestSubFamilyName() or "",
                        frozenset(cmap), None)
            fonts.append(replace(font, notdef=ink(font.face(CHECK_SIZE), _NOTDEF)))
    return fonts


def find_fonts(font_dirs: Sequence[str | os.PathLike] = FONT_DIRS) -> list[Font]:
    """Every TrueType/OpenType face under `font_dirs` that fontTools and Pillow open, one per (family, style).

    Files are visited in sorted order; unreadable ones are skipped, and so is a face seen before (the same
    family and style in another file or format) and a symbol font: one that maps ASCII letters to pictures or
    Greek (URW's Dingbats, Standard Symbols PS), as shown by naming none of those glyphs after the letter
    ("A" is named "a10" or "Alpha").
    """
    files = sorted({p for d in font_dirs for p in Path(d).rglob("*") if p.suffix.lower() in FONT_SUFFIXES})
    fonts, seen = [], set()
    for path in files:
        try:
            faces = _open_faces(path)
        except Exception:  # a broken or unsupported font file is skipped, whatever fontTools or Pillow raise
            continue
        for font in faces:
            if (font.family, font.style) not in seen:
                seen.add((font.family, font.style))
                fonts.append(font)
    return fonts


def has_glyph(path: str | os.PathLike, char: str, index: int = 0) -> bool:
    """Whether face `index` of the font file at `path` has a real glyph for `char`.

    Real means: in the font's best cmap, and drawing some ink unlike its .notdef (tofu) box. A symbol font
    (see `find_fonts`) has none.
    """
    fonts = [f for f in _open_faces(Path(path)) if f.index == index]
    return bool(fonts) and _real_glyph(fonts[0], fonts[0].face(CHECK_SIZE), ord(char)) is not None


def _draw(face: ImageFont.FreeTypeFont, char: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """`char` dark on white, centred by its ink, randomly scaled, rotated and shifted (`face` at 4x size)."""
    big = image_size * SUPERSAMPLE
    scale, angle, dx, dy = rng.uniform((EM_SCALE[0], -MAX_ANGLE, -MAX_SHIFT, -MAX_SHIFT),
                                       (EM_SCALE[1], MAX_ANGLE, MAX_SHIFT, MAX_SHIFT))
    glyph = ink(face, char).rotate(angle, Image.Resampling.BICUBIC, expand=True)
    glyph = glyph.crop(glyph.getbbox())
    scale = min(scale, MAX_FILL * big / max(glyph.size))
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    canvas = Image.new("L", (big, big))
    x = min(max(round((big - glyph.width) / 2 + dx * big), 0), big - glyph.width)
    y = min(max(round((big - glyph.height) / 2 + dy * big), 0), big - glyph.height)
    canvas.paste(glyph, (x, y))
    return ImageOps.invert(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS))


def _drop_homoglyphs(found: list[tuple[str, int, dict[int, str]]]) -> list[tuple[str, int, dict[int, str]]]:
    """Drop each letter drawn identically to an earlier kept one by at least half the fonts both have
    (Latin A U+0041, Greek Alpha U+0391 and Cyrillic A U+0410 are one shape: they cannot be a negative pair)."""
    kept, owners = [], {}  # owners: (font, digest) -> indices into kept
    for entry in found:
        digests = entry[2]
        same = Counter(k for f, d in digests.items() for k in owners.get((f, d), ()))
        if any(2 * n >= len(digests.keys() & kept[k][2].keys()) for k, n in same.items()):
            continue
        for f, d in digests.items():
            owners.setdefault((f, d), []).append(len(kept))
        kept.append(entry)
    return kept


def make_glyphs(out: str | os.PathLike, seed: int = 0, image_size: int = 32, progress: bool = True,
                scripts: Mapping[str, Sequence[str]] | None = None, max_items_per_script: int | None = None,
                font_dirs: Sequence[str | os.PathLike] = FONT_DIRS) -> dict[str, Path]:
    """Write the glyph catalog under `out` and return its JSON path per split.

    `scripts` maps each split to its script names (default `SPLITS`); `max_items_per_script` keeps the
    first N letters of each script (default all), for small catalogs; fonts are looked for under
    `font_dirs` (default /usr/share/fonts). The default catalog must reach `MIN_ITEMS`, a smaller one two
    items per split; else the error names the Debian font packages to install.
    """
    if image_size < 8:
        raise SiameseError(f"Expected `image_size` >= 8. Received: {image_size}")
    if seed < 0:
        raise SiameseError(f"Expected `seed` >= 0. Received: {seed}")
    splits = dict(SPLITS if scripts is None else scripts)
    names = [s for split in splits.values() for s in split]
    if unknown := [s for s in names if s not in SCRIPTS]:
        raise SiameseError(f"Expected scripts from {', '.join(SCRIPTS)}. Received: {unknown[0]!r}")
    if twice := [s for s, n in Counter(names).items() if n > 1]:
        raise SiameseError(f"Expected each script in one split only. Received: {twice[0]!r} more than once")
    floors = MIN_ITEMS if scripts is None and max_items_per_script is None else {}
    fonts = find_fonts(font_dirs)
    local = threading.local()  # Pillow faces are not shared between threads

    def face(f: int, size: int) -> ImageFont.FreeTypeFont:
        faces = local.__dict__.setdefault("faces", {})
        if (f, size) not in faces:
            faces[f, size] = fonts[f].face(size)
        return faces[f, size]

    def check(item: tuple[str, int, list[int]]) -> tuple[str, int, dict[int, str]]:
        script, cp, candidates = item
        digests = {f: _real_glyph(fonts[f], face(f, CHECK_SIZE), cp) for f in candidates}
        return script, cp, {f: d for f, d in digests.items() if d is not None}

    out = Path(out)
    catalogs, summary, item_fonts, tasks = {}, {}, {}, []
    for split, split_scripts in splits.items():
        todo = []
        for script in split_scripts:
            letters = [cp for first, last in SCRIPTS[script] for cp in range(first, last + 1) if is_letter(cp)]
            for cp in letters[:max_items_per_script]:
                candidates = [f for f, font in enumerate(fonts) if cp in font.cmap]
                if len(candidates) >= MIN_IMAGES:
                    todo.append((script, cp, candidates))
        found = [x for x in parallel_map(check, todo, progress=progress, desc=f"checking {split} glyphs")
                 if len(x[2]) >= MIN_IMAGES]
        kept = _drop_homoglyphs(found)
        floor = floors.get(split, 2)
        if len(kept) < floor:
            raise SiameseError(
                f"Expected at least {plural(floor, f'{split} letter')} drawn by {MIN_IMAGES}+ fonts each "
                f"(scripts {', '.join(split_scripts)}) from {', '.join(map(str, font_dirs))}. Received: "
                f"{len(kept):,} from {plural(len(fonts), 'usable font')}. Fix: apt-get install {FONT_PACKAGES}"
            )
        catalog = catalogs[split] = {}
        for script, cp, digests in kept:
            rng = np.random.default_rng([seed, cp])
            chosen = sorted(int(f) for f in rng.choice(sorted(digests), min(len(digests), MAX_FONTS_PER_ITEM),
                                                       replace=False))
            item_id = f"{script}-{cp:04X}"
            (out / "images" / split / item_id).mkdir(parents=True, exist_ok=True)
            filenames = [f"images/{split}/{item_id}/{n:02d}.png" for n in range(len(chosen))]
            tasks += [(name, cp, f) for name, f in zip(filenames, chosen, strict=True)]
            catalog[item_id] = {"images": [{"filename": name} for name in filenames], "labels": []}
            item_fonts[item_id] = chosen
        used = {f for item_id in catalog for f in item_fonts[item_id]}
        summary[split] = {"scripts": list(split_scripts), "items": len(catalog),
                          "images": sum(len(item["images"]) for item in catalog.values()), "fonts": len(used),
                          "homoglyphs_dropped": len(found) - len(kept)}

    def save(task: tuple[str, int, int]) -> None:
        filename, cp, f = task
        rng = np.random.default_rng([seed, cp, f])
        _draw(face(f, image_size * SUPERSAMPLE), chr(cp), image_size, rng).save(out / filename, format="PNG")

    for _ in parallel_map(save, tasks, progress=progress, desc="drawing glyphs"):
        pass
    written = {split: out / f"{split}.json" for split in catalogs}
    for split, path in written.items():
        atomic.write_json(path, catalogs[split])
    atomic.write_json(out / "source.json", {
        "source": "glyphs", "seed": seed, "image_size": image_size, "font_dirs": [str(d) for d in font_dirs],
        "min_images": MIN_IMAGES, "max_fonts_per_item": MAX_FONTS_PER_ITEM, "splits": summary,
        "fonts": [{"file": str(f.path), "index": f.index, "family": f.family, "style": f.style} for f in fonts],
        "item_fonts": item_fonts,  # item id -> index into "fonts" of the font that drew each image, in order
    })
    return written
