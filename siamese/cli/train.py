"""`train`: train a siamese embedding network on a labeled catalog."""

from __future__ import annotations

import argparse

from siamese.cli.common import add_catalog_args, deprecated
from siamese.config import BACKBONES, BACKENDS, CACHES, TrainConfig
from siamese.loss_registry import BATCHES, DEFAULT_LOSS, LOSSES

NAME = "train"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="train a siamese embedding network on a labeled catalog",
        description="Train an embedding network with a contrastive loss over every pair of images in batches of a "
        "few images of each of several items, drawn fresh every epoch (--batches pairs: over pairs drawn one by "
        "one), with --augment each image augmented in training only. Runs the checks of validate first, scores the "
        "held-out items before training and after every epoch, keeps the best model by --monitor at --output (the "
        "untrained network when no epoch beats it, with a warning; .config.json, .manifest.json and .history.json "
        "beside it), and resumes from the last finished epoch when the same command is run again after a crash.",
    )
    d = TrainConfig
    g = add_catalog_args(p)
    g.add_argument("--val-labeled-data", metavar="F",
                   help="a separate validation catalog (filenames under --image-dir) instead of --val-fraction")
    g.add_argument("--cache", default=d.cache, choices=("auto", *CACHES),
                   help="decoded images: in memory, on disk, or decoded every batch (default auto: memory if it "
                   "fits in a quarter of RAM)")

    g = p.add_argument_group("output")
    action = g.add_argument("--output", dest="out", default=d.out, metavar="FILE",
                            help=f"checkpoint: .keras, or .h5/.hdf5 for HDF5 (default {d.out})")
    deprecated(p, action, "--out")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="TensorBoard logs: losses, validation figures and learning rate of every epoch (default "
                   "NAME.logs beside the checkpoint; none: no logs). View them with `tensorboard --logdir DIR`")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=d.backbone, choices=tuple(BACKBONES), help=f"default {d.backbone}")
    g.add_argument("--weights", default=d.weights,
                   help="imagenet, none or a weights file (default: imagenet for pretrained backbones, none for "
                   "small_cnn)")
    g.add_argument("--image-size", type=int, default=None, help="input pixels (default: the backbone's own)")
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"default {d.embedding_dim}")
    g.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                   help="0 freezes the backbone, N fine-tunes its top N layers (default: train all)")

    g.add_argument("--backend", choices=BACKENDS,
                   help="the Keras backend to train on (default: $KERAS_BACKEND, else tensorflow): tensorflow is "
                   "faster on the CPU, jax is there for GPUs; checkpoints of either load on both")

    g = p.add_argument_group("batches and loss")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images per batch with --batches pk, pairs (triplets) with --batches pairs "
                   f"(default {d.batch_size})")
    action = g.add_argument("--images-per-epoch", type=int, default=d.images_per_epoch, metavar="N",
                            help=f"images drawn each epoch with --batches pk; fresh pairs (triplets), half "
                            f"positive, with --batches pairs (default {d.images_per_epoch})")
    deprecated(p, action, "--pairs-per-epoch")
    action = g.add_argument("--batches", default=d.batches, choices=BATCHES, type=_batches,
                            help=f"pk: batches of P items x --images-per-item images, the loss over every pair "
                            f"(triplet) among them; pairs: the loss over drawn pairs (triplets) (default {d.batches})")
    deprecated(p, action, "--mining")
    g.add_argument("--images-per-item", type=int, default=d.images_per_item, metavar="K",
                   help=f"K, the images of each item in a --batches pk batch (default {d.images_per_item})")
    defaults = ", ".join(f"{loss} with --batches {batches}" for batches, loss in DEFAULT_LOSS.items())
    losses = "; ".join(f"{name}: {spec.summary}" for name, spec in LOSSES.items())
    g.add_argument("--loss", default=d.loss, choices=list(LOSSES), help=f"{losses} (default: {defaults})")
    fields = TrainConfig.__dataclass_fields__
    added = set()
    for spec in LOSSES.values():
        for setting in spec.settings:
            name = setting.name
            if name not in added:  # a setting of several losses (margin) is one flag
                added.add(name)
                default = fields[name].default if name in fields else setting.default
                g.add_argument(setting.cli_flag, dest=name if name in fields else f"loss_{name}", type=setting.type,
                               metavar=setting.metavar or name.upper(), default=default if name in fields else None,
                               help=f"{setting.help} ({setting.default_text or f'default {default}'})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")

    g = p.add_argument_group("augmentation")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="random rotation, shift, zoom and contrast of training images, in training only (default: "
                   f"{'on' if d.augment else 'off'})")
    g.add_argument("--flip", action="store_true", help="random horizontal flips too, with --augment (default off)")
    g.add_argument("--views", type=int, default=d.views,
                   help=f"augmented views of each image in a --batches pk batch, positives of each other (instance "
                   f"positives), with --augment (default {d.views})")

    g = p.add_argument_group("optimiser")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="AdamW's (default: 0.003 for small_cnn, 0.001 for pretrained backbones)")
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=TrainConfig.LR_SCHEDULES,
                   help=f"constant, or cosine decay to 0 over the run (default {d.lr_schedule})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW's decoupled weight decay, times the learning rate (default {d.weight_decay}; 0: Adam)")

    g = p.add_argument_group("validation", "the held-out items that pick the best epoch")
    g.add_argument("--monitor", default=d.monitor, choices=TrainConfig.MONITORS,
                   help=f"what picks the best epoch: MAP@R or precision@1 of the held-out items, or the validation "
                   f"loss (default {d.monitor})")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"items held out for validation (default {d.val_fraction})")
    g.add_argument("--val-pairs", type=int, default=d.val_pairs, help=f"validation pairs (default {d.val_pairs})")
    g.add_argument("--val-images", type=int, default=d.val_images,
                   help=f"held-out images for precision@1 and MAP@R (default {d.val_images})")
    p.set_defaults(run=run)
    return p


def _batches(text: str) -> str:
    """`--batches`, with the old `--mining` value batch-all meaning pk."""
    return {"batch-all": "pk"}.get(text, text)


def run(args: argparse.Namespace) -> int:
    fields = set(TrainConfig.__dataclass_fields__)
    settings = {k.removeprefix("loss_"): v for k, v in vars(args).items() if k.startswith("loss_") and v is not None}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, loss_settings=settings)
    config.resolved()  # settings errors before any catalog is read
    from siamese.checkpoint import sidecar
    from siamese.training import train

    result = train(config, verbose=2 if args.no_progress else "auto")
    value = "n/a" if result.best is None else f"{result.best:.4f}"
    if result.monitor == "loss":
        print(f"Nothing held out to choose by: the last epoch's model (epoch {result.best_epoch}, loss {value}): "
              f"{result.checkpoint}")
    else:
        print(f"Best {result.monitor} {value} at epoch {result.best_epoch}: {result.checkpoint}")
    print(f"Settings: {sidecar(result.checkpoint, 'config')}; manifest: {sidecar(result.checkpoint, 'manifest')}; "
          f"history: {sidecar(result.checkpoint, 'history')}")
    return 0
