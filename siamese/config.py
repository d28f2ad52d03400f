"""Settings as dataclasses (written as JSON beside what a run produces) and the table of backbones.

Nothing here imports TensorFlow, so the command line can show its defaults instantly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from siamese.errors import SiameseError

BACKENDS = ("tensorflow", "jax")
"""The Keras backends `train` runs on; every other command runs on TensorFlow, which loads checkpoints of both."""
CACHES = ("none", "memory", "disk")
CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
PRETRAINED_BACKBONE = "inception_v3"
"""The embedder without `--keras-model`: Google's Inception v3 with ImageNet weights, as both seeds used."""


@dataclass(frozen=True)
class Backbone:
    """A feature extractor: its constructor, default input size and the input scaling it was trained with."""

    name: str
    image_size: int
    scale: float
    offset: float
    application: str | None = None  # attribute of keras.applications; None for small_cnn


BACKBONES = {
    b.name: b
    for b in (
        Backbone("small_cnn", 64, 1 / 255, 0.0),
        Backbone("mobilenet_v2", 224, 1 / 127.5, -1.0, "MobileNetV2"),
        Backbone("efficientnet_b0", 224, 1.0, 0.0, "EfficientNetB0"),  # rescales inside the model
        Backbone("inception_v3", 299, 1 / 127.5, -1.0, "InceptionV3"),
        Backbone("inception_resnet_v2", 299, 1 / 127.5, -1.0, "InceptionResNetV2"),
    )
}


@dataclass(frozen=True)
class Setting:
    """A setting of a plugin (an engine's build setting, a loss's), a keyword argument of its class shown as a
    command-line flag.

    `flag` defaults to `--name` with dashes; `default_text` (for help) to "default <default>"."""

    name: str
    type: type
    default: object
    help: str
    flag: str | None = None
    metavar: str | None = None
    default_text: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or f"--{self.name.replace('_', '-')}"


def get_backbone(name: str) -> Backbone:
    """The `Backbone` called `name`; raises with the list of names otherwise."""
    if name not in BACKBONES:
        raise SiameseError(f"Expected `backbone` to be one of {', '.join(BACKBONES)}. Received: {name!r}")
    return BACKBONES[name]


@dataclass
class TrainConfig:
    """Every setting of a training run; written as JSON beside the checkpoint it produces."""

    MONITORS: ClassVar[tuple[str, ...]] = ("val_map_at_r", "val_precision_at_1", "val_loss")
    """`monitor`: what picks the best epoch; the retrieval figures are of the held-out items, and the untrained
    network (epoch 0) is a candidate too, so training never hands back a model worse than its start."""
    LR_SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "cosine")
    """`lr_schedule`: AdamW's learning rate stays constant, or decays to 0 along a cosine over the run."""

    labeled_data: str
    image_dir: str
    out: str = "checkpoints/siamese.keras"
    val_labeled_data: str | None = None  # a separate validation catalog instead of `val_fraction`
    epochs: int = 10
    batch_size: int = 64  # images per batch with batches="pk"; pairs (triplets) with "pairs"
    images_per_epoch: int = 8192  # images per epoch with batches="pk"; pairs (triplets) with "pairs"
    val_pairs: int = 1024
    val_images: int = 2000  # held-out images used for precision@1 (a seeded sample when there are more)
    backbone: str = "small_cnn"
    weights: str = "auto"  # imagenet for keras.applications backbones, none for small_cnn; or a path
    image_size: int | None = None  # the backbone's default
    embedding_dim: int = 128
    trainable_layers: int | None = None  # None: train all; 0: freeze the backbone; N: its top N layers
    loss: str | None = None  # a name of siamese.losses.LOSSES; None: supcon with batches="pk", contrastive with "pairs"
    batches: str = "pk"  # see siamese.losses.BATCHES: P x K batches of images, or drawn pairs (triplets)
    images_per_item: int = 4  # K of a P x K batch with batches="pk"
    margin: float = 1.0  # contrastive and triplet
    temperature: float = 0.1  # supcon
    loss_settings: dict = dataclasses.field(default_factory=dict)  # settings of a registered loss not named above
    mining: str | None = None  # deprecated: `batches` ("batch-all" is "pk")
    augment: bool = False  # random rotation, shift, zoom and contrast of training images (siamese.augment)
    flip: bool = False  # random horizontal flips too, with augment
    views: int = 2  # augmented views of each training image, positives of each other (needs augment)
    monitor: str = "val_map_at_r"  # see MONITORS
    learning_rate: float | None = None  # AdamW's: 3e-3 for small_cnn (from scratch), 1e-3 for pretrained backbones
    lr_schedule: str = "cosine"  # see LR_SCHEDULES
    weight_decay: float = 0.05  # AdamW's decoupled weight decay, scaled by the learning rate; 0 is Adam
    val_fraction: float = 0.2
    seed: int = 0
    on_bad_image: str = "fail"
    cache: str = "auto"
    backend: str | None = None  # tensorflow or jax; None: the one Keras runs on (KERAS_BACKEND, default tensorflow)
    tensorboard: str | None = None  # TensorBoard log folder; None: NAME.logs beside the checkpoint; "none": no logs

    def resolved(self) -> TrainConfig:
        """A copy with defaults that depend on other settings filled in, after checking every value."""
        spec = get_backbone(self.backbone)
        out = Path(self.out)
        if out.suffix not in CHECKPOINT_SUFFIXES:
            raise SiameseError(
                f"Expected `out` to end in {', '.join(CHECKPOINT_SUFFIXES)}. Received: {self.out}"
            )
        from siamese.loss_registry import BATCHES, DEFAULT_LOSS, get_loss

        batches = self.batches
        if self.mining is not None:
            warnings.warn("`mining` is deprecated: pass `batches` ('pk' for 'batch-all', or 'pairs')",
                          DeprecationWarning, stacklevel=2)
            batches = {"batch-all": "pk"}.get(self.mining, self.mining)
        if batches not in BATCHES:
            raise SiameseError(f"Expected `batches` to be one of {', '.join(BATCHES)}. Received: {batches!r}")
        loss = self.loss or DEFAULT_LOSS[batches]
        get_loss(loss).check(batches)
        if self.monitor not in self.MONITORS:
            raise SiameseError(f"Expected `monitor` to be one of {', '.join(self.MONITORS)}. "
                               f"Received: {self.monitor!r}")
        if self.temperature <= 0:
            raise SiameseError(f"Expected `temperature` > 0. Received: {self.temperature}")
        views = self.views if self.augment and batches == "pk" else 1
        if self.views < 1:
            raise SiameseError(f"Expected `views` >= 1. Received: {self.views}")
        if self.image_size is not None and self.image_size < 8:
            raise SiameseError(f"Expected `image_size` >= 8 (or none: the backbone's own). Received: {self.image_size}")
        for name in ("epochs", "batch_size", "val_images"):
            if getattr(self, name) < 1:
                raise SiameseError(f"Expected `{name}` >= 1. Received: {getattr(self, name)}")
        if batches == "pk" and (self.images_per_item < 2 or self.batch_size < self.images_per_item):
            raise SiameseError(f"Expected 2 <= `images_per_item` <= `batch_size` with `batches='pk'`. Received: "
                               f"{self.images_per_item} and {self.batch_size}")
        learning_rate = self.learning_rate
        if learning_rate is None:
            learning_rate = 3e-3 if spec.application is None else 1e-3
        numbers = (("margin", self.margin), ("learning_rate", learning_rate), ("temperature", self.temperature),
                   ("weight_decay", self.weight_decay), ("val_fraction", self.val_fraction))
        for name, value in numbers:
            if not math.isfinite(value):
                raise SiameseError(f"Expected a finite `{name}`. Received: {value}")
        if self.margin <= 0 or learning_rate <= 0:
            raise SiameseError(
                f"Expected `margin` and `learning_rate` > 0. Received: {self.margin} and {learning_rate}"
            )
        if self.weight_decay < 0:
            raise SiameseError(f"Expected `weight_decay` >= 0. Received: {self.weight_decay}")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise SiameseError(f"Expected `lr_schedule` to be one of {', '.join(self.LR_SCHEDULES)}. "
                               f"Received: {self.lr_schedule!r}")
        if self.cache not in ("auto", *CACHES):
            raise SiameseError(f"Expected `cache` to be auto, {', '.join(CACHES)}. Received: {self.cache!r}")
        if self.backend not in (None, *BACKENDS):
            raise SiameseError(f"Expected `backend` to be one of {', '.join(BACKENDS)}. Received: {self.backend!r}")
        weights = self.weights
        if weights == "auto":
            weights = "none" if spec.application is None else "imagenet"
        tensorboard = self.tensorboard or str(out.with_name(f"{out.stem}.logs"))
        return dataclasses.replace(self, weights=weights, image_size=self.image_size or spec.image_size,
                                   learning_rate=learning_rate, views=views, loss=loss, tensorboard=tensorboard,
                                   batches=batches, mining=None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
