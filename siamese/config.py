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
"""The embedder without `--keras-model`: Google's Inception v3 with ImageNet weights, as both original projects
(the training toolkit and ImageSim) did."""


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


BATCHES = ("pk", "pairs")
"""How `train` draws batches: pk, P items x K images each (`images_per_item`), the loss over every pair (triplet)
among them; pairs, drawn pairs (or triplets, for a loss over triplets), the loss over each."""


def batches_name(text: str) -> str:
    """A `batches` value, with the old `mining` spelling batch-all meaning pk."""
    return {"batch-all": "pk"}.get(text, text)


def flag(default, group: str, help: str, *, default_text: str | None = None, **argparse) -> dataclasses.Field:
    """A `TrainConfig` field that is also a `train` flag, declared once: its `default`, the `group` of `--help` it
    is listed in, its `help` (then "default X", or `default_text`), and argparse's keywords (`flag`, the option
    when it is not --name-with-dashes; `old`, deprecated spellings; `choices`, `metavar`, `action`, `type`)."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "default_text": default_text,
                                                        **argparse})


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

    labeled_data: str  # the catalog flags (--labeled-data, --image-dir, --on-bad-image) are every command's
    image_dir: str
    out: str = flag("checkpoints/siamese.keras", "output", "checkpoint: .keras, or .h5/.hdf5 for HDF5",
                    flag="--output", metavar="FILE", old=("--out",))
    val_labeled_data: str | None = flag(None, "catalog", "a separate validation catalog (filenames under "
                                        "--image-dir) instead of --val-fraction", metavar="F", default_text="")
    epochs: int = flag(10, "batches and loss", "")
    batch_size: int = flag(64, "batches and loss", "images per batch with --batches pk, pairs (triplets) with "
                           "--batches pairs")
    images_per_epoch: int = flag(8192, "batches and loss", "images drawn each epoch with --batches pk; fresh pairs "
                                 "(triplets), half positive, with --batches pairs", metavar="N",
                                 old=("--pairs-per-epoch",))
    val_pairs: int = flag(1024, "validation", "validation pairs")
    val_images: int = flag(2000, "validation", "held-out images for precision@1 and MAP@R, a seeded sample when "
                           "there are more")
    backbone: str = flag("small_cnn", "model", "", choices=tuple(BACKBONES))
    weights: str = flag("auto", "model", "imagenet, none or a weights file",
                        default_text="default: imagenet for pretrained backbones, none for small_cnn")
    image_size: int | None = flag(None, "model", "input pixels", default_text="default: the backbone's own")
    embedding_dim: int = flag(128, "model", "")
    trainable_layers: int | None = flag(None, "model", "0 freezes the backbone, N fine-tunes its top N layers",
                                        metavar="N", default_text="default: train all")
    loss: str | None = None  # a name of siamese.loss_registry.LOSSES, whose entries give --loss's choices and help;
    # None: supcon with batches="pk", contrastive with "pairs"
    batches: str = flag("pk", "batches and loss", "pk: batches of P items x --images-per-item images, the loss over "
                        "every pair (triplet) among them; pairs: the loss over drawn pairs (triplets)",
                        choices=BATCHES, type=batches_name, old=("--mining",))
    images_per_item: int = flag(4, "batches and loss", "K, the images of each item in a --batches pk batch",
                                metavar="K")
    margin: float = 1.0  # contrastive and triplet; its flag is the loss registry's setting (siamese.loss_registry)
    temperature: float = 0.1  # supcon; likewise
    loss_settings: dict = dataclasses.field(default_factory=dict)  # settings of a registered loss not named above
    mining: str | None = None  # deprecated: `batches` ("batch-all" is "pk")
    augment: bool = flag(False, "augmentation", "random rotation, shift, zoom and contrast of training images, in "
                         "training only")
    flip: bool = flag(False, "augmentation", "random horizontal flips too, with --augment", action="store_true")
    views: int = flag(2, "augmentation", "augmented views of each image in a --batches pk batch, positives of each "
                      "other (instance positives), with --augment")
    monitor: str = flag("val_map_at_r", "validation", "what picks the best epoch: MAP@R or precision@1 of the "
                        "held-out items, or the validation loss", choices=MONITORS)
    learning_rate: float | None = flag(None, "optimiser", "AdamW's",
                                       default_text="default: 0.003 for small_cnn, 0.001 for pretrained backbones")
    lr_schedule: str = flag("cosine", "optimiser", "constant, or cosine decay to 0 over the run", choices=LR_SCHEDULES)
    weight_decay: float = flag(0.05, "optimiser", "AdamW's decoupled weight decay, times the learning rate",
                               default_text="default 0.05; 0: Adam")
    val_fraction: float = flag(0.2, "validation", "items held out for validation")
    seed: int = flag(0, "batches and loss", "")
    on_bad_image: str = "fail"
    cache: str = flag("auto", "catalog", "decoded images: in memory, on disk, or decoded every batch",
                      choices=("auto", *CACHES), default_text="default auto: memory if it fits in a quarter of RAM")
    backend: str | None = flag(None, "model", "the Keras backend to train on: tensorflow is faster on the CPU, jax is "
                               "there for GPUs; checkpoints of either load on both", choices=BACKENDS,
                               default_text="default: $KERAS_BACKEND, else tensorflow")
    tensorboard: str | None = flag(None, "output", "TensorBoard logs: losses, validation figures and learning rate of "
                                   "every epoch (none: no logs). View them with `tensorboard --logdir DIR`",
                                   metavar="DIR", default_text="default NAME.logs beside the checkpoint")

    def resolved(self) -> TrainConfig:
        """A copy with defaults that depend on other settings filled in, after checking every value."""
        spec = get_backbone(self.backbone)
        out = Path(self.out)
        if out.suffix not in CHECKPOINT_SUFFIXES:
            raise SiameseError(
                f"Expected `out` to end in {', '.join(CHECKPOINT_SUFFIXES)}. Received: {self.out}"
            )
        from siamese.loss_registry import DEFAULT_LOSS, get_loss

        batches = self.batches
        if self.mining is not None:
            warnings.warn("`mining` is deprecated: pass `batches` ('pk' for 'batch-all', or 'pairs')",
                          DeprecationWarning, stacklevel=2)
            batches = batches_name(self.mining)
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
