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
from pathlib import Path

from siamese import __version__
from siamese.config import BACKBONES, CACHES, LOSSES, PRETRAINED_BACKBONE, TrainConfig
from siamese.errors import SiameseError, os_error_message
from siamese.util import plural

NO_PROGRESS = "hide progress bars (hidden anyway when the output is not a terminal)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors; `commands` holds the names of its sub-commands."""

    commands: frozenset[str] = frozenset()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labeled-data", required=True, metavar="F",
                   help="labeled JSON catalog: {item_id: {images: [{filename}], labels: [...]}}")
    p.add_argument("--image-dir", required=True, metavar="D", help="folder the catalog's filenames are relative to")
    p.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="images that cannot be decoded: fail listing them all (default), or skip them")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keras-model", metavar="M",
                   help="embedding network written by train (.keras, .h5 or .hdf5); without it, a pretrained "
                   "--backbone embeds the images")
    p.add_argument("--backbone", default=PRETRAINED_BACKBONE, choices=[b for b in BACKBONES if b != "small_cnn"],
                   help=f"without --keras-model: the ImageNet backbone whose pooled features are the embedding "
                   f"(default {PRETRAINED_BACKBONE})")
    p.add_argument("--weights", default="imagenet",
                   help="without --keras-model: imagenet (downloaded once by Keras), none, or a weights file")
    p.add_argument("--image-size", type=int, default=None, help="without --keras-model: input pixels "
                   "(default: the backbone's own)")


def _add_engine_args(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The search engine (`--index`, one of `siamese.search.ENGINES`) and the build settings every engine declares
    (`Engine.settings`, one flag each); with `inherit` (merge-index) they default to the parts' own."""
    from siamese.search import ENGINES

    names = "; ".join(f"{name} ({engine.summary})" for name, engine in ENGINES.items())
    p.add_argument("--index", default=None if inherit else next(iter(ENGINES)), choices=list(ENGINES),
                   help=f"search engine: {names} (default: {'the parts' if inherit else next(iter(ENGINES))})")
    added = set()
    for engine in ENGINES.values():
        for s in engine.settings:
            if s.name in added:
                continue
            added.add(s.name)
            inherited = inherit and s.default is not None  # a default of None is chosen at build time, not inherited
            note = "default: the parts'" if inherited else s.default_text or f"default {s.default}"
            p.add_argument(s.cli_flag, dest=f"engine_{s.name}", type=s.type, metavar=s.metavar or s.name.upper(),
                           default=None if inherit else s.default, help=f"{s.help} ({note})")


def _engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line by `_add_engine_args`, by name (e.g. leaf_size)."""
    return {k.removeprefix("engine_"): v for k, v in vars(args).items() if k.startswith("engine_") and v is not None}


def _add_knob_args(p: argparse.ArgumentParser) -> None:
    """The query-time setting of each approximate engine (`Engine.knob`, e.g. --ef), once each."""
    from siamese.search import ENGINES

    added = set()
    for engine in ENGINES.values():
        if engine.knob and engine.knob not in added:
            added.add(engine.knob)
            p.add_argument(f"--{engine.knob}", dest=f"knob_{engine.knob}", type=int, metavar="N", help=engine.knob_help)


def _knobs(args: argparse.Namespace) -> dict:
    """The query-time settings given by `_add_knob_args`, by name (e.g. ef)."""
    return {k.removeprefix("knob_"): v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}


def _shard(text: str) -> tuple[int, int]:
    """`--shard I/N`: shard I (1-based) of N."""
    shard, _, shards = text.partition("/")
    if not (shard.isdigit() and shards.isdigit() and 1 <= int(shard) <= int(shards)):
        raise argparse.ArgumentTypeError(f"Expected I/N with 1 <= I <= N (shards count from 1: 1/4 ... 4/4). "
                                         f"Received: {text!r}")
    return int(shard), int(shards)


SEED_EXPORTS = {"savedmodel": "export", "balltree": "index"}
"""The seed's `--export WHAT` spelling, and the command each one is."""


def _seed_syntax(argv: list[str], parser: _Parser) -> list[str]:
    """Rewrite the seed's `--export savedmodel ...` / `--export balltree ...` as `export ...` / `index ...`."""
    if argv and argv[0] in parser.commands:
        return argv
    for n, arg in enumerate(argv):
        if arg == "--export" or arg.startswith("--export="):
            what = arg.partition("=")[2] if "=" in arg else (argv[n + 1] if n + 1 < len(argv) else "")
            rest = argv[:n] + argv[n + (1 if "=" in arg else 2) :]
            if what not in SEED_EXPORTS:
                parser.error(f"Expected --export {' or '.join(SEED_EXPORTS)}. Received: --export {what!r}")
            return [SEED_EXPORTS[what], *rest]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="utilities.py",
        description="siamese: train siamese CNNs for image similarity, export them, index and query a catalog.",
        epilog="The seed's spellings work too: `--export savedmodel ...` is `export ...`, `--export balltree ...` "
        "is `index ...`.",
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
        description="Train an embedding network with a contrastive loss over every pair of images in batches of a "
        "few images of each of several items, drawn fresh every epoch (--mining pairs: over pairs drawn one by "
        "one), with --augment each image augmented in training only. Runs the checks of validate first, scores the "
        "held-out items before training and after every epoch, keeps the best model by --monitor at --out (the "
        "untrained network when no epoch beats it, with a warning; .config.json, .manifest.json and .history.json "
        "beside it), and resumes from the last finished epoch when the same command is run again after a crash.",
    )
    _add_catalog_args(p)
    d = TrainConfig
    p.add_argument("--out", default=d.out, help=f"checkpoint: .keras, or .h5/.hdf5 for HDF5 (default {d.out})")
    p.add_argument("--val-labeled-data", metavar="F",
                   help="a separate validation catalog (filenames under --image-dir) instead of --val-fraction")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images per batch with --mining batch-all, pairs (triplets) with --mining pairs "
                   f"(default {d.batch_size})")
    p.add_argument("--pairs-per-epoch", type=int, default=d.pairs_per_epoch,
                   help=f"images drawn each epoch with --mining batch-all; fresh pairs (triplets), half positive, "
                   f"with --mining pairs (default {d.pairs_per_epoch})")
    p.add_argument("--mining", default=d.mining, choices=TrainConfig.MININGS,
                   help=f"batch-all: batches of P items x --images-per-item images and the loss over every pair "
                   f"(triplet) in them; pairs: the loss over drawn pairs (triplets) (default {d.mining})")
    p.add_argument("--images-per-item", type=int, default=d.images_per_item, metavar="K",
                   help=f"images of each item in a batch-all batch (default {d.images_per_item})")
    p.add_argument("--backbone", default=d.backbone, choices=tuple(BACKBONES), help=f"default {d.backbone}")
    p.add_argument("--weights", default=d.weights,
                   help="imagenet, none or a weights file (default: imagenet for pretrained backbones, none for "
                   "small_cnn)")
    p.add_argument("--image-size", type=int, default=None, help="input pixels (default: the backbone's own)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"default {d.embedding_dim}")
    p.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                   help="0 freezes the backbone, N fine-tunes its top N layers (default: train all)")
    p.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help="supcon, the supervised contrastive loss with a --temperature (batch-all only); contrastive "
                   "(the seed's), with a --margin; or triplet on (anchor, positive, negative) triplets (default: "
                   "supcon with --mining batch-all, contrastive with --mining pairs)")
    p.add_argument("--margin", type=float, default=d.margin,
                   help=f"contrastive and triplet margin (default {d.margin})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"supcon temperature (default {d.temperature})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="random rotation, shift, zoom and contrast of training images, in training only (default: "
                   f"{'on' if d.augment else 'off'})")
    p.add_argument("--flip", action="store_true", help="random horizontal flips too, with --augment (default off)")
    p.add_argument("--views", type=int, default=d.views,
                   help=f"augmented views of each image in a batch-all batch, positives of each other (instance "
                   f"positives), with --augment (default {d.views})")
    p.add_argument("--monitor", default=d.monitor, choices=TrainConfig.MONITORS,
                   help=f"what picks the best epoch: MAP@R or precision@1 of the held-out items, or the validation "
                   f"loss (default {d.monitor})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="AdamW's (default: 0.003 for small_cnn, 0.001 for pretrained backbones)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=TrainConfig.LR_SCHEDULES,
                   help=f"constant, or cosine decay to 0 over the run (default {d.lr_schedule})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW's decoupled weight decay, times the learning rate (default {d.weight_decay}; 0: Adam)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"items held out for validation (default {d.val_fraction})")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs, help=f"validation pairs (default {d.val_pairs})")
    p.add_argument("--val-images", type=int, default=d.val_images,
                   help=f"held-out images for precision@1 and MAP@R (default {d.val_images})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--cache", default=d.cache, choices=("auto", *CACHES),
                   help="decoded images: in memory, on disk, or decoded every batch (default auto: memory if it "
                   "fits in a quarter of RAM)")
    p.set_defaults(run=_train)

    p = commands.add_parser(
        "export", help="write the embedding network as a TensorFlow SavedModel (seed: --export savedmodel)",
        description="Export the embedding network as a TensorFlow SavedModel in a new numbered version folder "
        "(OUTPUT/1, OUTPUT/2...), as TF Serving expects. serving_default takes a batch of encoded image bytes "
        "(JPEG, PNG, GIF, BMP) and returns embeddings; serve_pixels takes uint8 pixels. Without --keras-model, "
        "a pretrained ImageNet backbone is exported.",
    )
    _add_model_args(p)
    p.add_argument("--output", default="exports/savedmodel", metavar="DIR",
                   help="folder of versions (default exports/savedmodel)")
    p.add_argument("--model-version", type=int, default=None, metavar="N",
                   help="version folder number (default: one more than the latest in --output)")
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "index", help="embed every image of a catalog and build a nearest-neighbour index (seed: --export balltree)",
        description="Embed every image of a labeled catalog (batched, from the files) and save a nearest-neighbour "
        "index with each row's item id, filename and labels: embeddings as .npy, metadata as JSON, never a "
        "pickle. Without --keras-model, a pretrained ImageNet backbone embeds the images. Approximate engines (hnsw, "
        "faiss IVF) measure their recall@10 on held-out images and pick the query-time --ef (--nprobe) that reaches "
        "--target-recall. --shard I/N embeds one slice of the catalog, for several machines; merge-index joins them.",
    )
    _add_catalog_args(p)
    _add_model_args(p)
    p.add_argument("--output", default="exports/index", metavar="DIR", help="index folder (default exports/index)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    _add_engine_args(p)
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="embed only shard I of N, counted from 1 (1/4 ... 4/4): a contiguous run of whole batches of "
                   "the catalog's images, saved as a part in --output; join the parts with merge-index. A part "
                   "already in --output (same model, catalog, shard and --index) is skipped, not redone")
    p.set_defaults(run=_index)

    p = commands.add_parser(
        "merge-index", help="join the shard parts written by `index --shard I/N` into one index",
        description="Join the parts written by `index --shard I/N` (one per shard, any order) into one index, "
        "identical in embeddings and rows to indexing the catalog at once, and build its search engine. Refuses "
        "parts of different models or catalogs and missing or repeated shards.",
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="part folders written by `index --shard I/N`")
    p.add_argument("--output", required=True, metavar="DIR", help="index folder to write")
    _add_engine_args(p, inherit=True)
    p.set_defaults(run=_merge_index)

    p = commands.add_parser(
        "query", help="find the images of an index nearest to each query image",
        description="Print, for each image, its k nearest images in the index with item id, filename and cosine "
        "similarity. The index's own model embeds the queries.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    p.add_argument("--index", required=True, metavar="DIR", help="index folder written by `index`")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--by-item", action="store_true", help="the best image of each of k items instead of k images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--keras-model", metavar="M",
                   help="embed the queries with this model (default: the one the index records); it must be the "
                   "model that built the index")
    _add_knob_args(p)
    p.set_defaults(run=_query)

    p = commands.add_parser(
        "similarity", help="for every image of a folder, its similarity to every other (the ImageSim job)",
        description="Write OUT/<stem>.json for every image of --image-dir (JPEG, PNG, WebP, GIF, BMP; any size): "
        "[{\"similarity\": 1.0, \"filename\": stem}, ...], itself first, then most similar first; similarity "
        "is the cosine of the embeddings rounded to 4 decimals. Unreadable images are skipped with a warning.",
    )
    p.add_argument("--image-dir", required=True, metavar="D", help="folder of images (sub-folders are not read)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--top-k", type=int, default=None, metavar="N", help="keep the N most similar (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    _add_model_args(p)
    p.set_defaults(run=_similarity)

    p = commands.add_parser(
        "evaluate", help="how well a model finds the right item, against the untrained baseline",
        description="Embed every image of a labeled catalog and report leave-one-out retrieval among its items "
        "(precision@1, R-precision, MAP@R as in pytorch-metric-learning, recall@k: a same-item image among the "
        "k nearest), for the model, for the network it was trained from (untrained baseline) and for raw pixels (the "
        "images at the model's input size, flattened and L2-normalised: no learning at all), plus the "
        "distance threshold for 'same item?' with the best F1 on pairs drawn from the catalog.",
    )
    _add_catalog_args(p)
    _add_model_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="recall@k for these k "
                   "(default 1 5 10)")
    p.add_argument("--pairs", type=int, default=4096, help="pairs for the threshold, half same-item (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the threshold pairs (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained baseline")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline (no learning at all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser(
        "make-dataset", help="write a real catalog (Fashion-MNIST, digits or font glyphs) as images + labeled JSON",
        description="Write a dataset that needs no download as PNG files and labeled JSON: "
        "OUT/train.json, OUT/test.json and OUT/images/. fashion-mnist and digits: item = class. glyphs: item = "
        "one letter drawn in every installed font that has it (Omniglot-style), train and test split by script, "
        "so no test script appears in training; OUT/source.json records the fonts and scripts.",
    )
    p.add_argument("--source", choices=("fashion-mnist", "digits", "glyphs"), required=True,
                   help="fashion-mnist (Debian's dataset-fashion-mnist or Keras's cache), digits (scikit-learn) or "
                   "glyphs (the installed fonts: Debian's fonts-noto-core and friends)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="keep the first N images of each split (glyphs: the first N letters of each script)")
    p.add_argument("--seed", type=int, default=0, help="glyphs: the random scale, rotation and shift (default 0)")
    p.add_argument("--image-size", type=int, default=None, metavar="N", help="glyphs: pixels (default 32)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(run=_make_dataset)

    from siamese.demo import DemoConfig

    d = DemoConfig
    p = commands.add_parser(
        "demo", help="the whole job end to end on real data with no download (what make demo runs)",
        description="Make a catalog (Fashion-MNIST when it is here or downloadable, else scikit-learn digits), "
        "validate it, train on the CPU, evaluate against the untrained baseline, export the SavedModel, index "
        "the training images, query them with test images (query_results.png), run the folder similarity job on "
        "a handful of images, and print where everything went. Clears a previous demo in --out.",
    )
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"everything goes here (default {d.out})")
    p.add_argument("--source", default=d.source, choices=("auto", "fashion-mnist", "digits"),
                   help="auto: Fashion-MNIST if it can be had, else digits (default)")
    p.add_argument("--images", type=int, default=d.images,
                   help=f"Fashion-MNIST images of each split, training and test (default {d.images:,})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--pairs-per-epoch", type=int, default=d.pairs_per_epoch,
                   help=f"images drawn each epoch (default {d.pairs_per_epoch})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(run=_demo)
    parser.commands = frozenset(commands.choices)
    return parser


def _validate(args: argparse.Namespace) -> int:
    from siamese.catalog import split_by_item, validate_catalog
    from siamese.images import find_bad_images
    from siamese.pairs import PairSampler

    report = validate_catalog(args.labeled_data, args.image_dir, progress=not args.no_progress)
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
    try:  # what train needs of its items before it starts: both kinds of pair
        PairSampler(train, seed=args.seed)
    except SiameseError as e:
        print(f"error: the training items: {e}")
        print(f"{args.labeled_data}: the training items give no pairs to learn from; fix them and run validate "
              "again.", file=sys.stderr)
        return 1
    print("OK: the catalog is ready for training.")
    return 0


def _train(args: argparse.Namespace) -> int:
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.resolved()  # settings errors before TensorFlow loads
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


def _embedder(args: argparse.Namespace):
    """The `siamese.embed.Embedder` of --keras-model, or of --backbone, --weights and --image-size without one."""
    from siamese.embed import Embedder

    return Embedder.load(args.keras_model, args.backbone, args.weights, args.image_size)


def _export(args: argparse.Namespace) -> int:
    from siamese.embed import shown
    from siamese.export import export_savedmodel

    embedder = _embedder(args)
    info = embedder.info
    path = export_savedmodel(embedder.model, args.output, args.model_version, info=info.to_dict())
    print(f"SavedModel of {shown(info.source)} ({info.image_size} px in, {info.embedding_dim}-d out): {path}")
    print("Signatures: serving_default (encoded image bytes), serve_pixels (uint8 pixels)")
    return 0


def _index(args: argparse.Namespace) -> int:
    from siamese.index import claim_output

    if args.batch_size < 1:
        raise SiameseError(f"Expected --batch-size >= 1. Received: {args.batch_size}")
    with claim_output(args.output):
        return _index_claimed(args)


def _index_claimed(args: argparse.Namespace) -> int:
    from siamese.catalog import load_catalog
    from siamese.embed import finished_part, shard_catalog
    from siamese.images import check_images
    from siamese.search import ENGINES

    progress = not args.no_progress
    catalog, part = load_catalog(args.labeled_data, args.image_dir), None
    if args.shard:
        catalog, part = shard_catalog(catalog, *args.shard, args.batch_size)
    catalog = check_images(catalog, args.on_bad_image, progress=progress)
    embedder = _embedder(args)
    done = "Indexed "
    if part:
        done = (f"Indexed shard {part['shard']}/{part['shards']} (images {part['rows'][0]:,} to "
                f"{part['rows'][1]:,} of {part['images']:,}): ")
        if finished_part(args.output, embedder.info, part, args.index):
            print(f"Skipped shard {part['shard']}/{part['shards']}: {args.output} already holds it (same model, "
                  "catalog, shard and --index)")
            return 0
    engine = ENGINES[args.index].from_settings(_engine_settings(args))
    index = embedder.index(catalog, engine, batch_size=args.batch_size, labeled_data=args.labeled_data,
                           progress=progress, part=part)
    out = index.save(args.output)
    _print_index(index, f"{done}{plural(len(index), 'image')} of {plural(len(catalog), 'item')}", out)
    if part:
        print("Next, when every shard is done: python utilities.py merge-index PART... --output DIR")
    else:
        print(f"Next: python utilities.py query --index {out} IMAGE...")
    return 0


def _print_index(index, done: str, out: Path) -> None:
    """Print what an index holds, its engine, where it went and, for approximate engines, their recall."""
    from siamese.embed import shown

    print(f"{done} ({index.dim}-d, {index.engine}) embedded by {shown(str(index.model.get('source')))}: {out}")
    if index.recall:
        knob = f"--{index.search_engine.knob}"
        print(f"Recall@10 {index.recall_at_10:.4f} on {plural(index.recall['queries'], 'held-out image')} "
              f"(target {index.recall['target']}); query with {knob} N to trade speed for recall")


def _merge_index(args: argparse.Namespace) -> int:
    from siamese.index import claim_output, merge_parts, refuse_part_output

    refuse_part_output(args.output, args.parts)
    with claim_output(args.output):
        index = merge_parts(args.parts, args.index, **_engine_settings(args))
        out = index.save(args.output)
    _print_index(index, f"Merged {plural(len(args.parts), 'part')}: {plural(len(index), 'image')} of "
                 f"{plural(len(set(index.items)), 'item')}", out)
    print(f"Next: python utilities.py query --index {out} IMAGE...")
    return 0


def _query(args: argparse.Namespace) -> int:
    import json

    from siamese.embed import Embedder
    from siamese.index import Index

    index = Index.load(args.index)
    results = Embedder.of_index(index, args.keras_model).search(index, args.images, args.k, args.by_item,
                                                                 **_knobs(args))
    if args.json:
        print(json.dumps([{"query": q, "neighbours": [m.to_dict() for m in r]}
                          for q, r in zip(args.images, results, strict=True)], indent=2, ensure_ascii=False))
        return 0
    for query, matches in zip(args.images, results, strict=True):
        print(query)
        for rank, m in enumerate(matches, 1):
            print(f"  {rank:>3}  {m.similarity:.4f}  {m.item}  {m.filename}")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    from siamese.similarity import folder_similarity

    embedder = _embedder(args)
    result = folder_similarity(embedder.model, args.image_dir, args.out, args.top_k, args.batch_size,
                               settings={"model": embedder.info.to_dict()}, progress=not args.no_progress,
                               source=embedder.info.source)
    skipped = f" (skipped {plural(len(result.skipped), 'unreadable image')})" if result.skipped else ""
    print(f"Wrote {plural(len(result.written), 'similarity file')} to {result.out}{skipped}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from siamese.catalog import load_catalog
    from siamese.embed import evaluate_models, format_evaluations
    from siamese.images import check_images

    progress = not args.no_progress
    catalog = check_images(load_catalog(args.labeled_data, args.image_dir), args.on_bad_image, progress=progress)
    results = evaluate_models(catalog, args.keras_model, args.backbone, args.weights, args.image_size,
                              baseline=not args.no_baseline, pixels=not args.no_pixels, ks=args.k, pairs=args.pairs,
                              seed=args.seed, batch_size=args.batch_size, progress=progress)
    if args.json:
        print(json.dumps([{"model": info.to_dict(), **e.to_dict()} for info, e in results], indent=2))
        return 0
    print(format_evaluations(results, catalog))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from siamese.demo import DemoConfig, run_demo

    fields = set(DemoConfig.__dataclass_fields__)
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}), progress=not args.no_progress)
    return 0


def _make_dataset(args: argparse.Namespace) -> int:
    from siamese.datasets import make_dataset

    written = make_dataset(args.source, args.out, args.limit, progress=not args.no_progress, seed=args.seed,
                           image_size=args.image_size)
    for split, path in written.items():
        print(f"{split}: {path}")
    train = written["train"]
    print(f"Next: python utilities.py validate --labeled-data {train} --image-dir {train.parent}")
    return 0


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) hidden.

    TF 2.21 logs it through absl before logging is set up, which TF_CPP_MIN_LOG_LEVEL no longer silences, so
    stderr is pointed at /dev/null for the import only. Python errors still surface; set
    TF_CPP_MIN_LOG_LEVEL yourself (e.g. 0) to see everything.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")  # e.g. "triggered tf.function retracing": advice for TF developers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(_seed_syntax(list(sys.argv[1:] if argv is None else argv), parser))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if hasattr(args, "no_progress") and not (sys.stdout.isatty() and sys.stderr.isatty()):
        args.no_progress = True  # a log file, not a terminal: no redrawn bars (train prints one line an epoch)
    if args.command in ("train", "export", "index", "query", "similarity", "evaluate", "demo"):
        _import_tensorflow_quietly()
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            return args.run(args)
        except SiameseError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # e.g. `... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as e:  # a full disk, a read-only folder, a name too long: one line, not a traceback
            print(f"{parser.prog}: error: {os_error_message(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
