"""Images per second of the training pair pipeline on Fashion-MNIST files: 1 and 2 cores, and cached.

    python benchmarks/input_pipeline.py [--limit 60000] [--image-size 32] [--batch-size 128] [--seconds 10]

Writes the Fashion-MNIST training split as PNG files with make-dataset (once, under --work), then times
`siamese.pipeline.PairBatches` in a child process pinned to 1 or 2 cores: decoding every pair from its
files, and gathering from a warm in-memory or on-disk (memory-mapped) cache; through `tf.data` (what `fit`
reads on TensorFlow) and as the PyDataset that `fit` reads on JAX, with Keras's two loading threads. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(args: argparse.Namespace) -> dict:
    """Run in the child: time the pipeline on the cores it was given."""
    from siamese.catalog import load_catalog
    from siamese.pairs import PairSampler
    from siamese.pipeline import PairBatches, decoded_images

    catalog = load_catalog(args.work / "train.json", args.work)
    sampler = PairSampler(catalog, seed=0)
    images = None
    if args.cache != "none":
        decoded_images(catalog, args.image_size, args.cache, progress=False)  # warm the cache
        images = decoded_images(catalog, args.image_size, args.cache, progress=False)
    source = PairBatches(sampler, args.image_size, batch_size=args.batch_size, pairs_per_epoch=len(catalog.filenames),
                         cache=args.cache, images=images)
    if args.form == "tf.data":
        from siamese.tfdata import tf_dataset

        batches = tf_dataset(source).as_numpy_iterator()
    else:  # as Keras's fit reads a PyDataset: its loading threads fill a queue
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

        adapter = PyDatasetAdapter(source)
        adapter.on_epoch_begin()
        batches = adapter.get_numpy_iterator()
    for _ in range(5):  # warm-up: thread pools, first epoch's pair draw
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        (a, _b), _y = next(batches)
        count += 2 * int(a.shape[0])
    elapsed = time.perf_counter() - start
    return {"images_per_second": count / elapsed, "cores": len(os.sched_getaffinity(0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "siamese-bench-fashion-mnist")
    parser.add_argument("--limit", type=int, default=60000, help="training images to write (default 60000)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration")
    parser.add_argument("--cache", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--form", default="tf.data", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    from siamese.datasets import make_dataset

    marker = args.work / "source.json"
    if not marker.exists() or json.loads(marker.read_text()).get("limit") != args.limit:
        print(f"writing Fashion-MNIST ({args.limit} training images) to {args.work} ...", flush=True)
        make_dataset("fashion-mnist", args.work, args.limit)
    cpus = sorted(os.sched_getaffinity(0))
    runs = [("files", "none", 1), ("files", "none", 2), ("warm memory cache", "memory", 2),
            ("warm disk cache (mmap)", "disk", 2)]
    rows = []
    for form, (name, cache, cores) in [(f, run) for f in ("tf.data", "PyDataset") for run in runs]:
        if cores > len(cpus):
            continue
        cmd = [sys.executable, __file__, "--child", "--work", str(args.work), "--limit", str(args.limit),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--seconds", str(args.seconds), "--cache", cache, "--form", form]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="jax" if form == "PyDataset" else "tensorflow")
        out = subprocess.run(["taskset", "-c", ",".join(map(str, cpus[:cores])), *cmd], env=env, check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append((form, name, result["cores"], result["images_per_second"]))
        print(f"{form:9s} {name:24s} {result['cores']} core(s): {result['images_per_second']:,.0f} images/s",
              flush=True)
    print(f"\nFashion-MNIST train PNGs ({args.limit:,} images), image size {args.image_size}, "
          f"batch {args.batch_size}:\n")
    print("| form | pipeline | cores | images/s |\n|---|---|---|---|")
    for form, name, cores, ips in rows:
        print(f"| {form} | {name} | {cores} | {ips:,.0f} |")


if __name__ == "__main__":
    main()
