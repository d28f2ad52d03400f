"""Input pipelines with no TensorFlow: the decoded images of a catalog, and the training batches (pairs,
triplets or P x K batches) as a `keras.utils.PyDataset`, which `fit` reads on any Keras backend
(`siamese.tfdata` wraps the same batches in `tf.data` for the TensorFlow backend).

Images are decoded by `siamese.images.decode_image` (the one decoder) in parallel. With `cache="memory"`
or `cache="disk"` every image is decoded once into a uint8 array (`disk`: a memory-mapped `.npy` in the
cache folder, reused by later runs while the files are unchanged) and batches are gathered from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Literal, NamedTuple

import keras
import numpy as np

from siamese import atomic
from siamese.catalog import Catalog
from siamese.config import CACHES
from siamese.errors import SiameseError
from siamese.images import decode_image, decode_images, exit_with_parent, file_stamp, naming
from siamese.losses.targets import pack_relations
from siamese.pairs import ItemSampler, PairSampler, PKSampler
from siamese.util import cache_dir, parallel_map, usable_cpus

Cache = Literal["none", "memory", "disk"]
_DECODER_VERSION = 2  # bump when decode_image changes its output, to invalidate on-disk caches (2: resize, then pad)


def check_cache(cache: str) -> None:
    if cache not in CACHES:
        raise SiameseError(f"Expected `cache` to be one of {', '.join(CACHES)}. Received: {cache!r}")


def decoded_images(
    catalog: Catalog, image_size: int, cache: Cache = "memory", *, workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Every image of `catalog` decoded to a `(n, image_size, image_size, 3)` uint8 array.

    `cache="memory"` (default) decodes into RAM; `cache="disk"` decodes once into a `.npy` under
    `cache_dir()/decoded/` keyed by the files' paths, sizes and times, and memory-maps it on later calls.
    """
    if cache not in ("memory", "disk"):
        raise SiameseError(f"Expected `cache` to be memory or disk ('none' decodes on the fly). Received: {cache!r}")
    shape = (len(catalog.filenames), image_size, image_size, 3)

    def decode(path: Path) -> np.ndarray:
        with naming(path):
            return decode_image(path, image_size)

    def fill(store: np.ndarray) -> None:
        decoded = parallel_map(decode, list(catalog.paths), workers=workers, progress=progress,
                               desc="decoding images")
        for i, image in enumerate(decoded):
            store[i] = image

    if cache == "memory":
        store = np.empty(shape, np.uint8)
        fill(store)
        return store
    stamps = []
    for p in catalog.paths:
        with naming(p):
            stamps.append([*file_stamp(p), str(p.resolve())])
    key = hashlib.sha256(json.dumps([_DECODER_VERSION, image_size, stamps]).encode()).hexdigest()[:32]
    path = cache_dir() / "decoded" / f"{key}.npy"
    if path.exists():
        store = np.load(path, mmap_mode="r")
        if store.shape == shape and store.dtype == np.uint8:
            return store
    with atomic.atomic_path(path, suffix=".npy") as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(store)
        store.flush()
        del store
    return np.load(path, mmap_mode="r")


@functools.cache
def _decoder_pool(workers: int) -> ProcessPoolExecutor:
    """One pool of image-decoding processes per size, started once and shared by every dataset.

    forkserver: forking a process that runs TensorFlow's threads is unsafe. The workers import only
    `siamese.images` (plus the main script, as every spawned Python process does). They end when this
    process dies, even by SIGKILL (`exit_with_parent`); the forkserver and the resource tracker then end too,
    as the last holders of their pipes are gone.
    """
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent)


def batch_loader(
    catalog: Catalog, image_size: int, cache: Cache, images: np.ndarray | None = None, workers: int | None = None
):
    """A numpy function: array of image indices -> uint8 batch `(len, size, size, 3)`.

    Without a cache, each batch is split across `workers` decoding processes (default `usable_cpus()`):
    Pillow spends much of a small image's time in Python, so threads would queue on the GIL.
    """
    spec = (image_size, image_size, 3)
    if cache == "none":
        paths = np.array([str(p.absolute()) for p in catalog.paths], dtype=object)
        workers = workers or usable_cpus()
        if workers == 1:
            return lambda indices: decode_images(list(paths[indices]), image_size)
        pool = _decoder_pool(workers)

        def load(indices: np.ndarray) -> np.ndarray:
            chunks = [list(paths[c]) for c in np.array_split(indices, workers) if len(c)]
            try:
                parts = list(pool.map(decode_images, chunks, [image_size] * len(chunks)))
            except BrokenProcessPool:
                _decoder_pool.cache_clear()  # the next dataset starts a fresh pool
                raise SiameseError(
                    "The image-decoding processes died. Python runs a script again in each worker process, so a "
                    "script that calls siamese must keep its work under `if __name__ == \"__main__\":`; or they "
                    "were killed for memory. Fix: guard the script's work, or pass workers=1."
                ) from None
            return np.concatenate(parts) if parts else np.empty((0, *spec), np.uint8)

        return load
    store = decoded_images(catalog, image_size, cache) if images is None else images
    if store.shape != (len(catalog.filenames), *spec):
        raise SiameseError(
            f"Expected decoded images of shape {(len(catalog.filenames), *spec)}. Received: {store.shape}"
        )
    return lambda indices: store[indices]


def _rows(shard: tuple[int, int], batch_size: int) -> tuple[int, int]:
    """The rows `[lo, hi)` of a batch of `batch_size` that share `shard = (i, n)` takes (`(0, 1)`: all)."""
    i, n = shard
    if not 0 <= i < n or batch_size % n:
        raise SiameseError(f"Expected shard (i, n) with 0 <= i < n and n dividing the batch size {batch_size}. "
                           f"Received: {shard}")
    return i * batch_size // n, (i + 1) * batch_size // n


def steps_per_epoch(per_epoch: int, batch_size: int) -> int:
    """Whole batches per epoch: `per_epoch` examples (images, pairs or triplets) rounded up to a multiple of
    `batch_size`."""
    if batch_size < 1:
        raise SiameseError(f"Expected `batch_size` >= 1. Received: {batch_size}")
    if per_epoch < 2:
        raise SiameseError(f"Expected `images_per_epoch` >= 2. Received: {per_epoch}")
    return max(1, math.ceil(per_epoch / batch_size))




class Spec(NamedTuple):
    """The shape and dtype of one array of a batch."""

    shape: tuple[int, ...]
    dtype: str


class TrainingBatches(keras.utils.PyDataset):
    """Training batches addressed by number: batch `i` is step `i % steps` of epoch `start_epoch + i // steps`,
    drawn for that epoch by `draw`, so batches may load in any order (two threads load ahead while the model
    trains) and a resumed run sees the same batches. Endless, or with `repeat` N the first N batches over and
    over (fixed validation batches). With `cache="none"` each image is decoded from its file by `workers`
    processes (default `usable_cpus()`); otherwise batches are gathered from `images` (or `decoded_images(...)`).
    `shard = (i, n)` keeps the i-th of n equal slices of every batch (one replica's or one host's share; default
    all), loading only those images.
    """

    def __init__(self, sampler: ItemSampler, image_size: int, *, batch_size: int, steps: int, start_epoch: int = 0,
                 cache: Cache = "none", images: np.ndarray | None = None, workers: int | None = None,
                 shard: tuple[int, int] = (0, 1), repeat: int | None = None):
        super().__init__(workers=2, max_queue_size=8)
        check_cache(cache)
        self.sampler, self.image_size, self.batch_size, self.steps = sampler, image_size, batch_size, steps
        self.start_epoch, self.repeat = start_epoch, repeat
        self.lo, self.hi = _rows(shard, batch_size)
        self.load = batch_loader(sampler.catalog, image_size, cache, images, workers)
        self._lock = threading.Lock()
        self._drawn: dict[int, object] = {}

    @property
    def num_batches(self) -> int | None:
        return self.repeat

    def _epoch(self, epoch: int):
        with self._lock:  # loading threads ask for the same epoch at once: draw it once
            if epoch not in self._drawn:
                if len(self._drawn) >= 4:
                    del self._drawn[min(self._drawn)]
                self._drawn[epoch] = self.draw(epoch)
            return self._drawn[epoch]

    def __getitem__(self, index: int):
        index = int(index) % self.repeat if self.repeat else int(index)
        epoch, step = divmod(index, self.steps)
        return self.batch(self._epoch(self.start_epoch + epoch), step)

    def image_spec(self) -> Spec:
        return Spec((self.hi - self.lo, self.image_size, self.image_size, 3), "uint8")


class PairBatches(TrainingBatches):
    """Batches `((images_a, images_b), same)` of pairs: epoch `e` holds
    `steps_per_epoch(pairs_per_epoch, batch_size) * batch_size` pairs drawn by `sampler.pairs(e, ...)`, so batches
    never straddle epochs. Images are uint8; `same` is float32 (1 = same item). With `triplets=True` the batches
    are `((anchors, positives, negatives), zeros)` from `sampler.triplets`. See `TrainingBatches` for the rest."""

    def __init__(self, sampler: PairSampler, image_size: int, *, batch_size: int = 32, pairs_per_epoch: int = 1024,
                 triplets: bool = False, **kwargs):
        super().__init__(sampler, image_size, batch_size=batch_size,
                         steps=steps_per_epoch(pairs_per_epoch, batch_size), **kwargs)
        self.triplets = triplets

    def draw(self, epoch: int) -> tuple[np.ndarray, ...]:
        n = self.steps * self.batch_size
        if self.triplets:
            return (*self.sampler.triplets(epoch, n), np.zeros(n, np.float32))
        return tuple(self.sampler.pairs(epoch, n))

    def batch(self, drawn: tuple[np.ndarray, ...], step: int):
        rows = slice(step * self.batch_size + self.lo, step * self.batch_size + self.hi)
        *indices, same = (column[rows] for column in drawn)
        return tuple(self.load(i) for i in indices), same

    @property
    def element_spec(self) -> tuple[tuple[Spec, ...], Spec]:
        return (self.image_spec(),) * (3 if self.triplets else 2), Spec((self.hi - self.lo,), "float32")


class ItemBatches(TrainingBatches):
    """Batches `(images, relations)` for batch-all training: epoch `e` holds the
    `steps_per_epoch(images_per_epoch, batch_size)` batches of `sampler.batches(e, ...)`, `batch_size` uint8
    images, `images_per_item` of each item drawn. `relations` is the float32 `(batch_size, 1 + batch_size)`
    `y_true` of a loss over P x K batches (`siamese.losses.targets.pack_relations`). A shard keeps its rows of it
    (positions and relations stay those of the whole batch). See `TrainingBatches` for the rest."""

    def __init__(self, sampler: PKSampler, image_size: int, *, batch_size: int = 32, images_per_item: int = 4,
                 images_per_epoch: int = 1024, **kwargs):
        super().__init__(sampler, image_size, batch_size=batch_size,
                         steps=steps_per_epoch(images_per_epoch, batch_size), **kwargs)
        self.images_per_item = images_per_item
        sampler.batches(0, 1, batch_size, images_per_item)  # bad settings fail here, not while training

    def draw(self, epoch: int) -> np.ndarray:
        return self.sampler.batches(epoch, self.steps, self.batch_size, self.images_per_item)

    def batch(self, drawn: np.ndarray, step: int):
        indices = drawn[step]
        relations = self.sampler.relations(indices)[self.lo : self.hi]
        return self.load(indices[self.lo : self.hi]), pack_relations(np.arange(self.lo, self.hi), relations)

    @property
    def element_spec(self) -> tuple[Spec, Spec]:
        return self.image_spec(), Spec((self.hi - self.lo, self.batch_size + 1), "float32")
