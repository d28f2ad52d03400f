"""Real catalogs with no download: Fashion-MNIST, scikit-learn's digits and font glyphs as image files + JSON.

`make_dataset(source, out)` writes `out/images/{train,test}/<item>/<n>.png`, `out/train.json` and
`out/test.json` (item = class). Fashion-MNIST is read from Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist), else Keras's dataset cache (~/.keras/datasets/fashion-mnist), and
downloaded through `keras.datasets.fashion_mnist` only when neither has it. "glyphs" draws letters with the
installed fonts, one item per letter and no labels (`siamese.glyphs`).
"""

from __future__ import annotations

import gzip
import os
import struct
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from siamese import atomic
from siamese.errors import SiameseError
from siamese.glyphs import make_glyphs
from siamese.util import parallel_map

Source = Literal["fashion-mnist", "digits", "glyphs"]
SOURCES = ("fashion-mnist", "digits", "glyphs")
DATASET_FILES = frozenset({"images", "train.json", "test.json", "source.json"})
"""What a folder written by `make_dataset` holds."""
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path.home() / ".keras" / "datasets" / "fashion-mnist",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

Split = tuple[np.ndarray, np.ndarray]  # (uint8 images (n, h, w), int class labels (n,))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a numpy array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise SiameseError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SiameseError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}.")
    return body.reshape(dims)


def find_fashion_mnist() -> Path | None:
    """The first folder of `FASHION_MNIST_DIRS` holding all four Fashion-MNIST files, or None."""
    for folder in FASHION_MNIST_DIRS:
        if all((folder / name).is_file() for pair in _FASHION_FILES.values() for name in pair):
            return folder
    return None


def load_fashion_mnist() -> tuple[dict[str, Split], str]:
    """Fashion-MNIST's train and test splits, and where they came from."""
    folder = find_fashion_mnist()
    if folder is not None:
        splits = {s: (read_idx(folder / x), read_idx(folder / y)) for s, (x, y) in _FASHION_FILES.items()}
        return splits, str(folder)
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as e:
        raise SiameseError(
            f"Fashion-MNIST is not on this machine and could not be downloaded ({type(e).__name__}: {e}). "
            "Fix: `apt-get install dataset-fashion-mnist`, or use `source='digits'`."
        ) from None
    return {"train": (x_train, y_train), "test": (x_test, y_test)}, "keras.datasets.fashion_mnist (downloaded)"


def load_digits() -> tuple[dict[str, Split], str]:
    """scikit-learn's bundled 8x8 digits (1,797 images) scaled to 0-255; the last 20% are the test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    cut = int(len(images) * 0.8)
    return {"train": (images[:cut], bunch.target[:cut]), "test": (images[cut:], bunch.target[cut:])}, (
        "sklearn.datasets.load_digits (bundled)"
    )


def make_dataset(source: Source, out: str | os.PathLike, limit: int | None = None, progress: bool = True,
                 seed: int = 0, image_size: int | None = None) -> dict[str, Path]:
    """Write `source` as PNG files and a labeled JSON per split under `out`; return the JSON paths.

    The folder is written whole beside `out` and swapped in under its lock (see `claim_output`): a crash leaves
    no half-written dataset, and a folder holding anything but an earlier dataset is refused.

    `limit` keeps the first N images of each split (both datasets are stored in shuffled order, so the
    classes stay balanced). Each class is one item, named after the class. For "glyphs", `limit` keeps the
    first N letters of each script, and `seed` (default 0) and `image_size` (default 32) apply to it alone.
    """
    if source not in SOURCES:
        raise SiameseError(f"Expected `source` to be one of {', '.join(SOURCES)}. Received: {source!r}")
    if limit is not None and limit < 2:
        raise SiameseError(f"Expected `limit` >= 2. Received: {limit}")
    if source != "glyphs" and image_size is not None:
        raise SiameseError(f"Expected `image_size` only with `source='glyphs'`. Received: `source={source}`")
    with claim_output(out), atomic.replace_folder(out) as new:
        if source == "glyphs":
            written = make_glyphs(new, seed=seed, image_size=32 if image_size is None else image_size,
                                  progress=progress, max_items_per_script=limit)
        else:
            written = _write_images(source, new, limit, progress)
    return {split: Path(out) / path.relative_to(new) for split, path in written.items()}


def claim_output(out: str | os.PathLike) -> AbstractContextManager[Path]:
    """Lock the dataset folder `out` and check that it is new, empty, or holds only a dataset an earlier
    make-dataset wrote (see `atomic.claim_folder`), which the new one replaces whole."""
    return atomic.claim_folder(out, lambda folder: DATASET_FILES if (folder / "source.json").is_file() else None,
                               "a dataset")


def _write_images(source: Source, out: Path, limit: int | None, progress: bool) -> dict[str, Path]:
    """Write the images and labeled JSONs of Fashion-MNIST or digits into `out`; return the JSON paths."""
    if source == "fashion-mnist":
        splits, origin = load_fashion_mnist()
        names = FASHION_MNIST_CLASSES
    else:
        splits, origin = load_digits()
        names = tuple(f"digit_{d}" for d in range(10))
    written = {}
    for split, (images, classes) in splits.items():
        images, classes = images[:limit], classes[:limit]
        filenames = [f"images/{split}/{names[c]}/{n:05d}.png" for n, c in enumerate(classes)]
        for name in {names[c] for c in classes}:
            (out / "images" / split / name).mkdir(parents=True, exist_ok=True)

        def save(args: tuple[np.ndarray, str]) -> None:
            pixels, filename = args
            Image.fromarray(pixels, "L").save(out / filename, format="PNG")

        for _ in parallel_map(save, list(zip(images, filenames, strict=True)), progress=progress,
                              desc=f"writing {split} images"):
            pass
        catalog: dict[str, dict] = {}
        for filename, c in zip(filenames, classes, strict=True):
            catalog.setdefault(names[c], {"images": []})["images"].append({"filename": filename})
        written[split] = out / f"{split}.json"
        atomic.write_json(written[split], dict(sorted(catalog.items())))
    atomic.write_json(out / "source.json", {"source": source, "origin": origin, "limit": limit})
    return written
