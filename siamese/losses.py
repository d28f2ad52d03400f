"""The contrastive loss of Hadsell, Chopra and LeCun (CVPR 2006), and a triplet loss.

Label convention (as in `siamese.pairs`): **y = 1 for the same item**, y = 0 for different items.
For a pair at distance d: similar pairs cost d^2 (pulled together), dissimilar pairs cost
max(margin - d, 0)^2 (pushed apart until they are `margin` away). The loss is the mean over the batch.
"""

from __future__ import annotations

import keras
from keras import ops


def contrastive_loss(y_true, distance, margin: float = 1.0):
    """Per-pair contrastive loss: `y * d^2 + (1 - y) * max(margin - d, 0)^2` (y = 1 same item)."""
    y = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    d = ops.reshape(ops.cast(distance, "float32"), (-1,))  # (batch, 1) from EuclideanDistance
    return y * ops.square(d) + (1.0 - y) * ops.square(ops.maximum(margin - d, 0.0))


class _MarginLoss(keras.losses.Loss):
    """A loss `fn(y_true, y_pred, margin)` with a `margin` that `get_config` keeps; subclasses set `fn`."""

    def __init__(self, margin: float, name: str, reduction: str, dtype):
        if margin <= 0:
            raise ValueError(f"Expected margin > 0. Received: margin={margin}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred, self.margin)

    def get_config(self) -> dict:
        return {**super().get_config(), "margin": self.margin}


@keras.saving.register_keras_serializable(package="siamese")
class ContrastiveLoss(_MarginLoss):
    """`contrastive_loss` as a serializable Keras loss; `margin` defaults to 1.0."""

    fn = staticmethod(contrastive_loss)

    def __init__(self, margin: float = 1.0, name: str = "contrastive_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(margin, name, reduction, dtype)


def triplet_loss(y_true, distances, margin: float = 1.0):
    """Per-triplet loss `max(d(a, p)^2 - d(a, n)^2 + margin, 0)`; `distances[:, 0]` is anchor-positive and
    `distances[:, 1]` anchor-negative (y_true is ignored: a triplet's roles are its labels)."""
    d = ops.cast(distances, "float32")
    return ops.maximum(ops.square(d[:, 0]) - ops.square(d[:, 1]) + margin, 0.0)


@keras.saving.register_keras_serializable(package="siamese")
class TripletLoss(_MarginLoss):
    """`triplet_loss` as a serializable Keras loss; `margin` defaults to 1.0."""

    fn = staticmethod(triplet_loss)

    def __init__(self, margin: float = 1.0, name: str = "triplet_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(margin, name, reduction, dtype)
