"""`tf.data` forms of the input pipelines, for the TensorFlow backend: batches of a catalog's images in order
(embedding), and the training batches of `siamese.pipeline` loaded in parallel (what `fit` reads fastest on
TensorFlow, and what `tf.distribute` shards across workers)."""

from __future__ import annotations

import tensorflow as tf

from siamese.catalog import Catalog
from siamese.pipeline import Cache, Spec, TrainingBatches, batch_loader, check_cache


def image_dataset(
    catalog: Catalog, image_size: int, batch_size: int = 32, cache: Cache = "none", workers: int | None = None
) -> tf.data.Dataset:
    """Batches of the catalog's images in order, uint8 `(batch, image_size, image_size, 3)`, prefetched.

    `workers` decoding processes (default `usable_cpus()`) read the files when `cache="none"`.
    """
    check_cache(cache)
    load = batch_loader(catalog, image_size, cache, workers=workers)
    shape = (None, image_size, image_size, 3)
    return (
        tf.data.Dataset.range(len(catalog.filenames))
        .batch(batch_size)
        .map(lambda i: tf.ensure_shape(tf.numpy_function(load, [i], tf.uint8, stateful=False), shape),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def tf_dataset(batches: TrainingBatches) -> tf.data.Dataset:
    """`batches` (endless, or its `repeat` batches over and over) as a `tf.data` stream of the same batches in
    the same order, several loading at once."""
    x, y = batches.element_spec
    single = isinstance(x, Spec)
    specs = [x, y] if single else [*x, y]

    def load(index):
        images, target = batches[index]
        return (images, target) if single else (*images, target)

    def element(index):
        arrays = tf.numpy_function(load, [index], [s.dtype for s in specs], stateful=False)
        arrays = [tf.ensure_shape(a, s.shape) for a, s in zip(arrays, specs, strict=True)]
        return (arrays[0] if single else tuple(arrays[:-1])), arrays[-1]

    n = batches.num_batches
    indices = tf.data.Dataset.counter() if n is None else tf.data.Dataset.range(n).repeat()
    return indices.map(element, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
