"""The contrastive loss of Hadsell, Chopra and LeCun (CVPR 2006), over drawn pairs and over a P x K batch.

y = 1 for the same item, 0 for different items (as in `siamese.pairs`). A pair at distance d costs d^2 when
similar (pulled together) and max(margin - d, 0)^2 when dissimilar (pushed apart until `margin` away).
"""

from __future__ import annotations

import keras
from keras import ops

from siamese.losses.pairwise import SettingsLoss, active_mean, batch_pairs, positive, squared_distances


def contrastive_costs(squared_distance, margin: float):
    """`(pull, push)`: what a pair at squared distance d^2 costs when similar, d^2, and when dissimilar,
    max(margin - d, 0)^2."""
    return squared_distance, ops.square(ops.maximum(margin - ops.sqrt(squared_distance), 0.0))


def contrastive_loss(y_true, distance, margin: float = 1.0):
    """Per-pair contrastive loss: `y * d^2 + (1 - y) * max(margin - d, 0)^2` (y = 1 same item)."""
    y = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    d = ops.reshape(ops.cast(distance, "float32"), (-1,))  # (batch, 1) from EuclideanDistance
    pull, push = contrastive_costs(ops.square(d), margin)
    return y * pull + (1.0 - y) * push


def batch_contrastive_loss(y_true, embeddings, margin: float = 1.0):
    """The contrastive loss over every pair of a batch of embeddings (batch-all), a scalar.

    `embeddings` is `(b, dim)` (or `(b, views, dim)`, see `batch_pairs`); `y_true` as `pack_relations` makes
    it. The rows may be a part of the batch (one replica's share under `tf.distribute`): only pairs among them
    count. Positives and negatives weigh the same: the mean of d^2 over the positive pairs plus the mean of
    max(margin - d, 0)^2 over the negative pairs closer than `margin` (pairs already apart add nothing and are
    not counted, so the loss does not fade as most pairs become easy). A batch without a kind of pair adds 0.
    """
    is_positive, is_negative, e = batch_pairs(y_true, embeddings)
    pull, push = contrastive_costs(squared_distances(e), margin)
    return ops.sum(is_positive * pull) / ops.maximum(ops.sum(is_positive), 1.0) + active_mean(push, is_negative)


@keras.saving.register_keras_serializable(package="siamese")
class ContrastiveLoss(SettingsLoss):
    """`contrastive_loss` as a serializable Keras loss (y_pred: pair distances); `margin` defaults to 1.0."""

    def __init__(self, margin: float = 1.0, name: str = "contrastive_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(contrastive_loss, name, reduction, dtype,
                         margin=positive("margin", margin))


@keras.saving.register_keras_serializable(package="siamese")
class BatchContrastiveLoss(SettingsLoss):
    """`batch_contrastive_loss` as a serializable Keras loss (y_pred: embeddings); `margin` defaults to 1.0."""

    def __init__(self, margin: float = 1.0, name: str = "batch_contrastive_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(batch_contrastive_loss, name, reduction, dtype,
                         margin=positive("margin", margin))
