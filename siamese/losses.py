"""The contrastive loss of Hadsell, Chopra and LeCun (CVPR 2006) and a triplet loss, each also in a batch-all
form, and the supervised contrastive loss of Khosla et al. (NeurIPS 2020), batch-all only.

Label convention (as in `siamese.pairs`): **y = 1 for the same item**, y = 0 for different items.
For a pair at distance d: similar pairs cost d^2 (pulled together), dissimilar pairs cost
max(margin - d, 0)^2 (pushed apart until they are `margin` away). The loss is the mean over the batch.
The batch-all forms apply the same costs to every pair (triplet) of a batch of embeddings (online mining).
A batch-all loss also takes several augmented views of each image, `(b, views, dim)`: two views of one
image are then a positive pair too (instance positives, as in SimCLR and SupCon).
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


def _batch_pairs(y_true, embeddings):
    """Among a batch's rows (see `batch_contrastive_loss` for `y_true`): the positive-pair mask, the
    negative-pair mask and the embeddings as rows, `(n, n)`, `(n, n)` float32 and `(n, dim)` float32.

    `embeddings` `(b, dim)` gives n = b rows; `(b, views, dim)` gives n = views x b rows (view by view),
    where two views of one image are a positive pair and every view keeps its image's relations.
    """
    y = ops.cast(y_true, "float32")
    e = ops.cast(embeddings, "float32")
    relation = ops.take(y[:, 1:], ops.cast(y[:, 0], "int32"), axis=1)  # (b, b): the rows among themselves
    if len(e.shape) == 3:
        views = e.shape[1]
        e = ops.reshape(ops.transpose(e, (1, 0, 2)), (-1, e.shape[2]))
        relation = ops.tile(relation, (views, views))
        n = ops.shape(relation)[0]
        same_image = ops.tile(ops.eye(ops.shape(y)[0]), (views, views)) - ops.eye(n)
        relation = ops.where(same_image > 0, 1.0, relation)
    positive = ops.cast(ops.equal(relation, 1.0), "float32")
    negative = ops.cast(ops.equal(relation, 0.0), "float32")
    return positive, negative, e


def _squared_distances(e):
    """`(n, n)` squared Euclidean distances among the rows of `e`, at least 1e-9 (a finite sqrt gradient)."""
    norms = ops.sum(ops.square(e), axis=1)
    return ops.maximum(norms[:, None] + norms[None, :] - 2.0 * ops.matmul(e, ops.transpose(e)), 1e-9)


def _active_mean(cost, mask):
    """The mean of `cost` over the entries of `mask` where it is positive (0 when there are none)."""
    cost = mask * cost
    return ops.sum(cost) / ops.maximum(ops.sum(mask * ops.cast(cost > 0.0, "float32")), 1.0)


def batch_contrastive_loss(y_true, embeddings, margin: float = 1.0):
    """The contrastive loss over every pair of a batch of embeddings (batch-all), a scalar.

    `embeddings` is `(b, dim)`. `y_true` is `(b, 1 + B)`: column 0 is each row's position in the whole
    batch of B images, then its relation to each image of that batch (`PairSampler.relations`): 1 same item,
    0 different items sharing no label, -1 no pair (itself, or items sharing a label: ignored). The rows may
    be a part of the batch (one replica's share under `tf.distribute`): only pairs among them count.

    Positives and negatives weigh the same: the mean of d^2 over the positive pairs plus the mean of
    max(margin - d, 0)^2 over the negative pairs that are closer than `margin` (the pairs that are already
    apart add nothing and are not counted, so the loss does not fade as most pairs become easy). A batch
    without a kind of pair adds 0 for it.
    """
    positive, negative, e = _batch_pairs(y_true, embeddings)
    squared = _squared_distances(e)
    pulled = ops.sum(positive * squared) / ops.maximum(ops.sum(positive), 1.0)
    return pulled + _active_mean(ops.square(ops.maximum(margin - ops.sqrt(squared), 0.0)), negative)


def batch_triplet_loss(y_true, embeddings, margin: float = 1.0):
    """The triplet loss over every triplet of a batch of embeddings (batch-all, Hermans et al. 2017), a scalar.

    Every anchor a, positive p (same item) and negative n (an item sharing no label) of the batch costs
    `max(d(a, p)^2 - d(a, n)^2 + margin, 0)`; the loss is the mean over the triplets that cost something.
    `y_true` as in `batch_contrastive_loss`.
    """
    positive, negative, e = _batch_pairs(y_true, embeddings)
    squared = _squared_distances(e)
    cost = ops.maximum(squared[:, :, None] - squared[:, None, :] + margin, 0.0)  # (anchor, positive, negative)
    return _active_mean(cost, positive[:, :, None] * negative[:, None, :])


def batch_supcon_loss(y_true, embeddings, temperature: float = 0.1):
    """The supervised contrastive loss (Khosla et al. 2020, L_out) over a batch of L2-normalised embeddings.

    Each row i is an anchor; for each of its positives p, the cost is
    `-log(exp(s_ip / t) / sum_a exp(s_ia / t))` with s the cosine similarity and a every other row that is a
    positive or a negative of i (pairs of items sharing a label are left out). A row's cost is the mean over
    its positives; the loss is the mean over the rows that have one. `y_true` as in `batch_contrastive_loss`.
    """
    positive, negative, e = _batch_pairs(y_true, embeddings)
    logits = ops.matmul(e, ops.transpose(e)) / temperature
    paired = positive + negative
    # a large negative, not -inf, for the rows left out: a row with no pair stays finite (and counts 0)
    log_prob = logits - ops.logsumexp(ops.where(paired > 0, logits, -1e9), axis=1, keepdims=True)
    counts = ops.sum(positive, axis=1)
    per_row = -ops.sum(positive * log_prob, axis=1) / ops.maximum(counts, 1.0)
    anchors = ops.cast(counts > 0, "float32")
    return ops.sum(per_row * anchors) / ops.maximum(ops.sum(anchors), 1.0)


@keras.saving.register_keras_serializable(package="siamese")
class BatchSupConLoss(keras.losses.Loss):
    """`batch_supcon_loss` as a serializable Keras loss (y_pred: embeddings); `temperature` defaults to 0.1."""

    def __init__(self, temperature: float = 0.1, name: str = "batch_supcon_loss", reduction="sum_over_batch_size",
                 dtype=None):
        if temperature <= 0:
            raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        return batch_supcon_loss(y_true, y_pred, self.temperature)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="siamese")
class BatchContrastiveLoss(_MarginLoss):
    """`batch_contrastive_loss` as a serializable Keras loss (y_pred: embeddings); `margin` defaults to 1.0."""

    fn = staticmethod(batch_contrastive_loss)

    def __init__(self, margin: float = 1.0, name: str = "batch_contrastive_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(margin, name, reduction, dtype)


@keras.saving.register_keras_serializable(package="siamese")
class BatchTripletLoss(_MarginLoss):
    """`batch_triplet_loss` as a serializable Keras loss (y_pred: embeddings); `margin` defaults to 1.0."""

    fn = staticmethod(batch_triplet_loss)

    def __init__(self, margin: float = 1.0, name: str = "batch_triplet_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(margin, name, reduction, dtype)
