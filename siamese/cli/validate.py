"""`validate`: check a labeled catalog and its images, listing every problem."""

from __future__ import annotations

import argparse
import sys

from siamese.cli.common import add_catalog_args, translate
from siamese.errors import SiameseError
from siamese.util import plural

NAME = "validate"
TENSORFLOW = False


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="check a labeled catalog and its images, listing every problem",
        description="Check a labeled-data JSON and its image folder: every problem at once, each with the "
        "item id and the fix, then a summary. Decodes every image (results are cached per file). "
        "Exits 1 when anything is unusable.",
    )
    add_catalog_args(p)
    g = p.add_argument_group("split", "the train/validation split train would make")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of items held out for validation, split by item (default 0.2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
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
        print(f"error: the training items: {translate(str(e), args.command_parser)}")
        print(f"{args.labeled_data}: the training items give no pairs to learn from; fix them and run validate "
              "again.", file=sys.stderr)
        return 1
    print("OK: the catalog is ready for training.")
    return 0
