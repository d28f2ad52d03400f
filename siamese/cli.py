"""The command line: `python utilities.py COMMAND ...` or `python -m siamese COMMAND ...`.

Errors the user can fix print one line to stderr (a list, one per line, where there are several) and
exit 2; `validate` exits 1 when the catalog has problems.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from siamese import __version__
from siamese.config import BACKBONES, CACHES, LOSSES, TrainConfig
from siamese.errors import SiameseError, plural


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labeled-data", required=True, metavar="F",
                   help="labeled JSON catalog: {item_id: {images: [{filename}], labels: [...]}}")
    p.add_argument("--image-dir", required=True, metavar="D", help="folder the catalog's filenames are relative to")
    p.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="images that cannot be decoded: fail listing them all (default), or skip them")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="utilities.py",
        description="siamese: train siamese CNNs for image similarity, export them, index and query a catalog.",
    )
    parser.add_argument("--version", action="version", version=f"siamese {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser(
        "validate", help="check a labeled catalog and its images, listing every problem",
        description="Check a labeled-data JSON and its image folder: every problem at once, each with the "
        "item id and the fix, then a summary. Decodes every image (results are cached per file). "
        "Exits 1 when anything is unusable.",
    )
    _add_catalog_args(p)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of items held out for validation, split by item (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.set_defaults(run=_validate)

    p = commands.add_parser(
        "train", help="train a siamese embedding network on a labeled catalog",
        description="Train an embedding network with the contrastive loss on pairs drawn fresh every epoch. "
        "Runs the checks of validate first, keeps the best model by validation precision@1 at --out (with "
        ".config.json and .manifest.json beside it), and resumes from the last finished epoch when the same "
        "command is run again after a crash.",
    )
    _add_catalog_args(p)
    d = TrainConfig
    p.add_argument("--out", default=d.out, help=f"checkpoint: .keras, or .h5/.hdf5 for HDF5 (default {d.out})")
    p.add_argument("--val-labeled-data", metavar="F",
                   help="a separate validation catalog (filenames under --image-dir) instead of --val-fraction")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per batch (default {d.batch_size})")
    p.add_argument("--pairs-per-epoch", type=int, default=d.pairs_per_epoch,
                   help=f"fresh pairs (or triplets) drawn each epoch, half positive (default {d.pairs_per_epoch})")
    p.add_argument("--backbone", default=d.backbone, choices=tuple(BACKBONES), help=f"default {d.backbone}")
    p.add_argument("--weights", default=d.weights,
                   help="imagenet, none or a weights file (default: imagenet for pretrained backbones, none for "
                   "small_cnn)")
    p.add_argument("--image-size", type=int, default=None, help="input pixels (default: the backbone's own)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"default {d.embedding_dim}")
    p.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                   help="0 freezes the backbone, N fine-tunes its top N layers (default: train all)")
    p.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help=f"contrastive on pairs, or triplet on (anchor, positive, negative) triplets (default {d.loss})")
    p.add_argument("--margin", type=float, default=d.margin, help=f"contrastive margin (default {d.margin})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help=f"Adam (default {d.learning_rate})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"items held out for validation (default {d.val_fraction})")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs, help=f"validation pairs (default {d.val_pairs})")
    p.add_argument("--val-images", type=int, default=d.val_images,
                   help=f"held-out images for precision@1 (default {d.val_images})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--cache", default=d.cache, choices=("auto", *CACHES),
                   help="decoded images: in memory, on disk, or decoded every batch (default auto: memory if it "
                   "fits in a quarter of RAM)")
    p.set_defaults(run=_train)

    p = commands.add_parser(
        "make-dataset", help="write a real catalog (Fashion-MNIST or digits) as images + labeled JSON",
        description="Write a dataset that needs no download as PNG files and labeled JSON: "
        "OUT/train.json, OUT/test.json and OUT/images/. Item = class.",
    )
    p.add_argument("--source", choices=("fashion-mnist", "digits"), required=True,
                   help="fashion-mnist (Debian's dataset-fashion-mnist or Keras's cache) or digits (scikit-learn)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N images of each split")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=_make_dataset)
    return parser


def _validate(args: argparse.Namespace) -> int:
    from siamese.catalog import split_by_item, validate_catalog
    from siamese.images import find_bad_images

    report = validate_catalog(args.labeled_data, args.image_dir)
    bad = find_bad_images(report.catalog, progress=not args.no_progress)
    for problem in report.errors:
        print(f"error: {problem}")
    bad_lines = [f"{args.image_dir}: {b}. Fix: replace or remove the file" for b in bad]
    for line in bad_lines:
        print(f"{'warning' if args.on_bad_image == 'skip' else 'error'}: {line}")
    for problem in report.warnings:
        print(f"warning: {problem}")
    catalog = report.catalog.without_images({b.filename for b in bad})
    print(f"Summary: {catalog.summary()}")
    problems = len(report.errors) + (len(bad) if args.on_bad_image == "fail" else 0)
    if problems:
        print(f"{args.labeled_data}: {plural(problems, 'problem')}; "
              "fix them and run validate again.", file=sys.stderr)
        return 1
    if bad:
        print(f"Skipping {plural(len(bad), 'image')} that cannot be decoded "
              "(--on-bad-image skip).")
    train, val = split_by_item(catalog, args.val_fraction, args.seed)
    print(f"Split (--val-fraction {args.val_fraction}, --seed {args.seed}): "
          f"{len(train)} training items ({len(train.filenames)} images), "
          f"{len(val)} validation items ({len(val.filenames)} images)")
    print("OK: the catalog is ready for training.")
    return 0


def _train(args: argparse.Namespace) -> int:
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.resolved()  # settings errors before TensorFlow loads
    from siamese.train import sidecar, train

    result = train(config, verbose=2 if args.no_progress else "auto")
    best = "n/a" if result.best is None else f"{result.best:.4f}"
    print(f"Best {result.monitor} {best} at epoch {result.best_epoch}: {result.checkpoint}")
    print(f"Settings: {sidecar(result.checkpoint, 'config')}; manifest: {sidecar(result.checkpoint, 'manifest')}; "
          f"history: {sidecar(result.checkpoint, 'history')}")
    return 0


def _make_dataset(args: argparse.Namespace) -> int:
    from siamese.datasets import make_dataset

    written = make_dataset(args.source, args.out, args.limit, progress=not args.no_progress)
    for split, path in written.items():
        print(f"{split}: {path}")
    train = written["train"]
    print(f"Next: python utilities.py validate --labeled-data {train} --image-dir {train.parent}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status."""
    # TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) is not for users; real failures still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            return args.run(args)
        except SiameseError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
