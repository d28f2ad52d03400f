"""`make-dataset`: a real catalog that needs no download (Fashion-MNIST, digits or font glyphs)."""

from __future__ import annotations

import argparse

from siamese.cli.common import NO_PROGRESS, deprecated

NAME = "make-dataset"
TENSORFLOW = False


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="write a real catalog (Fashion-MNIST, digits or font glyphs) as images + labeled JSON",
        description="Write a dataset that needs no download as PNG files and labeled JSON: "
        "OUTPUT/train.json, OUTPUT/test.json and OUTPUT/images/. fashion-mnist and digits: item = class. glyphs: "
        "item = one letter drawn in every installed font that has it (Omniglot-style), train and test split by "
        "script, so no test script appears in training; OUTPUT/source.json records the fonts and scripts.",
    )
    p.add_argument("--source", choices=("fashion-mnist", "digits", "glyphs"), required=True,
                   help="fashion-mnist (Debian's dataset-fashion-mnist or Keras's cache), digits (scikit-learn) or "
                   "glyphs (the installed fonts: Debian's fonts-noto-core and friends)")
    action = p.add_argument("--output", dest="out", required=True, metavar="DIR", help="output folder")
    deprecated(p, action, "--out")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="keep the first N images of each split (glyphs: the first N letters of each script)")
    g = p.add_argument_group("glyphs")
    g.add_argument("--seed", type=int, default=0, help="the random scale, rotation and shift (default 0)")
    g.add_argument("--image-size", type=int, default=None, metavar="N", help="pixels (default 32)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.datasets import make_dataset

    written = make_dataset(args.source, args.out, args.limit, progress=not args.no_progress, seed=args.seed,
                           image_size=args.image_size)
    for split, path in written.items():
        print(f"{split}: {path}")
    train = written["train"]
    print(f"Next: python utilities.py validate --labeled-data {train} --image-dir {train.parent}")
    return 0
