"""The triplet loss `max(d(a, p)^2 - d(a, n)^2 + margin, 0)`, over drawn triplets and over a P x K batch
(batch-all, Hermans et al. 2017)."""

from __future__ import annotations

import keras
from keras import ops

from siamese.losses.pairwise import SettingsLoss, active_mean, batch_pairs, positive, squared_distances


def triplet_loss(y_true, distances, margin: float = 1.0):
    """Per-triplet loss `max(d(a, p)^2 - d(a, n)^2 + margin, 0)`; `distances[:, 0]` is anchor-positive and
    `distances[:, 1]` anchor-negative (y_true is ignored: a triplet's roles are its labels)."""
    d = ops.cast(distances, "float32")
    return ops.maximum(ops.square(d[:, 0]) - ops.square(d[:, 1]) + margin, 0.0)


def batch_triplet_loss(y_true, embeddings, margin: float = 1.0):
    """The triplet loss over every triplet of a batch of embeddings, a scalar: every anchor a, positive p (same
    item) and negative n (an item sharing no label) costs `max(d(a, p)^2 - d(a, n)^2 + margin, 0)`, and the loss
    is the mean over the triplets that cost something. `y_true` as `pack_relations` makes it."""
    is_positive, is_negative, e = batch_pairs(y_true, embeddings)
    squared = squared_distances(e)
    cost = ops.maximum(squared[:, :, None] - squared[:, None, :] + margin, 0.0)  # (anchor, positive, negative)
    return active_mean(cost, is_positive[:, :, None] * is_negative[:, None, :])


@keras.saving.register_keras_serializable(package="siamese")
class TripletLoss(SettingsLoss):
    """`triplet_loss` as a serializable Keras loss; `margin` defaults to 1.0."""

    def __init__(self, margin: float = 1.0, name: str = "triplet_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(triplet_loss, name, reduction, dtype, margin=positive("margin", margin))


@keras.saving.register_keras_serializable(package="siamese")
class BatchTripletLoss(SettingsLoss):
    """`batch_triplet_loss` as a serializable Keras loss (y_pred: embeddings); `margin` defaults to 1.0."""

    def __init__(self, margin: float = 1.0, name: str = "batch_triplet_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(batch_triplet_loss, name, reduction, dtype,
                         margin=positive("margin", margin))
