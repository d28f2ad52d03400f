"""The supervised contrastive loss of Khosla et al. (NeurIPS 2020), over a P x K batch."""

from __future__ import annotations

import keras
from keras import ops

from siamese.losses.pairwise import SettingsLoss, batch_pairs, positive


def batch_supcon_loss(y_true, embeddings, temperature: float = 0.1):
    """The supervised contrastive loss (L_out) over a batch of L2-normalised embeddings.

    Each row i is an anchor; for each of its positives p, the cost is
    `-log(exp(s_ip / t) / sum_a exp(s_ia / t))` with s the cosine similarity and a every other row that is a
    positive or a negative of i (pairs of items sharing a label are left out). A row's cost is the mean over
    its positives; the loss is the mean over the rows that have one. `y_true` as `pack_relations` makes it.
    """
    is_positive, is_negative, e = batch_pairs(y_true, embeddings)
    logits = ops.matmul(e, ops.transpose(e)) / temperature
    paired = is_positive + is_negative
    # a large negative, not -inf, for the rows left out: a row with no pair stays finite (and counts 0)
    log_prob = logits - ops.logsumexp(ops.where(paired > 0, logits, -1e9), axis=1, keepdims=True)
    counts = ops.sum(is_positive, axis=1)
    per_row = -ops.sum(is_positive * log_prob, axis=1) / ops.maximum(counts, 1.0)
    anchors = ops.cast(counts > 0, "float32")
    return ops.sum(per_row * anchors) / ops.maximum(ops.sum(anchors), 1.0)


@keras.saving.register_keras_serializable(package="siamese")
class BatchSupConLoss(SettingsLoss):
    """`batch_supcon_loss` as a serializable Keras loss (y_pred: embeddings); `temperature` defaults to 0.1."""

    def __init__(self, temperature: float = 0.1, name: str = "batch_supcon_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(batch_supcon_loss, name, reduction, dtype,
                         temperature=positive("temperature", temperature))
