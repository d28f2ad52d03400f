"""`index` (the original's `--export balltree`): embed a catalog and save a nearest-neighbour index."""

from __future__ import annotations

import argparse

from siamese.cli.common import add_catalog_args, add_engine_args, add_model_args, embedder, engine_settings, print_index
from siamese.util import plural

NAME = "index"
TENSORFLOW = True


def shard(text: str) -> tuple[int, int]:
    """`--shard I/N`: shard I (1-based) of N."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise argparse.ArgumentTypeError(f"Expected I/N with 1 <= I <= N (shards count from 1: 1/4 ... 4/4). "
                                         f"Received: {text!r}")
    return int(i), int(n)


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME,
        help="embed every image of a catalog and build a nearest-neighbour index (the original's --export balltree)",
        description="Embed every image of a labeled catalog (batched, from the files) and save a nearest-neighbour "
        "index with each row's item id, filename and labels: embeddings as .npy, rows as Arrow, never a "
        "pickle. Without --keras-model, a pretrained ImageNet backbone embeds the images. Approximate engines (hnsw, "
        "faiss IVF) measure their recall@10 on held-out images and pick the query-time --ef (--nprobe) that reaches "
        "--target-recall. --engine faiss --max-memory SIZE builds the index that budget holds (flat, HNSW, IVF, "
        "IVF of 8-bit codes, then OPQ + IVF + PQ codes; --rerank N ranks N candidates by exact distance). "
        "--embeddings STORE... builds the index from embedding stores written by `embed` instead, "
        "with no model and no images; with --engine faiss, --runner ray adds their rows to the trained index on Ray "
        "tasks (a local Ray, or the cluster that RAY_ADDRESS or --ray-address names) and merges them: the index of "
        "the local build. --shard I/N (deprecated) embeds one slice of the catalog, for several "
        "machines; merge-index joins them: use `embed --runner ray` and `index --embeddings` instead.",
    )
    g = p.add_argument_group("embeddings")
    g.add_argument("--embeddings", nargs="+", metavar="STORE",
                   help="build the index from these embedding stores (written by `embed`), in order, instead of a "
                   "catalog: no model, no images; they must be of one model, which the index records for queries")
    g.add_argument("--runner", choices=("local", "ray"), default="local",
                   help="with --embeddings and --engine faiss: where the rows are added to the trained index: in "
                   "this process (default), or by Ray tasks, a store part each, merged in row order (an IVF index; "
                   "HNSW and flat ones are built here)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="with --runner ray: the cluster to join (default $RAY_ADDRESS; without it a local Ray "
                   "is started and stopped)")
    g = add_catalog_args(p, required=False)
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    g.add_argument("--shard", type=shard, metavar="I/N",
                   help="deprecated: use `embed --runner ray` and `index --embeddings STORE`. Embed only shard I of "
                   "N, counted from 1 (1/4 ... 4/4): a contiguous run of whole batches of the catalog's images, saved "
                   "as a part in --output; join the parts with merge-index. A part already in --output (same model, "
                   "catalog, shard and --engine) is skipped, not redone")
    add_model_args(p)
    add_engine_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", default="exports/index", metavar="DIR", help="index folder (default exports/index)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.errors import SiameseError
    from siamese.search import claim_output

    if args.batch_size < 1:
        raise SiameseError(f"Expected `batch_size` >= 1. Received: {args.batch_size}")
    catalog = [flag for flag, value in (("labeled_data", args.labeled_data), ("image_dir", args.image_dir)) if value]
    if args.embeddings:
        given = catalog + [name for name in ("keras_model", "shard") if getattr(args, name)]
        if given:
            raise SiameseError(f"Expected `embeddings` alone, or a catalog (`labeled_data` and `image_dir`). Received: "
                               f"`embeddings` with {' and '.join(f'`{n}`' for n in given)}. Fix: the stores hold the "
                               "embeddings and record their model: leave out the catalog and the model.")
    elif args.runner != "local" or args.ray_address:
        given = "`runner='ray'`" if args.runner != "local" else f"`ray_address='{args.ray_address}'`"
        raise SiameseError(f"Expected `embeddings` with {given}. Received: "
                           f"{'a catalog' if catalog else 'no stores'}. Fix: embed the catalog with "
                           "`embed --runner ray` into a store, then index it with `embeddings` and `runner='ray'`.")
    elif len(catalog) < 2:
        raise SiameseError("Expected a catalog (`labeled_data` and `image_dir`) or `embeddings`. Received: "
                           f"{' '.join(f'`{n}`' for n in catalog) or 'neither'} alone. Fix: pass both, or build "
                           "from embedding stores.")
    with claim_output(args.output):
        return _from_stores(args) if args.embeddings else _claimed(args)


def _from_stores(args: argparse.Namespace) -> int:
    from siamese.embedding_store import index_stores
    from siamese.search import ENGINES

    engine = ENGINES[args.engine].from_settings(engine_settings(args))
    index = index_stores(args.embeddings, engine, args.runner, args.ray_address)
    out = index.save(args.output)
    print_index(index, f"Indexed {plural(len(index), 'image')} of {plural(len(args.embeddings), 'embedding store')}",
                out)
    print(f"Next: python utilities.py query --index {out} IMAGE...")
    return 0


def _claimed(args: argparse.Namespace) -> int:
    from siamese.catalog import load_catalog
    from siamese.images import check_images
    from siamese.search import ENGINES
    from siamese.search.merge import finished_part, shard_catalog

    progress = not args.no_progress
    catalog, part = load_catalog(args.labeled_data, args.image_dir), None
    if args.shard:
        catalog, part = shard_catalog(catalog, *args.shard, args.batch_size)
    catalog = check_images(catalog, args.on_bad_image, progress=progress)
    model = embedder(args)
    done = "Indexed "
    if part:
        done = (f"Indexed shard {part['shard']}/{part['shards']} (images {part['rows'][0]:,} to "
                f"{part['rows'][1]:,} of {part['images']:,}): ")
        if finished_part(args.output, model.info, part, args.engine):
            print(f"Skipped shard {part['shard']}/{part['shards']}: {args.output} already holds it (same model, "
                  "catalog, shard and --engine)")
            return 0
    engine = ENGINES[args.engine].from_settings(engine_settings(args))
    index = model.index(catalog, engine, batch_size=args.batch_size, labeled_data=args.labeled_data,
                        progress=progress, part=part)
    out = index.save(args.output)
    print_index(index, f"{done}{plural(len(index), 'image')} of {plural(len(catalog), 'item')}", out)
    if part:
        print("Next, when every shard is done: python utilities.py merge-index PART... --output DIR")
    else:
        print(f"Next: python utilities.py query --index {out} IMAGE...")
    return 0
