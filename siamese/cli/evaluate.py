"""`evaluate`: how well a model finds the right item, beside the untrained network and raw pixels."""

from __future__ import annotations

import argparse
import json

from siamese.cli.common import add_catalog_args, add_model_args

NAME = "evaluate"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="how well a model finds the right item, against the untrained baseline",
        description="Embed every image of a labeled catalog and report leave-one-out retrieval among its items "
        "(precision@1, R-precision, MAP@R as in pytorch-metric-learning, recall@k: a same-item image among the "
        "k nearest), for the model, for the network it was trained from (untrained baseline) and for raw pixels (the "
        "images at the model's input size, flattened and L2-normalised: no learning at all), plus the "
        "distance threshold for 'same item?' with the best F1 on pairs drawn from the catalog.",
    )
    g = add_catalog_args(p)
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    add_model_args(p)
    g = p.add_argument_group("figures")
    g.add_argument("--k", dest="ks", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="recall@k for these k "
                   "(default 1 5 10)")
    g.add_argument("--pairs", type=int, default=4096, help="pairs for the threshold, half same-item (default 4096)")
    g.add_argument("--seed", type=int, default=0, help="seed of the threshold pairs (default 0)")
    g.add_argument("--no-baseline", action="store_true", help="skip the untrained baseline")
    g.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline (no learning at all)")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.catalog import load_catalog
    from siamese.evaluation import evaluate_models, format_evaluations
    from siamese.images import check_images

    progress = not args.no_progress
    catalog = check_images(load_catalog(args.labeled_data, args.image_dir), args.on_bad_image, progress=progress)
    results = evaluate_models(catalog, args.keras_model, args.backbone, args.weights, args.image_size,
                              baseline=not args.no_baseline, pixels=not args.no_pixels, ks=args.ks, pairs=args.pairs,
                              seed=args.seed, batch_size=args.batch_size, progress=progress)
    if args.json:
        print(json.dumps([{"model": info.to_dict(), **e.to_dict()} for info, e in results], indent=2))
        return 0
    print(format_evaluations(results, catalog))
    return 0
