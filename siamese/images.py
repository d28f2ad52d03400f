"""The one image decoder used by training, export, index and query, and the full-decode check pass.

`decode_image` applies EXIF orientation; converts grayscale, 16-bit, palette, CMYK, RGBA and animated
images to RGB (transparency onto white, first frame); pads to a square on white and resizes with
antialiasing (Pillow's bilinear filter widened to the scale factor, like `tf.image.resize(antialias=True)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import PIL
from PIL import Image, ImageOps

from siamese import atomic
from siamese.catalog import Catalog
from siamese.errors import SiameseError, plural

WHITE = (255, 255, 255)
OnBadImage = Literal["fail", "skip"]
ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageDecodeError(SiameseError):
    """An image that cannot be decoded: empty, truncated, not an image, or over the pixel limit."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16- and 32-bit grayscale: Pillow's own conversion clips at 255, so scale the range down instead.
        wide = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode != "I" or wide.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(wide * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def open_rgb(source: ImageSource) -> Image.Image:
    """Fully decode an image file (or bytes) into an upright 8-bit RGB Pillow image.

    Raises `ImageDecodeError` for empty, truncated or non-image data and for images over Pillow's
    pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, a decompression bomb guard).
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    limit = Image.MAX_IMAGE_PIXELS
    fix = "resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit and raises above; refuse both, with one message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        with im:
            if limit and im.width * im.height > limit:
                raise ImageDecodeError(
                    f"{im.width}x{im.height} = {im.width * im.height:,} pixels is over Pillow's limit of "
                    f"{limit:,} (a decompression bomb?); {fix}"
                )
            im.seek(0)  # first frame of an animation
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"over Pillow's limit of {limit:,} pixels (a decompression bomb?): {e}; {fix}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can read (empty, or another kind of file)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot be decoded ({type(e).__name__}: {e})") from None


def square(im: Image.Image, size: int) -> np.ndarray:
    """Pad an RGB image to a centred square on white and resize it to `size` x `size` (uint8 array)."""
    side = max(im.width, im.height)
    if im.width != im.height:
        canvas = Image.new("RGB", (side, side), WHITE)
        canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        im = canvas
    if side != size:
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode an image file or bytes to a `(size, size, 3)` uint8 RGB array, ready for the model."""
    return square(open_rgb(source), size)


def decode_images(paths: list[str], size: int) -> np.ndarray:
    """Decode several files into one `(len(paths), size, size, 3)` uint8 batch."""
    batch = np.empty((len(paths), size, size, 3), np.uint8)
    for k, path in enumerate(paths):
        batch[k] = decode_image(path, size)
    return batch


@dataclass(frozen=True)
class BadImage:
    """An image of the catalog that failed the full-decode pass."""

    item_id: str
    filename: str
    reason: str

    def __str__(self) -> str:
        return f"item {self.item_id!r}: {self.filename}: {self.reason}"


class BadImagesError(SiameseError):
    """The catalog has images that cannot be decoded; `bad` lists every one."""

    def __init__(self, bad: list[BadImage], image_dir: Path):
        self.bad = bad
        lines = [f"{plural(len(bad), 'image')} in {image_dir} cannot be used:"]
        lines += [f"  {b}" for b in bad]
        lines.append("Fix: replace or remove them, or pass --on-bad-image skip to leave them out.")
        super().__init__("\n".join(lines))


def cache_dir() -> Path:
    """Where siamese keeps caches: $SIAMESE_CACHE_DIR, else $XDG_CACHE_HOME/siamese, else ~/.cache/siamese."""
    if os.environ.get("SIAMESE_CACHE_DIR"):
        return Path(os.environ["SIAMESE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siamese"


def file_stamp(path: Path) -> list[int]:
    """What tells a file changed without reading it: [size, mtime in ns, inode]."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _check_one(path: Path) -> str | None:
    try:
        open_rgb(path)
    except ImageDecodeError as e:
        return str(e)
    return None


def find_bad_images(
    catalog: Catalog, *, workers: int | None = None, progress: bool = True
) -> list[BadImage]:
    """Fully decode every image of `catalog` and return those that fail, with their item and reason.

    Results are remembered per file (size, mtime, inode) in the cache folder, so an unchanged folder is
    checked once; a changed or new file is decoded again. `workers` defaults to `usable_cpus()`.
    """
    root = catalog.image_dir.resolve()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:24]
    record_path = cache_dir() / "image-checks" / f"{key}.json"
    header = {"version": 1, "pillow": PIL.__version__, "max_pixels": Image.MAX_IMAGE_PIXELS, "root": str(root)}
    known: dict[str, list] = {}
    try:
        saved = json.loads(record_path.read_text())
        if saved.get("header") == header:
            known = saved["files"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or an unreadable one: check everything

    stamps: dict[str, list[int]] = {}
    todo: list[str] = []
    results: dict[str, str | None] = {}
    for filename, path in zip(catalog.filenames, catalog.paths, strict=True):
        try:
            stamps[filename] = file_stamp(path)
        except OSError as e:
            results[filename] = f"cannot be read ({e.strerror})"
            continue
        entry = known.get(filename)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamps[filename]:
            results[filename] = entry[1]
        else:
            todo.append(filename)

    if todo:
        paths = [catalog.image_dir / f for f in todo]
        checked = parallel_map(_check_one, paths, workers=workers, progress=progress, desc="checking images")
        for filename, reason in zip(todo, checked, strict=True):
            results[filename] = reason
        merged = dict(known)
        merged.update({f: [stamps[f], results[f]] for f in stamps})
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-check next time
            atomic.write_json(record_path, {"header": header, "files": merged})

    owner = {f: catalog.items[i].id for f, i in zip(catalog.filenames, catalog.image_item, strict=True)}
    return [BadImage(owner[f], f, r) for f in catalog.filenames if (r := results[f]) is not None]


def check_images(
    catalog: Catalog, on_bad_image: OnBadImage = "fail", *, workers: int | None = None, progress: bool = True
) -> Catalog:
    """Run the full-decode pass; return the catalog, without bad images when `on_bad_image="skip"`.

    With `"fail"` (the default) raise `BadImagesError` listing every bad file and its item; with `"skip"`
    drop them and emit one warning that counts them.
    """
    if on_bad_image not in ("fail", "skip"):
        raise SiameseError(f"Expected --on-bad-image to be 'fail' or 'skip'. Received: {on_bad_image!r}")
    bad = find_bad_images(catalog, workers=workers, progress=progress)
    if not bad:
        return catalog
    if on_bad_image == "fail":
        raise BadImagesError(bad, catalog.image_dir)
    warnings.warn(
        f"Skipping {plural(len(bad), 'image')} that cannot be decoded "
        f"(first: {bad[0]}); run `validate` to list them all.",
        UserWarning,
        stacklevel=2,
    )
    return catalog.without_images({b.filename for b in bad})


def usable_cpus() -> int:
    """CPUs this process may run on (respects `taskset` and container CPU sets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(
    fn: Callable, args: list, *, workers: int | None = None, progress: bool = True, desc: str = ""
) -> Iterator:
    """Yield `fn(a)` for each of `args` in order, computed on threads (Pillow releases the GIL while
    decoding), with a progress bar. `workers` defaults to `usable_cpus()`."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers or usable_cpus()) as pool:
        yield from tqdm(pool.map(fn, args), total=len(args), desc=desc, unit="img", disable=not progress,
                        leave=False)
