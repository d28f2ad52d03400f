"""Losses and the distance layer against values worked out by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from siamese.layers import EuclideanDistance
from siamese.losses import (
    BatchContrastiveLoss,
    BatchSupConLoss,
    BatchTripletLoss,
    ContrastiveLoss,
    TripletLoss,
    batch_contrastive_loss,
    batch_supcon_loss,
    batch_triplet_loss,
    contrastive_loss,
    triplet_loss,
)

SAME = np.array([1.0, 0.0, 0.0, 1.0], np.float32)  # 1 = same item
DIST = np.array([0.3, 0.2, 1.5, 0.0], np.float32)


def test_contrastive_loss_by_hand():
    # same pairs cost d^2; different pairs cost max(margin - d, 0)^2
    assert np.allclose(contrastive_loss(SAME, DIST, 1.0), [0.09, 0.64, 0.0, 0.0])
    assert np.allclose(contrastive_loss(SAME, DIST, 2.0), [0.09, 3.24, 0.25, 0.0])
    assert float(ContrastiveLoss()(SAME, DIST[:, None])) == pytest.approx((0.09 + 0.64) / 4)
    assert float(ContrastiveLoss(margin=2.0)(SAME, DIST)) == pytest.approx((0.09 + 3.24 + 0.25) / 4)


def test_triplet_loss_by_hand():
    distances = np.array([[0.5, 1.0], [1.0, 0.2], [0.1, 2.0]], np.float32)  # (anchor-positive, anchor-negative)
    # max(d_ap^2 - d_an^2 + margin, 0): 0.25 - 1 + 1, 1 - 0.04 + 1, 0.01 - 4 + 1 -> 0
    assert np.allclose(triplet_loss(None, distances, 1.0), [0.25, 1.96, 0.0])
    assert float(TripletLoss()(np.zeros(3), distances)) == pytest.approx((0.25 + 1.96) / 3)


def test_batch_contrastive_loss_by_hand():
    # images 0 and 1 are one item, image 2 another (no shared label); rows: position, then relations
    relations = np.array([[0, -1, 1, 0], [1, 1, -1, 0], [2, 0, 0, -1]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    # d01^2 = 0.8 (the positive pair); d02 = sqrt(2) > margin (already apart: not counted);
    # d12 = sqrt(0.4) < 1: pushed by (1 - sqrt(0.4))^2; means over the pairs of each kind, both orders
    push = (1 - np.sqrt(0.4)) ** 2
    assert float(batch_contrastive_loss(relations, embeddings)) == pytest.approx(0.8 + push, rel=1e-5)
    # margin 2: both negative pairs are closer than it and count
    push2 = ((2 - np.sqrt(2)) ** 2 + (2 - np.sqrt(0.4)) ** 2) / 2
    assert float(BatchContrastiveLoss(margin=2.0)(relations, embeddings)) == pytest.approx(0.8 + push2, rel=1e-5)
    # one replica's share of the batch (rows 1 and 2): only the pairs among them count, no positive pair
    assert float(batch_contrastive_loss(relations[1:], embeddings[1:])) == pytest.approx(push, rel=1e-5)
    # no pair at all (every relation -1, e.g. items that share a label): nothing to learn, no NaN
    no_pairs = np.hstack([relations[:, :1], -np.ones((3, 3), np.float32)])
    assert float(batch_contrastive_loss(no_pairs, embeddings)) == 0.0


def test_batch_triplet_loss_by_hand():
    relations = np.array([[0, -1, 1, 0], [1, 1, -1, 0], [2, 0, 0, -1]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    # two triplets: (0, 1, 2) costs max(0.8 - 2 + 1, 0) = 0 (not counted); (1, 0, 2) costs 0.8 - 0.4 + 1
    assert float(batch_triplet_loss(relations, embeddings)) == pytest.approx(1.4, rel=1e-5)
    assert float(BatchTripletLoss(margin=0.5)(relations, embeddings)) == pytest.approx(0.9, rel=1e-5)
    assert float(batch_triplet_loss(relations[1:], embeddings[1:])) == 0.0  # no positive among rows 1 and 2


def supcon_by_numpy(relation: np.ndarray, embeddings: np.ndarray, temperature: float) -> float:
    """Khosla et al.'s L_out written out loop by loop: an independent computation of the batch loss."""
    total, anchors = 0.0, 0
    for i in range(len(embeddings)):
        others = [a for a in range(len(embeddings)) if relation[i, a] in (0.0, 1.0)]
        positives = [p for p in others if relation[i, p] == 1.0]
        if not positives:
            continue
        logits = {a: float(embeddings[i] @ embeddings[a]) / temperature for a in others}
        norm = np.log(sum(np.exp(v) for v in logits.values()))
        total += -np.mean([logits[p] - norm for p in positives])
        anchors += 1
    return total / anchors


def test_batch_supcon_loss_against_a_loop_by_hand():
    relations = np.array([[0, -1, 1, 0], [1, 1, -1, 0], [2, 0, 0, -1]], np.float32)
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    # anchor 0: positive 1 (cosine 0.6) against 1 and 2 (cosine 0); anchor 1 likewise with 0 (0.6) and 2 (0.8);
    # anchor 2 has no positive and does not count
    t = 0.5
    by_hand = (-(0.6 / t - np.log(np.exp(0.6 / t) + 1)) - (0.6 / t - np.log(np.exp(0.6 / t) + np.exp(0.8 / t)))) / 2
    assert float(batch_supcon_loss(relations, embeddings, t)) == pytest.approx(by_hand, rel=1e-5)
    rng = np.random.default_rng(0)
    items = rng.integers(0, 4, 12)
    relation = np.where(items[:, None] == items[None, :], 1.0, 0.0).astype(np.float32)
    relation[[2, 5], [5, 2]] = -1.0  # two items sharing a label: no pair
    np.fill_diagonal(relation, -1.0)
    e = rng.normal(size=(12, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    y = np.hstack([np.arange(12, dtype=np.float32)[:, None], relation])
    want = supcon_by_numpy(relation, e, 0.1)
    assert float(BatchSupConLoss()(y, e)) == pytest.approx(want, rel=1e-4)
    no_pairs = np.hstack([y[:, :1], -np.ones((12, 12), np.float32)])
    assert float(batch_supcon_loss(no_pairs, e)) == 0.0


def test_two_views_of_an_image_are_a_positive_pair():
    # images 0 and 1 of two items sharing no label; each seen twice (views): rows 0, 1 then their second views
    relations = np.array([[0, -1, 0], [1, 0, -1]], np.float32)
    views = np.array([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [0.6, 0.8]]], np.float32)  # (image, view, dim)
    flat = np.concatenate([views[:, 0], views[:, 1]])
    relation = np.array([[-1, 0, 1, 0], [0, -1, 0, 1], [1, 0, -1, 0], [0, 1, 0, -1]], np.float32)
    want = supcon_by_numpy(relation, flat, 0.1)
    assert float(batch_supcon_loss(relations, views, 0.1)) == pytest.approx(want, rel=1e-5)
    # the contrastive loss: the two positive pairs (each image's views) pulled, the close negatives pushed
    squared = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    pulled = (squared[0, 2] + squared[1, 3]) / 2
    push = [max(1 - np.sqrt(squared[i, j]), 0) ** 2 for i in range(4) for j in range(4) if relation[i, j] == 0]
    push = [c for c in push if c > 0]
    want = pulled + sum(push) / max(len(push), 1)
    assert float(batch_contrastive_loss(relations, views)) == pytest.approx(want, rel=1e-5)


def test_supcon_serializes_with_its_temperature():
    again = keras.losses.deserialize(keras.losses.serialize(BatchSupConLoss(temperature=0.3)))
    assert type(again) is BatchSupConLoss and again.temperature == 0.3
    with pytest.raises(ValueError, match="Expected temperature > 0. Received: temperature=0"):
        BatchSupConLoss(temperature=0)


@pytest.mark.parametrize("cls", [ContrastiveLoss, TripletLoss, BatchContrastiveLoss, BatchTripletLoss])
def test_losses_serialize_with_their_margin(cls):
    loss = cls(margin=0.7)
    assert loss.get_config()["margin"] == 0.7
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is cls and again.margin == 0.7
    with pytest.raises(ValueError, match="Expected margin > 0. Received: margin=0"):
        cls(margin=0)


def test_euclidean_distance_layer():
    a = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 4.0]], np.float32)
    b = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    out = EuclideanDistance()([a, b]).numpy()
    assert out.shape == (3, 1)
    assert np.allclose(out[:, 0], [5.0, np.sqrt(1e-9), 5.0])
    x = tf.Variable(a)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(EuclideanDistance()([x, b]))
    assert np.isfinite(tape.gradient(total, x).numpy()).all()  # finite where the vectors coincide
    layer = keras.layers.deserialize(keras.layers.serialize(EuclideanDistance(epsilon=1e-6)))
    assert isinstance(layer, EuclideanDistance) and layer.epsilon == 1e-6
