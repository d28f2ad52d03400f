"""`export` (the original's `--export savedmodel`): the embedding network as a TensorFlow SavedModel."""

from __future__ import annotations

import argparse

from siamese.cli.common import add_model_args, embedder

NAME = "export"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="write the embedding network as a TensorFlow SavedModel (the original's --export savedmodel)",
        description="Export the embedding network as a TensorFlow SavedModel in a new numbered version folder "
        "(OUTPUT/1, OUTPUT/2...), as TF Serving expects. serving_default takes a batch of encoded image bytes "
        "(JPEG, PNG, GIF, BMP) and returns embeddings; serve_pixels takes uint8 pixels. Without --keras-model, "
        "a pretrained ImageNet backbone is exported.",
    )
    add_model_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", default="exports/savedmodel", metavar="DIR",
                   help="folder of versions (default exports/savedmodel)")
    g.add_argument("--model-version", type=int, default=None, metavar="N",
                   help="version folder number (default: one more than the latest in --output)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.embed import shown
    from siamese.export import export_savedmodel

    model = embedder(args)
    info = model.info
    path = export_savedmodel(model.model, args.output, args.model_version, info=info.to_dict())
    print(f"SavedModel of {shown(info.source)} ({info.image_size} px in, {info.embedding_dim}-d out): {path}")
    print("Signatures: serving_default (encoded image bytes), serve_pixels (uint8 pixels)")
    return 0
