"""The embedding network (uint8 pixels in, L2-normalised embedding out) and the siamese training models.

The embedding network owns its preprocessing: it takes uint8 RGB images of its input size and scales them
the way its backbone expects, so training, export, index and query cannot disagree about it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np

from siamese.config import Backbone, get_backbone
from siamese.errors import SiameseError
from siamese.layers import EuclideanDistance


def _small_cnn(inputs, filters=(32, 64, 128)):
    """Three blocks of two 3x3 convolutions with batch norm, then the last block's features flattened.

    The backbone for training from scratch on a CPU; use a pretrained backbone for photos on a GPU. On
    Fashion-MNIST (28 px, 2 cores) these widths reach in 2 epochs the precision@1 that half of them reach in
    8, at about twice the time per image; flattening keeps where features are (the images of a catalog are
    framed alike) and beat global average pooling by 0.3 points at 1.2x the time (see docs/benchmarks.md).
    """
    x = inputs
    for n, f in enumerate(filters):
        for k in range(2):
            x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{n}_conv{k}")(x)
            x = keras.layers.BatchNormalization(synchronized=_synchronized(), name=f"block{n}_bn{k}")(x)
            x = keras.layers.ReLU(name=f"block{n}_relu{k}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{n}_pool")(x) if n < len(filters) - 1 else x
    return keras.layers.Flatten(name="pool")(x)


def _synchronized() -> bool:
    """Whether batch norm must gather its statistics across replicas: under a `tf.distribute` strategy of several,
    so that they are the whole batch's, as on one device. JAX's DataParallel computes on the whole (sharded) batch
    anyway. `save_embedding` leaves it out of checkpoints, which Keras refuses to load on other backends."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync > 1


def _application(backbone: Backbone, image_size: int, weights: str | None):
    """A keras.applications model without its top, average-pooled; explains an offline ImageNet download."""
    constructor = getattr(keras.applications, backbone.application)
    try:
        return constructor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg")
    except Exception as e:
        if weights == "imagenet" and "fetch failure" in str(e):
            raise SiameseError(
                f"ImageNet weights for {backbone.name} could not be downloaded (no internet?): {e}. "
                f"Fix: on a machine with internet run once to fill ~/.keras/models, or download the "
                f"no-top weights file and pass `weights='PATH'`, or `weights='none'` to train from scratch."
            ) from None
        if isinstance(e, ValueError):  # e.g. "Input size must be at least 75x75"
            raise SiameseError(f"{backbone.name} cannot be built for {image_size} px images: {e}. Fix: leave out "
                               f"the image size for the backbone's own ({backbone.image_size}).") from None
        raise


def build_embedding(
    backbone: str = "small_cnn",
    image_size: int | None = None,
    embedding_dim: int | None = 128,
    weights: str | None = None,
    trainable_layers: int | None = None,
) -> keras.Model:
    """The embedding network: uint8 `(image_size, image_size, 3)` in, L2-normalised `(embedding_dim,)` out.

    `embedding_dim` None leaves out the projection: the backbone's pooled features, L2-normalised, are the
    embedding (how a pretrained ImageNet backbone is used untrained, e.g. by `export` without a model).

    `image_size` defaults to the backbone's own (small_cnn 64, mobilenet_v2 and efficientnet_b0 224,
    inception 299). `weights` is "imagenet" (downloaded by Keras, cached in ~/.keras/models), None / "none"
    (random), or a path to a weights file (the backbone's no-top file; for small_cnn, a `.weights.h5` of
    this whole embedding network). `trainable_layers` None (default) trains the whole backbone,
    0 freezes it, N trains only its top N layers; batch-norm layers of a pretrained backbone stay frozen
    whenever any layer is frozen. The projection and normalisation run in float32 under mixed precision.
    """
    spec = get_backbone(backbone)
    image_size = image_size or spec.image_size
    if image_size < 8:
        raise SiameseError(f"Expected `image_size` >= 8. Received: {image_size}")
    if embedding_dim is not None and embedding_dim < 1:
        raise SiameseError(f"Expected `embedding_dim` >= 1. Received: {embedding_dim}")
    weights = None if weights in (None, "none") else weights
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise SiameseError(f"Weights file not found: {weights}. Fix: pass an existing file, imagenet or none.")
    if backbone == "small_cnn" and weights == "imagenet":
        raise SiameseError("small_cnn has no ImageNet weights. Fix: pass `weights='none'`, or a pretrained `backbone`.")

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(spec.scale, spec.offset, name="preprocess")(inputs)
    if spec.application is None:
        pooled = _small_cnn(x)
    else:
        base = _application(spec, image_size, weights)
        pooled = base(x)
    x = pooled
    if embedding_dim is not None:
        x = keras.layers.Dense(embedding_dim, dtype="float32", name="projection")(x)
    outputs = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(x)
    model = keras.Model(inputs, outputs, name=f"embedding_{backbone}")
    if spec.application is None:
        features = [layer for layer in model.layers if layer.name.startswith("block")]
        if weights is not None:
            model.load_weights(weights)
    else:
        features = base.layers
    if trainable_layers is not None:
        if trainable_layers < 0:
            raise SiameseError(f"Expected `trainable_layers` >= 0. Received: {trainable_layers}")
        cut = len(features) - trainable_layers
        for n, layer in enumerate(features):
            layer.trainable = n >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return model


def _embedder(embedding: keras.Model, augment: keras.Model | None):
    """`embedding`, or `embedding` of `augment`ed images (the augmentation acting in training only)."""
    return embedding if augment is None else lambda x: embedding(augment(x))


def build_siamese(embedding: keras.Model, augment: keras.Model | None = None) -> keras.Model:
    """Two uint8 images in, the Euclidean distance of their embeddings out `(batch, 1)`: for pair losses.
    With `augment`, each image is augmented before it is embedded, in training only."""
    shape = embedding.input_shape[1:]
    a = keras.Input(shape, dtype="uint8", name="image_a")
    b = keras.Input(shape, dtype="uint8", name="image_b")
    embed = _embedder(embedding, augment)
    distance = EuclideanDistance(name="distance")([embed(a), embed(b)])
    return keras.Model([a, b], distance, name="siamese")


class BatchAll(keras.Model):
    """The embedding network wrapped for a batch-all loss, which sees the whole batch on every replica.

    Under `tf.distribute` each replica embeds its share of a batch; the embeddings and labels of all shares
    are gathered before the loss (the gradient flows back to each share), so N replicas train exactly like
    one device given the same batch. On JAX the loss is of the whole (sharded) batch already.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if keras.backend.backend() == "tensorflow":
            from siamese.distribute import replica_gather

            gathered = replica_gather(y, y_pred)
            if gathered is not None:
                y, y_pred, replicas = gathered
                # every replica holds the whole batch's loss and the replicas' gradients are summed: each counts
                # 1/N (Keras divides per-sample losses by N itself, but leaves a scalar loss like this one as it is)
                return super().compute_loss(x, y, y_pred, sample_weight, training) / replicas
        return super().compute_loss(x, y, y_pred, sample_weight, training)


def build_batch_all(embedding: keras.Model, augment: keras.Model | None = None, views: int = 1) -> keras.Model:
    """uint8 images in, their embeddings out: for the batch-all losses (`siamese.losses.batch_*`).

    With `augment` (e.g. `siamese.augment.augmentation()`), each image is augmented before it is embedded, in
    training only. `views` > 1 embeds that many augmented views of each image: `(batch, views, dim)` out, the
    views being positives of each other.
    """
    images = keras.Input(embedding.input_shape[1:], dtype="uint8", name="images")
    if views < 1 or (views > 1 and augment is None):
        raise SiameseError(f"Expected `views` >= 1, and augmentation for `views` > 1. Received: views={views}, "
                           f"augment={augment}")
    if views == 1:
        outputs = _embedder(embedding, augment)(images)
    else:
        outputs = keras.layers.Concatenate(axis=1, name="views")(
            [keras.layers.Reshape((1, -1))(embedding(augment(images))) for _ in range(views)])
    return BatchAll(images, outputs, name="batch_all")


def build_triplet(embedding: keras.Model, augment: keras.Model | None = None) -> keras.Model:
    """Anchor, positive and negative images in; `(batch, 2)` distances anchor-positive, anchor-negative out.
    With `augment`, each image is augmented before it is embedded, in training only."""
    shape = embedding.input_shape[1:]
    anchor, positive, negative = (keras.Input(shape, dtype="uint8", name=n) for n in ("anchor", "positive", "negative"))
    embed = _embedder(embedding, augment)
    e_a, e_p, e_n = embed(anchor), embed(positive), embed(negative)
    d_ap = EuclideanDistance(name="distance_positive")([e_a, e_p])
    d_an = EuclideanDistance(name="distance_negative")([e_a, e_n])
    distances = keras.layers.Concatenate(dtype="float32", name="distances")([d_ap, d_an])
    return keras.Model([anchor, positive, negative], distances, name="triplet")


def save_embedding(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save(path)` in a file that loads on every backend: batch norm's `synchronized` (TensorFlow's alone,
    set while training on several replicas) is saved as False."""
    synchronized = [layer for layer in model.layers if getattr(layer, "synchronized", False)]
    for layer in synchronized:
        layer.synchronized = False
    try:
        model.save(path)
    finally:
        for layer in synchronized:
            layer.synchronized = True


def load_embedding(path: str | os.PathLike) -> keras.Model:
    """Load an embedding network saved by training (`.keras`, `.h5` or `.hdf5`), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise SiameseError(f"Model file not found: {path}. Fix: pass the checkpoint written by `train`.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:
        raise SiameseError(f"{path} could not be loaded as a Keras model ({type(e).__name__}: {e}).") from None
    check_embedding_network(model, str(path))
    return model


def check_embedding_network(model: keras.Model, source: str) -> None:
    """Refuse a model that is not an embedding network: one uint8 `(batch, size, size, 3)` image input of a fixed
    size, one `(batch, dim)` vector per image out, and finite numbers out on a test batch (black, white and noise
    images), so that a broken checkpoint is named as the cause before it embeds anything."""
    inputs = [(tuple(t.shape), str(t.dtype)) for t in model.inputs]
    shape = inputs[0][0] if len(inputs) == 1 else ()
    if (len(inputs) != 1 or inputs[0][1] != "uint8" or len(shape) != 4 or shape[3] != 3 or shape[1] is None
            or shape[1] != shape[2]):
        raise SiameseError(f"Expected {source} to be an embedding network with one uint8 image input of shape "
                           f"(batch, size, size, 3), a fixed square RGB size. Received: inputs {inputs}. Fix: pass "
                           "the embedding network a `train` checkpoint holds.")
    outputs = [tuple(t.shape) for t in model.outputs]
    if len(outputs) != 1 or len(outputs[0]) != 2 or not outputs[0][1]:
        raise SiameseError(f"Expected {source} to give one embedding vector per image, shape (batch, dim). "
                           f"Received: outputs {outputs}. Fix: pass the embedding network a `train` checkpoint "
                           "holds, or end yours in a Flatten or pooling layer.")
    size = shape[1]
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    batch = np.stack([np.zeros_like(noise), np.full_like(noise, 255), noise])
    out = keras.ops.convert_to_numpy(model(batch, training=False))
    if not np.isfinite(out).all():
        raise SiameseError(f"{source} gives NaN or infinite embeddings on a test batch of black, white and noise "
                           "images: the model is broken (its weights hold NaN, or training diverged). Fix: use an "
                           "earlier checkpoint, or train again with a lower learning rate.")


def model_fingerprint(model: keras.Model) -> str:
    """SHA-256 of a model's input and output shapes and every weight, in order: same weights, same hash.

    Indexes record it, so that a query embedded by a different model is refused instead of answered wrongly.
    """
    digest = hashlib.sha256(json.dumps([list(model.input_shape), list(model.output_shape)]).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
