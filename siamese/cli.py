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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
