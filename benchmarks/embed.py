"""Embedding benchmark: images per second of index building from files versus the model alone on tensors.

"From files" is what `--export balltree` runs (`siamese.embed.embed_catalog`: tf.data batches decoded from
the PNG files by worker processes, then the model); "on tensors" is `model.predict` on the same images
already decoded in memory. Target: files >= 0.8x tensors. Two models: small_cnn at 28 px (the
Fashion-MNIST benchmark's) and mobilenet_v2 at 224 px (a pretrained backbone's size; random weights,
which cost the same). Images: Fashion-MNIST test PNGs written by make-dataset. Figures go in docs/benchmarks.md.

    .venv/bin/python benchmarks/embed.py [--images 4000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

MODELS = (("small_cnn", 28, 128, 2000), ("mobilenet_v2", 224, None, 250))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None,
                        help="images per model (default 2,000 for small_cnn, 250 for mobilenet_v2)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    # imported here: decoding worker processes import this script, and should not load TensorFlow
    import keras

    from siamese.catalog import load_catalog
    from siamese.datasets import find_fashion_mnist, make_dataset
    from siamese.embed import embed_catalog
    from siamese.models import build_embedding
    from siamese.pipeline import decoded_images

    source = "fashion-mnist" if find_fashion_mnist() else "digits"
    data = Path(tempfile.mkdtemp(prefix="siamese-bench-embed-"))
    make_dataset(source, data, limit=max(args.images or 0, *(m[3] for m in MODELS)), progress=False)
    catalog = load_catalog(data / "test.json", data)
    print(f"{source} test PNGs, batch {args.batch_size}, {len(os.sched_getaffinity(0))} CPUs")
    print(f"{'model':<22}{'images':>7}{'files img/s':>13}{'tensors img/s':>15}{'ratio':>7}")
    for backbone, size, dim, default_n in MODELS:
        n = args.images or default_n
        subset = catalog.without_images(set(catalog.filenames[n:]))
        keras.utils.set_random_seed(0)
        model = build_embedding(backbone, size, dim, weights=None)
        pixels = decoded_images(subset, size, "memory", progress=False)
        model.predict(pixels[: args.batch_size], verbose=0)  # build the predict function once, outside the timing
        embed_catalog(model, subset.without_images(set(subset.filenames[args.batch_size:])), args.batch_size,
                      progress=False)
        start = time.perf_counter()
        model.predict(pixels, batch_size=args.batch_size, verbose=0)
        tensors = n / (time.perf_counter() - start)
        start = time.perf_counter()
        embed_catalog(model, subset, args.batch_size, progress=False)
        files = n / (time.perf_counter() - start)
        print(f"{backbone + f' {size}px':<22}{n:>7,}{files:>13,.0f}{tensors:>15,.0f}{files / tensors:>7.2f}")


if __name__ == "__main__":
    main()
