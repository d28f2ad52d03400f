"""Embedding-store benchmark: images per second of `embed_to_store` on the "local" runner versus the "ray" runner,
and the time of a re-embed after 1% of the catalog changed against the time of the full embed.

Runners: "local" embeds in this process, decoded by worker processes (every usable CPU); "ray" runs on Ray Data in
a local Ray started here, with `--actors` (default 2) model actors that load the model from its .keras file. A
timed run is one whole `embed_to_store` call into a new store (hashing the files, embedding, writing the Parquet
parts and the manifest). The local runner is timed after a one-batch run has built the model's predict function;
each ray run starts its own actors (a process, TensorFlow's import and the model's load each), so "1-batch ray s"
(a run of one batch) is that fixed cost of a run, and "ray past it" the rate beyond it, (images - one batch) /
(run - 1-batch run). Ray's own start (`siamese.ray_runner.connect`, once, what `embed --runner ray` pays before
its run) is timed apart, and "ray+start" counts it in; so is the session's first ray run (one batch), which also
warms Ray's worker processes, and is left out of the figures. Two models of `siamese.models.build_embedding` with
random weights (which cost the same as pretrained ones): small_cnn at 28 px (128-d; the Fashion-MNIST benchmark's)
and mobilenet_v2 at 224 px (its pooled 1,280-d features).

Incremental: `--incremental-images` (default 60,000: Fashion-MNIST's whole train split) are embedded with small_cnn
on the local runner into a store; then 1% of the catalog changes (0.5% of its images dropped, spread evenly, and as
many new ones added, from the test split) and `embed_to_store` runs again into the same store, embedding only the
new images and copying the others' embeddings from it; a third run, with nothing changed, gives the floor (hashing
the files and checking the store). The store after the rerun is checked to hold exactly the changed catalog's
images (filenames, items, SHA-256 of the files, the kept rows' embeddings equal bit for bit to the full run's).

Images: Fashion-MNIST train PNGs written by make-dataset (scikit-learn's digits where Fashion-MNIST is not on the
machine, with the sizes cut to what it has).

    .venv/bin/python benchmarks/embed_store.py [--images 4000] [--mobilenet-images 250] [--incremental-images 60000]
        [--actors 2] [--batch-size 64] [--skip-ray] [--skip-incremental]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MODELS = (("small_cnn", 28, 128), ("mobilenet_v2", 224, None))
"""(backbone, image size, embedding dim) of the throughput runs; `--images` and `--mobilenet-images` their sizes."""
CHANGE = 0.005
"""The share of the catalog dropped, and the share added, by the incremental rerun (1% changed in all)."""


def timed(fn: Callable):
    """`(fn(), seconds it took)`."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def machine() -> str:
    """The CPUs (usable of all, and their model) and the OS, for the top of the figures."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{usable} usable CPUs of {os.cpu_count()}{f' ({model})' if model else ''}, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}")


def versions(ray: bool) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ("tensorflow", "keras", *(("ray",) if ray else ()))
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def save_model(backbone: str, size: int, dim: int | None, folder: Path):
    """The `Embedder` of a fresh random-weights `backbone` saved to a .keras file in `folder` (the ray runner's
    actors load that file)."""
    import keras

    from siamese.embed import Embedder
    from siamese.models import build_embedding

    keras.utils.set_random_seed(0)
    path = folder / f"{backbone}-{size}.keras"
    build_embedding(backbone, size, dim, weights=None).save(path)
    return Embedder.load(path)


def throughput(catalog, sizes: dict[str, int], work: Path, args: argparse.Namespace) -> None:
    """Images/s of `embed_to_store` on the local runner, then on a local Ray, for each model of `MODELS`."""
    from siamese.embedding_job import embed_to_store

    runs = iter(range(1_000_000))

    def store() -> Path:
        return work / f"store-{next(runs)}"

    rows = []
    for backbone, size, dim in MODELS:
        n = sizes[backbone]
        embedder = save_model(backbone, size, dim, work)
        subset = catalog.slice_images(0, n)
        batch = catalog.slice_images(0, max(1, min(args.batch_size, n // 4)))
        embed_to_store(embedder, batch, store(), "local", batch_size=args.batch_size, progress=False)  # warm-up
        result, local = timed(lambda e=embedder, s=subset: embed_to_store(e, s, store(), "local",
                                                                        batch_size=args.batch_size, progress=False))
        assert result.new == n == result.rows, result
        rows.append({"model": f"{backbone} {size}px", "images": n, "batch": len(batch.filenames),
                     "embedder": embedder, "subset": subset, "batch_catalog": batch, "local": local})
    start = None
    if not args.skip_ray:
        from siamese.ray_runner import connect

        disconnect, start = timed(lambda: connect("local"))  # "local": a Ray of our own, whatever $RAY_ADDRESS says
        try:
            import ray

            cpus = ray.cluster_resources().get("CPU", 0)
            gpus = ray.cluster_resources().get("GPU", 0)
            first = rows[0]  # the session's first run also warms Ray's workers (imports of Ray Data): not timed in
            _, warm = timed(lambda r=first: embed_to_store(
                r["embedder"], r["batch_catalog"], store(), "ray", batch_size=args.batch_size, actors=args.actors,
                progress=False))
            for row in rows:
                _, row["overhead"] = timed(lambda r=row: embed_to_store(
                    r["embedder"], r["batch_catalog"], store(), "ray", batch_size=args.batch_size,
                    actors=args.actors, progress=False))
                result, row["ray"] = timed(lambda r=row: embed_to_store(
                    r["embedder"], r["subset"], store(), "ray", batch_size=args.batch_size, actors=args.actors,
                    progress=False))
                assert result.new == row["images"] == result.rows, result
        finally:
            if disconnect is not None:
                disconnect()
    print()
    if start is not None:
        print(f"Throughput: local runner versus ray ({args.actors} actors; Ray start {start:.1f} s, a local Ray of "
              f"{cpus:g} CPUs{f' and {gpus:g} GPUs' if gpus else ''}; the session's first run, of one batch, "
              f"{warm:.1f} s)")
    else:
        print("Throughput: local runner (--skip-ray)")
    header = f"{'model':<19}{'images':>7}{'local img/s':>13}"
    if start is not None:
        header += f"{'ray img/s':>11}{'ray/local':>11}{'ray+start':>11}{'1-batch ray s':>15}{'ray past it':>13}"
    print(header)
    for row in rows:
        n = row["images"]
        line = f"{row['model']:<19}{n:>7,}{n / row['local']:>13,.1f}"
        if start is not None:
            ray_rate = n / row["ray"]
            rest = row["ray"] - row["overhead"]
            past = f"{(n - row['batch']) / rest:,.1f}" if rest > 0 and n > row["batch"] else "-"
            line += (f"{ray_rate:>11,.1f}{ray_rate / (n / row['local']):>11.2f}{n / (start + row['ray']):>11,.1f}"
                     f"{row['overhead']:>15.1f}{past:>13}")
        print(line)


def changed_catalog(base, test):
    """`base` without `CHANGE` of its images (spread evenly) and with as many of `test`'s (spread evenly, appended to
    the item of the same id, or as new items); returns (catalog, dropped filenames, added filenames)."""
    from siamese.catalog import Catalog, Item

    n = len(base.filenames)
    k = max(1, round(n * CHANGE))
    dropped = {base.filenames[int(i * n / k)] for i in range(k)}
    k_add = min(k, len(test.filenames))
    added = [test.filenames[int(i * len(test.filenames) / k_add)] for i in range(k_add)]
    owner = {f: test.items[test.image_item[i]].id for i, f in enumerate(test.filenames)}
    extra: dict[str, list[str]] = {}
    for f in added:
        extra.setdefault(owner[f], []).append(f)
    items = [Item(item.id, (*(f for f in item.filenames if f not in dropped), *extra.pop(item.id, ())), item.labels)
             for item in base.items]
    items = [item for item in items if item.filenames] + [Item(i, tuple(fs)) for i, fs in extra.items()]
    return Catalog(tuple(items), base.image_dir), dropped, added


def store_vectors(path: Path):
    """(filenames, embeddings) of the store at `path`, read a part at a time."""
    import numpy as np

    from siamese.embedding_store import EmbeddingStore

    filenames, blocks = [], []
    for meta, vectors in EmbeddingStore.open(path).batches():
        filenames += meta.column("filename").to_pylist()
        blocks.append(vectors)
    return filenames, np.concatenate(blocks)


def incremental(train, test, n: int, work: Path, args: argparse.Namespace) -> None:
    """Full embed of `n` images, rerun after 1% changed, rerun with nothing changed; check the store."""
    import numpy as np

    from siamese.embedding_job import embed_to_store, file_sha256
    from siamese.embedding_store import EmbeddingStore
    from siamese.util import parallel_map

    embedder = save_model("small_cnn", 28, 128, work)
    base = train.slice_images(0, n)
    changed, dropped, added = changed_catalog(base, test)
    store = work / "incremental-store"

    def run(catalog):
        return timed(lambda: embed_to_store(embedder, catalog, store, "local", batch_size=args.batch_size,
                                            progress=False))

    embed_to_store(embedder, base.slice_images(0, min(n, args.batch_size)), work / "incremental-warm-up", "local",
                   batch_size=args.batch_size, progress=False)  # builds the predict function
    full, full_s = run(base)
    assert (full.new, full.kept, full.dropped, full.rows) == (n, 0, 0, n), full
    before_files, before = store_vectors(store)
    rerun, rerun_s = run(changed)
    same, same_s = run(changed)

    # the store holds exactly the changed catalog's images: rows in its order, of its items, files' hashes, and the
    # kept rows' embeddings copied bit for bit
    m = len(changed.filenames)
    assert (rerun.new, rerun.kept, rerun.dropped, rerun.skipped, rerun.rows) == (
        len(added), n - len(dropped), len(dropped), 0, m), rerun
    assert (same.new, same.kept, same.dropped, same.rows) == (0, m, 0, m), same
    opened = EmbeddingStore.open(store)
    opened.verify()
    meta = opened.rows()
    assert len(opened) == m and meta.column("row").to_pylist() == list(range(m))
    assert meta.column("filename").to_pylist() == list(changed.filenames)
    assert meta.column("item").to_pylist() == [changed.items[i].id for i in changed.image_item]
    hashes = list(parallel_map(file_sha256, list(changed.paths), progress=False))
    assert meta.column("sha256").to_pylist() == hashes
    assert not set(meta.column("filename").to_pylist()) & dropped
    after_files, after = store_vectors(store)
    position = {f: i for i, f in enumerate(before_files)}
    kept = [i for i, f in enumerate(after_files) if f in position]
    assert len(kept) == n - len(dropped)
    assert np.array_equal(after[kept], before[[position[after_files[i]] for i in kept]])
    assert np.isfinite(after).all()

    print()
    share = (len(dropped) + len(added)) / n
    print(f"Incremental re-embed (local runner, small_cnn 28px): {n:,} images, then {len(dropped):,} dropped and "
          f"{len(added):,} added ({share:.1%} of the catalog changed)")
    print(f"{'run':<24}{'seconds':>9}{'img/s':>10}{'new':>8}{'kept':>9}{'dropped':>9}{'rows':>9}")
    for name, result, seconds in (("full embed", full, full_s), ("rerun after the change", rerun, rerun_s),
                                  ("rerun, nothing changed", same, same_s)):
        print(f"{name:<24}{seconds:>9.2f}{result.rows / seconds:>10,.0f}{result.new:>8,}{result.kept:>9,}"
              f"{result.dropped:>9,}{result.rows:>9,}")
    print(f"rerun / full: {rerun_s / full_s:.3f} (unchanged rerun / full: {same_s / full_s:.3f})")
    print(f"checked: the store holds exactly the changed catalog's {m:,} images (filenames in order, items, "
          "SHA-256 of the files, parts' hashes), the kept rows' embeddings equal to the full run's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="images for small_cnn's throughput (default 4,000)")
    parser.add_argument("--mobilenet-images", type=int, default=250,
                        help="images for mobilenet_v2's throughput (default 250)")
    parser.add_argument("--incremental-images", type=int, default=60_000,
                        help="images of the incremental re-embed (default 60,000: Fashion-MNIST's train split)")
    parser.add_argument("--actors", type=int, default=2, help="model actors of the ray runner (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the ray runner (throughput: local only)")
    parser.add_argument("--skip-incremental", action="store_true", help="leave out the incremental re-embed")
    args = parser.parse_args()
    for name in ("images", "mobilenet_images", "incremental_images", "actors", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    # imported here: decoding worker processes import this script, and should not load TensorFlow
    import tensorflow as tf

    from siamese.catalog import load_catalog
    from siamese.datasets import find_fashion_mnist, make_dataset

    print(f"embed_store benchmark, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}, {len(tf.config.list_physical_devices('GPU'))} GPUs (TensorFlow)")
    print(f"software: {versions(not args.skip_ray)}")
    source = "fashion-mnist" if find_fashion_mnist() else "digits"
    needed = max(args.images, args.mobilenet_images, 0 if args.skip_incremental else args.incremental_images, 2)
    with tempfile.TemporaryDirectory(prefix="siamese-bench-embed-store-") as tmp:
        work = Path(tmp)
        _, written = timed(lambda: make_dataset(source, work / "data", limit=needed, progress=False))
        train = load_catalog(work / "data" / "train.json", work / "data")
        test = load_catalog(work / "data" / "test.json", work / "data")
        available = len(train.filenames)
        sizes = {"small_cnn": min(args.images, available), "mobilenet_v2": min(args.mobilenet_images, available)}
        print(f"images: {source} train PNGs ({available:,} written in {written:.0f} s), batch {args.batch_size}"
              + ("" if needed <= available else f"; sizes cut to the {available:,} there are"))
        throughput(train, sizes, work, args)
        if not args.skip_incremental:
            incremental(train, test, min(args.incremental_images, available), work, args)


if __name__ == "__main__":
    main()
