"""What the losses over a P x K batch share: its pairs as masks, the distances among its rows, an active mean."""

from __future__ import annotations

import keras
from keras import ops

from siamese.losses.targets import unpack_relations


def batch_pairs(y_true, embeddings):
    """Among a batch's rows (`y_true` as `pack_relations` makes it): the positive-pair mask, the negative-pair mask
    and the embeddings as rows, `(n, n)`, `(n, n)` float32 and `(n, dim)` float32.

    `embeddings` `(b, dim)` gives n = b rows; `(b, views, dim)` gives n = views x b rows (view by view),
    where two views of one image are a positive pair and every view keeps its image's relations.
    """
    relation = unpack_relations(y_true)
    e = ops.cast(embeddings, "float32")
    if len(e.shape) == 3:
        views = e.shape[1]
        e = ops.reshape(ops.transpose(e, (1, 0, 2)), (-1, e.shape[2]))
        relation = ops.tile(relation, (views, views))
        n = ops.shape(relation)[0]
        same_image = ops.tile(ops.eye(ops.shape(y_true)[0]), (views, views)) - ops.eye(n)
        relation = ops.where(same_image > 0, 1.0, relation)
    positive = ops.cast(ops.equal(relation, 1.0), "float32")
    negative = ops.cast(ops.equal(relation, 0.0), "float32")
    return positive, negative, e


def squared_distances(e):
    """`(n, n)` squared Euclidean distances among the rows of `e`, at least 1e-9 (a finite sqrt gradient)."""
    norms = ops.sum(ops.square(e), axis=1)
    return ops.maximum(norms[:, None] + norms[None, :] - 2.0 * ops.matmul(e, ops.transpose(e)), 1e-9)


def active_mean(cost, mask):
    """The mean of `cost` over the entries of `mask` where it is positive (0 when there are none)."""
    cost = mask * cost
    return ops.sum(cost) / ops.maximum(ops.sum(mask * ops.cast(cost > 0.0, "float32")), 1.0)


def positive(name: str, value: float) -> float:
    """`value` as a float, refused unless > 0 (a margin, a temperature)."""
    if not value > 0:
        raise ValueError(f"Expected {name} > 0. Received: {name}={value}")
    return float(value)


class SettingsLoss(keras.losses.Loss):
    """A loss function `fn(y_true, y_pred, **settings)` as a serializable Keras loss whose config is its settings,
    shown as attributes (`loss.margin`): the shape of Keras's `LossFunctionWrapper`, which Keras 3 does not export
    (it lives in `keras.src` only), so the losses here subclass this instead of a private class."""

    def __init__(self, fn, name: str, reduction: str, dtype, **settings):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn, self.settings = fn, settings

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred, **self.settings)

    def get_config(self) -> dict:
        return {**super().get_config(), **self.settings}

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
