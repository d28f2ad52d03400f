"""`tf.data` input pipelines: batches of images for embedding, endless streams of pairs or of P x K batches
for training.

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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow as tf

from siamese import atomic
from siamese.catalog import Catalog
from siamese.config import CACHES
from siamese.errors import SiameseError
from siamese.images import decode_image, decode_images, exit_with_parent, file_stamp, naming
from siamese.pairs import PairSampler
from siamese.util import cache_dir, parallel_map, usable_cpus

Cache = Literal["none", "memory", "disk"]
_DECODER_VERSION = 2  # bump when decode_image changes its output, to invalidate on-disk caches (2: resize, then pad)


def _check_cache(cache: str) -> None:
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


def _batch_loader(
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


def image_dataset(
    catalog: Catalog, image_size: int, batch_size: int = 32, cache: Cache = "none", workers: int | None = None
) -> tf.data.Dataset:
    """Batches of the catalog's images in order, uint8 `(batch, image_size, image_size, 3)`, prefetched.

    `workers` decoding processes (default `usable_cpus()`) read the files when `cache="none"`.
    """
    _check_cache(cache)
    load = _batch_loader(catalog, image_size, cache, workers=workers)
    shape = (None, image_size, image_size, 3)
    return (
        tf.data.Dataset.range(len(catalog.filenames))
        .batch(batch_size)
        .map(lambda i: tf.ensure_shape(tf.numpy_function(load, [i], tf.uint8, stateful=False), shape),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


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


def pair_dataset(
    sampler: PairSampler,
    image_size: int,
    *,
    batch_size: int = 32,
    pairs_per_epoch: int = 1024,
    start_epoch: int = 0,
    cache: Cache = "none",
    images: np.ndarray | None = None,
    workers: int | None = None,
    triplets: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """An endless stream of batches `((images_a, images_b), same)`, epoch after epoch from `start_epoch`.

    Epoch `e` holds `steps_per_epoch(pairs_per_epoch, batch_size) * batch_size` pairs drawn by
    `sampler.pairs(e, ...)`, so batches never straddle epochs and a resumed run sees the same pairs.
    Images are uint8; `same` is float32 (1 = same item). With `triplets=True` the batches are
    `((anchors, positives, negatives), zeros)` from `sampler.triplets`. With `cache="none"` each image is
    decoded from its file by `workers` processes (default `usable_cpus()`); otherwise batches are gathered
    from `images` (or `decoded_images(...)`). `shard = (i, n)` keeps the i-th of n equal slices of every
    batch (one replica's share under `tf.distribute`; default all), loading only those images.
    """
    _check_cache(cache)
    per_epoch = steps_per_epoch(pairs_per_epoch, batch_size) * batch_size
    k = 3 if triplets else 2
    lo, hi = _rows(shard, batch_size)

    def draw(epoch):
        if triplets:
            return (*sampler.triplets(int(epoch), per_epoch), np.zeros(per_epoch, np.float32))
        return tuple(sampler.pairs(int(epoch), per_epoch))

    def epoch_draw(epoch):
        drawn = tf.numpy_function(draw, [epoch], (tf.int64,) * k + (tf.float32,), stateful=False)
        return tf.data.Dataset.from_tensor_slices(tuple(tf.ensure_shape(t, (per_epoch,)) for t in drawn))

    load = _batch_loader(sampler.catalog, image_size, cache, images, workers)
    shape = (None, image_size, image_size, 3)

    def load_images(*batch):
        *indices, y = batch
        loaded = tf.numpy_function(lambda *i: tuple(load(j) for j in i), indices, (tf.uint8,) * k, stateful=False)
        return tuple(tf.ensure_shape(x, shape) for x in loaded), y

    return (
        tf.data.Dataset.counter(start_epoch)
        .flat_map(epoch_draw)
        .batch(batch_size)
        .map(lambda *batch: tuple(t[lo:hi] for t in batch))
        .map(load_images, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def batch_dataset(
    sampler: PairSampler,
    image_size: int,
    *,
    batch_size: int = 32,
    images_per_item: int = 4,
    images_per_epoch: int = 1024,
    start_epoch: int = 0,
    cache: Cache = "none",
    images: np.ndarray | None = None,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """An endless stream of batches `(images, relations)` for batch-all training, epoch after epoch.

    Epoch `e` holds the `steps_per_epoch(images_per_epoch, batch_size)` batches of `sampler.batches(e, ...)`:
    `batch_size` uint8 images, `images_per_item` of each item drawn. `relations` is float32
    `(batch_size, 1 + batch_size)`, what `losses.batch_contrastive_loss` takes: each image's position in the
    batch, then `sampler.relations` of the batch (1 same item, 0 negative pair, -1 no pair). A resumed run
    sees the same batches; images are decoded or gathered as in `pair_dataset`. `shard = (i, n)` keeps the
    i-th of n equal slices of every batch's rows (positions and relations stay those of the whole batch).
    """
    _check_cache(cache)
    steps = steps_per_epoch(images_per_epoch, batch_size)
    lo, hi = _rows(shard, batch_size)
    sampler.batches(0, 1, batch_size, images_per_item)  # bad settings fail here, not inside tf.data

    def draw(epoch):
        return sampler.batches(int(epoch), steps, batch_size, images_per_item)

    def epoch_draw(epoch):
        drawn = tf.numpy_function(draw, [epoch], tf.int64, stateful=False)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(drawn, (steps, batch_size)))

    load = _batch_loader(sampler.catalog, image_size, cache, images, workers)

    def load_batch(indices):
        position = np.arange(lo, hi, dtype=np.float32)[:, None]
        return load(indices[lo:hi]), np.hstack([position, sampler.relations(indices)[lo:hi]])

    def load_images(indices):
        x, y = tf.numpy_function(load_batch, [indices], (tf.uint8, tf.float32), stateful=False)
        return (tf.ensure_shape(x, (hi - lo, image_size, image_size, 3)),
                tf.ensure_shape(y, (hi - lo, batch_size + 1)))

    return (
        tf.data.Dataset.counter(start_epoch)
        .flat_map(epoch_draw)
        .map(load_images, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
