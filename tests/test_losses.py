"""Losses and the distance layer against values worked out by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from siamese.layers import EuclideanDistance
from siamese.losses import ContrastiveLoss, TripletLoss, contrastive_loss, triplet_loss

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


@pytest.mark.parametrize("cls", [ContrastiveLoss, TripletLoss])
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
