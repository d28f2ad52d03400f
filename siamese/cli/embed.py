"""`embed`: embed a catalog into an embedding store, on this machine or on a Ray cluster, re-embedding only what
changed."""

from __future__ import annotations

import argparse

from siamese.cli.common import add_catalog_args, add_model_args, embedder

NAME = "embed"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="embed a catalog into an embedding store (Parquet), here or on a Ray cluster",
        description="Embed every image of a labeled catalog into an embedding store: Parquet files of row, item, "
        "filename, labels, the file's SHA-256 and the embedding, with a manifest written last. Run again with a "
        "grown or edited catalog, it embeds only the images the store lacks and drops those no longer in the "
        "catalog. --runner ray runs on Ray Data: a local Ray, or the cluster that RAY_ADDRESS or --ray-address "
        "names, decoding on CPU tasks and embedding in --actors model actors (a GPU each where there are GPUs). "
        "Build an index from stores with `index --embeddings STORE...`.",
    )
    g = add_catalog_args(p)
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    add_model_args(p)
    g = p.add_argument_group("runner")
    g.add_argument("--runner", choices=("local", "ray"), default="local",
                   help="local: in this process with its decode workers (default); ray: on Ray Data")
    g.add_argument("--actors", type=int, default=2, metavar="N",
                   help="with --runner ray: model actors, one model (and one GPU, where there are GPUs) each "
                   "(default 2)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="with --runner ray: the cluster to join (default $RAY_ADDRESS; without it a local Ray "
                   "is started and stopped)")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, metavar="STORE",
                   help="embedding store folder (or a URI pyarrow opens, e.g. s3://bucket/store)")
    g.add_argument("--replace", action="store_true",
                   help="embed every image again, whatever the store holds (a store of another model, or one that "
                   "does not read back whole, is refused without it)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.catalog import load_catalog
    from siamese.embedding_job import embed_to_store
    from siamese.embedding_store import claim_store

    with claim_store(args.output):  # a second run fails here, before the model loads
        catalog = load_catalog(args.labeled_data, args.image_dir)
        result = embed_to_store(embedder(args), catalog, args.output, args.runner, batch_size=args.batch_size,
                                actors=args.actors, ray_address=args.ray_address, replace=args.replace,
                                on_bad_image=args.on_bad_image, labeled_data=args.labeled_data,
                                progress=not args.no_progress)
    print(result.summary())
    print(f"Next: python utilities.py index --embeddings {args.output} --output DIR")
    return 0
