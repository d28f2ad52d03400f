"""Train the default small_cnn on Fashion-MNIST from the CLI and measure retrieval and input speed.

    python benchmarks/train_fashion_mnist.py [--epochs 4] [--images-per-epoch 131072] [--image-size 28]
        [--backend tensorflow|jax]

1. make-dataset writes the 60,000 training and 10,000 test images as PNG files (once, under --work).
2. `utilities.py train` trains small_cnn with the default settings (batch-all supcon loss, cosine learning
   rate) on the training catalog (no validation split: every class is an item, so the run keeps its last
   epoch), timed. Arguments after `--` go to train as well, to measure a variant.
3. precision@1 of the 10,000 test images against the 60,000 training embeddings (nearest neighbour's
   class), beside the same figure on raw pixels.
4. Training images per second with batches decoded from the PNG files versus gathered from cached tensors,
   the same model and batch, timed over one epoch after a warm-up epoch.

Everything runs on the Keras `--backend` (default tensorflow), training through `train --backend`: run it once
per backend to compare them on the same batches (`make bench-backends`).
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


def images_per_second(train_catalog, image_size: int, batch_size: int, cache: str, steps: int) -> float:
    """Images per second of `fit` on small_cnn with the default batch-all supcon loss, second epoch of `steps`
    steps."""
    import keras

    from siamese.losses import BatchSupConLoss
    from siamese.models import build_embedding
    from siamese.pairs import PKSampler
    from siamese.pipeline import ItemBatches

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    keras.utils.set_random_seed(0)
    embedding = build_embedding("small_cnn", image_size)
    images = keras.Input(embedding.input_shape[1:], dtype="uint8")
    model = keras.Model(images, embedding(images))
    jax = keras.backend.backend() == "jax"
    model.compile(optimizer="adam", loss=BatchSupConLoss(), jit_compile=jax)  # as `train` compiles on the CPU
    stream = ItemBatches(PKSampler(train_catalog), image_size, batch_size=batch_size,
                         images_per_epoch=steps * batch_size, cache=cache)
    if not jax:
        from siamese.tfdata import tf_dataset

        stream = tf_dataset(stream)
    timer = Timer()
    model.fit(stream, epochs=2, steps_per_epoch=steps, callbacks=[timer], shuffle=False, verbose=0)
    return steps * batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "siamese-bench-fashion-mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images-per-epoch", type=int, default=131072, help="images per epoch (batch-all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28, help="Fashion-MNIST's own size (default 28)")
    parser.add_argument("--speed-steps", type=int, default=100, help="steps timed for files vs cached tensors")
    parser.add_argument("--backend", default="tensorflow", choices=("tensorflow", "jax"), help="Keras backend")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.environ["KERAS_BACKEND"] = args.backend

    import numpy as np

    from siamese.catalog import load_catalog
    from siamese.datasets import make_dataset
    from siamese.pipeline import decoded_images
    from siamese.retrieval import precision_at_1

    if not (args.work / "test.json").exists():
        print(f"writing Fashion-MNIST to {args.work} ...", flush=True)
        make_dataset("fashion-mnist", args.work)
    train_catalog = load_catalog(args.work / "train.json", args.work)
    test_catalog = load_catalog(args.work / "test.json", args.work)
    out = args.work / f"fashion_mnist_{args.backend}.keras"

    command = [sys.executable, "utilities.py", "train", "--labeled-data", str(args.work / "train.json"),
               "--image-dir", str(args.work), "--output", str(out), "--val-fraction", "0", "--epochs", str(args.epochs),
               "--images-per-epoch", str(args.images_per_epoch), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--backend", args.backend, "--no-progress", *extra]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    train_seconds = time.perf_counter() - start

    import keras

    model = keras.saving.load_model(out)
    gallery = model.predict(decoded_images(train_catalog, args.image_size, progress=False), batch_size=512, verbose=0)
    queries = model.predict(decoded_images(test_catalog, args.image_size, progress=False), batch_size=512, verbose=0)
    gallery_items = np.array([train_catalog.items[i].id for i in train_catalog.image_item])
    query_items = np.array([test_catalog.items[i].id for i in test_catalog.image_item])
    p1 = precision_at_1(queries, query_items, gallery, gallery_items)

    from siamese.datasets import find_fashion_mnist, read_idx

    folder = find_fashion_mnist()
    raw_train = read_idx(folder / "train-images-idx3-ubyte.gz").reshape(60000, -1).astype(np.float32)
    raw_test = read_idx(folder / "t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float32)
    raw_p1 = precision_at_1(raw_test, read_idx(folder / "t10k-labels-idx1-ubyte.gz"), raw_train,
                            read_idx(folder / "train-labels-idx1-ubyte.gz"))

    decoded_images(train_catalog, args.image_size, "disk", progress=False)  # warm for the cached run below
    from_files = images_per_second(train_catalog, args.image_size, args.batch_size, "none", args.speed_steps)
    cached = images_per_second(train_catalog, args.image_size, args.batch_size, "memory", args.speed_steps)

    history = json.loads(out.with_name(out.stem + ".history.json").read_text())
    results = {
        "backend": args.backend, "precision_at_1": p1, "raw_pixel_precision_at_1": raw_p1,
        "train_seconds": train_seconds, "epochs": args.epochs, "images_per_epoch": args.images_per_epoch,
        "train_args": extra,
        "final_loss": history[-1]["loss"],
        "images_per_second_files": from_files, "images_per_second_cached": cached,
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(results, indent=2))
    print(f"\n| figure ({args.backend}) | value |\n|---|---|\n"
          f"| precision@1, 10,000 test vs 60,000 train embeddings | {p1:.4f} |\n"
          f"| precision@1 on raw pixels (same search) | {raw_p1:.4f} |\n"
          f"| training wall time, CLI ({args.epochs} x {args.images_per_epoch:,} images) | "
          f"{train_seconds / 60:.1f} min |\n"
          f"| training images/s, decoded from PNG files | {from_files:,.0f} |\n"
          f"| training images/s, cached tensors | {cached:,.0f} |\n"
          f"| files / cached | {from_files / cached:.2f}x |")


if __name__ == "__main__":
    main()
