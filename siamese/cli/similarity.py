"""`similarity`: for every image of a folder, its similarity to every other (the ImageSim job)."""

from __future__ import annotations

import argparse

from siamese.cli.common import NO_PROGRESS, add_model_args, deprecated, embedder
from siamese.util import plural

NAME = "similarity"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="for every image of a folder, its similarity to every other (the ImageSim job)",
        description="Write OUTPUT/<stem>.json for every image of --image-dir (JPEG, PNG, WebP, GIF, BMP; any size): "
        "[{\"similarity\": 1.0, \"filename\": stem}, ...], itself first, then most similar first; similarity "
        "is the cosine of the embeddings rounded to 4 decimals. Unreadable images are skipped with a warning.",
    )
    g = p.add_argument_group("images")
    g.add_argument("--image-dir", required=True, metavar="D", help="folder of images (sub-folders are not read)")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    g.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    add_model_args(p)
    g = p.add_argument_group("output")
    action = g.add_argument("--output", dest="out", required=True, metavar="DIR", help="output folder")
    deprecated(p, action, "--out")
    action = g.add_argument("--k", dest="top_k", type=int, default=None, metavar="N",
                            help="keep the N most similar (default: all)")
    deprecated(p, action, "--top-k")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.similarity import folder_similarity

    model = embedder(args)
    result = folder_similarity(model.model, args.image_dir, args.out, args.top_k, args.batch_size,
                               settings={"model": model.info.to_dict()}, progress=not args.no_progress,
                               source=model.info.source)
    skipped = f" (skipped {plural(len(result.skipped), 'unreadable image')})" if result.skipped else ""
    print(f"Wrote {plural(len(result.written), 'similarity file')} to {result.out}{skipped}")
    return 0
