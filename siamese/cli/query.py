"""`query`: the images of an index nearest to each query image."""

from __future__ import annotations

import argparse
import json

from siamese.cli.common import add_knob_args, knobs

NAME = "query"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="find the images of an index nearest to each query image",
        description="Print, for each image, its k nearest images in the index with item id, filename and cosine "
        "similarity. The index's own model embeds the queries.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    g = p.add_argument_group("index")
    g.add_argument("--index", required=True, metavar="DIR", help="index folder written by `index`")
    g.add_argument("--keras-model", metavar="M",
                   help="embed the queries with this model (default: the one the index records); it must be the "
                   "model that built the index")
    g = p.add_argument_group("answers")
    g.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    g.add_argument("--by-item", action="store_true", help="the best image of each of k items instead of k images")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_knob_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.embed import Embedder
    from siamese.search import Index

    index = Index.load(args.index)
    results = Embedder.of_index(index, args.keras_model).search(index, args.images, args.k, args.by_item,
                                                                 **knobs(args))
    if args.json:
        print(json.dumps([{"query": q, "neighbours": [{"rank": n, **m.to_dict()} for n, m in enumerate(r, 1)]}
                          for q, r in zip(args.images, results, strict=True)], indent=2, ensure_ascii=False))
        return 0
    for query, matches in zip(args.images, results, strict=True):
        print(query)
        for rank, m in enumerate(matches, 1):
            print(f"  {rank:>3}  {m.similarity:.4f}  {m.item}  {m.filename}")
    return 0
