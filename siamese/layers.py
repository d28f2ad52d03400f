"""Custom layers, registered so saved models load without `custom_objects` (and no `Lambda` anywhere)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="siamese")
class EuclideanDistance(keras.layers.Layer):
    """Euclidean distance between two batches of vectors, shape `(batch, 1)`, computed in float32.

    `epsilon` (default 1e-9) keeps the gradient of the square root finite when the vectors coincide.
    """

    def __init__(self, epsilon: float = 1e-9, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        a, b = (ops.cast(x, "float32") for x in inputs)
        squared = ops.sum(ops.square(a - b), axis=-1, keepdims=True)
        return ops.sqrt(ops.maximum(squared, self.epsilon))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}
