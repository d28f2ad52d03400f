"""`merge-index`: join the shard parts written by `index --shard I/N` into one index."""

from __future__ import annotations

import argparse

from siamese.cli.common import add_engine_args, engine_settings, print_index
from siamese.util import plural

NAME = "merge-index"
TENSORFLOW = False


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="deprecated: join the shard parts written by `index --shard I/N` into one index",
        description="Deprecated: across machines, embed with `embed --runner ray` into an embedding store and build "
        "the index with `index --embeddings STORE...`. Join the parts written by `index --shard I/N` (one per "
        "shard, any order) into one index, identical in embeddings and rows to indexing the catalog at once, and "
        "build its search engine. Refuses parts of different models or catalogs and missing or repeated shards.",
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="part folders written by `index --shard I/N`")
    add_engine_args(p, inherit=True)
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, metavar="DIR", help="index folder to write")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.search import claim_output, merge_parts, refuse_part_output

    refuse_part_output(args.output, args.parts)
    with claim_output(args.output):
        index = merge_parts(args.parts, args.engine, **engine_settings(args))
        out = index.save(args.output)
    print_index(index, f"Merged {plural(len(args.parts), 'part')}: {plural(len(index), 'image')} of "
                f"{plural(len(set(index.items)), 'item')}", out)
    print(f"Next: python utilities.py query --index {out} IMAGE...")
    return 0
