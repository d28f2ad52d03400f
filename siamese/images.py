"""The one image decoder used by training, export, index and query, and the full-decode check pass.

`decode_image` applies EXIF orientation; converts grayscale, 16-bit, palette, CMYK, RGBA and animated
images to RGB (transparency onto white, first frame); resizes with antialiasing (Pillow's bilinear filter
widened to the scale factor, like `tf.image.resize(antialias=True)`) to `fitted_size`: the long side becomes
`size` and the short side `short * size / long`, rounded half up, at least 1 pixel; then pads to a centred
`size` x `size` square on white, the odd pixel of padding going right or below. Memory stays of the order of
the file's own pixels plus the output, whatever the aspect ratio; images more than `MAX_ASPECT_RATIO` times
longer than wide (or the reverse) are refused. Square images decode as they always have; other images
differ slightly from decoder version 1 (`siamese.pipeline`), which padded to a square first and then resized.

Only regular files are read: a FIFO, a device, a socket, a folder or a symlink loop is refused at once,
never opened in a way that could block.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import connection, parent_process
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import PIL
from PIL import Image, ImageOps

from siamese import atomic
from siamese.catalog import Catalog
from siamese.errors import SiameseError
from siamese.util import NotRegularFileError, cache_dir, file_kind, open_regular, parallel_map, plural

WHITE = (255, 255, 255)
MAX_ASPECT_RATIO = 100  # the long side may be at most this many times the short side
OnBadImage = Literal["fail", "skip"]
ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageDecodeError(SiameseError):
    """An image that cannot be decoded: empty, truncated, not an image, not a regular file, over the pixel
    limit or the aspect-ratio limit. The message is the reason; callers put the file's name before it."""


def _not_regular(kind: str) -> ImageDecodeError:
    return ImageDecodeError(f"not a regular file but {kind}")


def _unreadable(e: OSError) -> ImageDecodeError:
    if e.errno == errno.ELOOP:
        return ImageDecodeError("cannot be read: a symlink loop (or a chain of over 40 symlinks)")
    return ImageDecodeError(f"cannot be read ({e.strerror})")


def open_file(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading; raise `ImageDecodeError` at once for anything else.

    The file is opened without blocking (`O_NONBLOCK`: a FIFO without a writer opens at once) and checked with
    `fstat` on the open descriptor, so nothing can be swapped in between the check and the read.
    """
    try:
        return open_regular(path)[0]
    except NotRegularFileError as e:
        raise _not_regular(e.kind) from None
    except OSError as e:
        raise _unreadable(e) from None


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Put `path` before the message of an `ImageDecodeError` raised inside (for callers without a catalog)."""
    try:
        yield
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{path}: {e}") from None


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

    Raises `ImageDecodeError` for a path that is not a regular file (`open_file`), for empty, truncated or
    non-image data, for images over Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, a decompression bomb
    guard) and for images more than `MAX_ASPECT_RATIO` times longer than wide or wider than long; the last two
    are refused from the file's header, before its pixels are decoded.
    """
    if isinstance(source, str | os.PathLike):
        with open_file(source) as f:
            return _read_rgb(f)
    return _read_rgb(io.BytesIO(source) if isinstance(source, bytes) else source)


def _read_rgb(source: BinaryIO) -> Image.Image:
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
            long, short = max(im.size), min(im.size)
            if long > MAX_ASPECT_RATIO * short:
                ratio = f"{round(long / short, 1):,}".removesuffix(".0")
                raise ImageDecodeError(
                    f"{im.width}x{im.height} is an aspect ratio of {ratio}:1, over the limit of {MAX_ASPECT_RATIO}:1 "
                    "(siamese.images.MAX_ASPECT_RATIO); crop it"
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


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The `(width, height)` an image is resized to inside a `size` square: the long side becomes `size`, the
    short side `short * size / long` rounded half up (an exact integer formula), and at least 1 pixel."""
    long = max(width, height)

    def fit(n: int) -> int:
        return max(1, (2 * n * size + long) // (2 * long))

    return fit(width), fit(height)


def square(im: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to `fitted_size` and pad it to a centred `size` x `size` square on white (uint8
    array); the padding's odd pixel goes right or below. Allocates about the input plus the output, whatever
    the aspect ratio (never the input padded to a square)."""
    width, height = fitted_size(im.width, im.height, size)
    # Width, then height, in two calls, as `siamese.export.pillow_resize` does: given both at once, Pillow picks
    # the order itself (the height first for some shapes), and the order changes the rounding.
    if width != im.width:
        im = im.resize((width, im.height), Image.Resampling.BILINEAR)
    if height != im.height:
        im = im.resize((width, height), Image.Resampling.BILINEAR)
    if width != height:
        canvas = Image.new("RGB", (size, size), WHITE)
        canvas.paste(im, ((size - width) // 2, (size - height) // 2))
        im = canvas
    return np.asarray(im, dtype=np.uint8)


def decode_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode an image file or bytes to a `(size, size, 3)` uint8 RGB array, ready for the model."""
    return square(open_rgb(source), size)


def decode_images(paths: list[str], size: int) -> np.ndarray:
    """Decode several files into one `(len(paths), size, size, 3)` uint8 batch; errors name the file."""
    batch = np.empty((len(paths), size, size, 3), np.uint8)
    for k, path in enumerate(paths):
        with naming(path):
            batch[k] = decode_image(path, size)
    return batch


def exit_with_parent() -> None:
    """In a `multiprocessing` child (a pool's `initializer`): end this process as soon as its parent process
    dies, however it dies, rather than stay behind as an orphan.

    A thread waits on the child's sentinel of its parent (a pipe the parent holds open until it exits). This
    covers forkserver children too, whose parent process (the forkserver) outlives the one that started them.
    """
    sentinel = parent_process().sentinel

    def watch() -> None:
        connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclass(frozen=True)
class BadImage:
    """An image of the catalog that failed the full-decode pass."""

    item_id: str
    filename: str
    reason: str

    def __str__(self) -> str:
        return f"item {self.item_id!r}: {self.filename}: {self.reason}"


class BadImagesError(SiameseError):
    """The catalog has images that cannot be decoded; `bad` lists every one, the message (one line) the first."""

    def __init__(self, bad: list[BadImage], image_dir: Path):
        self.bad = bad
        listed = "; run `validate` to list them all" if len(bad) > 1 else ""
        super().__init__(f"{plural(len(bad), 'image')} in {image_dir} cannot be used (first: {bad[0]}). Fix: "
                         f"replace or remove {'it' if len(bad) == 1 else 'them'}, or pass `on_bad_image='skip'` to "
                         f"leave {'it' if len(bad) == 1 else 'them'} out{listed}.")


def file_stamp(path: str | os.PathLike) -> list[int]:
    """What tells a file changed without reading it: [size, mtime in ns, inode]. Raises `ImageDecodeError`
    when it cannot be read or is not a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _unreadable(e) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(file_kind(st.st_mode))
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
    header = {"version": 1, "pillow": PIL.__version__, "max_pixels": Image.MAX_IMAGE_PIXELS,
              "max_aspect_ratio": MAX_ASPECT_RATIO, "root": str(root)}
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
        except ImageDecodeError as e:
            results[filename] = str(e)
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
            atomic.write_json(record_path, {"header": header, "files": merged}, indent=None)

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
        raise SiameseError(f"Expected `on_bad_image` to be 'fail' or 'skip'. Received: {on_bad_image!r}")
    bad = find_bad_images(catalog, workers=workers, progress=progress)
    if not bad:
        return catalog
    if on_bad_image == "fail":
        raise BadImagesError(bad, catalog.image_dir)
    warn_skipped(bad, stacklevel=3)
    return catalog.without_images({b.filename for b in bad})


def warn_skipped(bad: list[BadImage], stacklevel: int = 2) -> None:
    """The one warning of `on_bad_image="skip"`: how many images were left out, and the first's item and file."""
    warnings.warn(
        f"Skipping {plural(len(bad), 'image')} that cannot be decoded "
        f"(first: {bad[0]}); run `validate` to list them all.",
        UserWarning,
        stacklevel=stacklevel,
    )
