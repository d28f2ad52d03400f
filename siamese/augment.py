"""Augmentation of training batches: Keras preprocessing layers that act in training only.

The layers wrap the embedding network inside the training model (`siamese.models.build_batch_all`), never
inside the embedding network itself, so the saved checkpoint, validation, export, index and query all see
exactly the pixels they saw before: augmentation exists only while `fit` trains.
"""

from __future__ import annotations

import keras
from keras import ops

ROTATION = 0.03
"""Largest rotation, a fraction of a full turn (0.03: about 11 degrees)."""
SHIFT = 0.1
"""Largest shift, a fraction of the side."""
ZOOM = 0.15
"""Largest zoom in or out, a fraction of the side (a random resized crop of the centre, or a margin)."""
CONTRAST = 0.3
"""Largest change of contrast, a fraction (0.3: 0.7x to 1.3x)."""


def augmentation(flip: bool = False, seed: int = 0) -> keras.Sequential:
    """uint8 images in, augmented uint8 images of the same size out, in training; unchanged otherwise.

    A small random rotation, shift and zoom (edges filled with their nearest pixels), and a random
    contrast; a random horizontal flip with `flip` (default off: text and many products are not symmetric).
    Seeded from `seed`, so a run is reproducible.
    """
    layers = [
        keras.layers.Rescaling(1.0, name="to_float"),
        keras.layers.RandomRotation(ROTATION, fill_mode="nearest", seed=seed, name="rotate"),
        keras.layers.RandomTranslation(SHIFT, SHIFT, fill_mode="nearest", seed=seed + 1, name="shift"),
        keras.layers.RandomZoom(ZOOM, ZOOM, fill_mode="nearest", seed=seed + 2, name="zoom"),
        keras.layers.RandomContrast(CONTRAST, value_range=(0, 255), seed=seed + 3, name="contrast"),
    ]
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4, name="flip"))
    layers.append(ToUint8(name="to_uint8"))
    return keras.Sequential(layers, name="augmentation")


class ToUint8(keras.layers.Layer):
    """Rounds and clips to 0-255 and casts to uint8: what the embedding network takes."""

    def call(self, inputs):
        return ops.cast(ops.clip(ops.round(inputs), 0, 255), "uint8")
