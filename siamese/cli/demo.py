"""`demo`: the whole job end to end on real data with no download (what `make demo` runs)."""

from __future__ import annotations

import argparse

from siamese.cli.common import NO_PROGRESS, deprecated

NAME = "demo"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    from siamese.demo import DemoConfig as d

    p = commands.add_parser(
        NAME, help="the whole job end to end on real data with no download (what make demo runs)",
        description="Make a catalog (Fashion-MNIST when it is here or downloadable, else scikit-learn digits), "
        "validate it, train on the CPU, evaluate against the untrained baseline, export the SavedModel, index "
        "the training images, query them with test images (query_results.png), run the folder similarity job on "
        "a handful of images, and print where everything went. Clears a previous demo in --output.",
    )
    action = p.add_argument("--output", dest="out", default=d.out, metavar="DIR",
                            help=f"everything goes here (default {d.out})")
    deprecated(p, action, "--out")
    p.add_argument("--source", default=d.source, choices=("auto", "fashion-mnist", "digits"),
                   help="auto: Fashion-MNIST if it can be had, else digits (default)")
    p.add_argument("--images", type=int, default=d.images,
                   help=f"Fashion-MNIST images of each split, training and test (default {d.images:,})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    action = p.add_argument("--images-per-epoch", type=int, default=d.images_per_epoch, metavar="N",
                            help=f"images drawn each epoch (default {d.images_per_epoch})")
    deprecated(p, action, "--pairs-per-epoch")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.demo import DemoConfig, run_demo

    fields = set(DemoConfig.__dataclass_fields__)
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}), progress=not args.no_progress)
    return 0
