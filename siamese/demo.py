"""The whole job end to end on real data that needs no download: what `make demo` runs.

Dataset (Fashion-MNIST when it is on this machine or can be downloaded, else scikit-learn's digits) ->
validate -> train on the CPU -> evaluate against the untrained baseline -> export the SavedModel -> index
the training images -> query it with test images (a PNG of the results) -> folder similarity on a handful
of images -> a summary of where everything is and the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from siamese import atomic
from siamese.errors import SiameseError
from siamese.util import plural


@dataclass
class DemoConfig:
    """Settings of a demo run; written to OUT/demo.config.json."""

    out: str = "demo"
    source: str = "auto"  # fashion-mnist, digits, or auto: Fashion-MNIST if it can be had, else digits
    images: int = 10_000  # Fashion-MNIST images used of each split, training and test (digits has 1,437 + 360)
    epochs: int = 6
    images_per_epoch: int = 32_768  # images drawn each epoch (P x K batches)
    batch_size: int = 128
    queries: int = 6  # test images queried, one per item
    similarity_images: int = 8
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _step(seconds: dict[str, float], title: str) -> Iterator[None]:
    """Print the step's title, and record how long it took under its number."""
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    seconds[title.split(".")[0]] = round(time.perf_counter() - start, 1)


def _prepare(out: Path) -> None:
    """Start from an empty OUT: clear a previous demo's folder, refuse anyone else's."""
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.config.json").is_file():
            raise SiameseError(f"{out} exists and is not a demo folder. Fix: pass another `out`, or empty it.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _dataset(config: DemoConfig, out: Path, progress: bool) -> tuple[str, dict[str, Path]]:
    from siamese.datasets import make_dataset

    source = "fashion-mnist" if config.source == "auto" else config.source
    if source == "fashion-mnist":
        try:
            return source, make_dataset(source, out / "data", limit=config.images, progress=progress)
        except (SiameseError, OSError, ValueError) as e:
            if config.source != "auto":
                raise
            print(f"Using digits instead of Fashion-MNIST: {e}")
    return "digits", make_dataset("digits", out / "data", progress=progress)


def run_demo(config: DemoConfig, progress: bool = True) -> dict:
    """Run every step, printing as it goes; returns (and writes to OUT/summary.json) the figures."""
    import numpy as np

    from siamese.catalog import load_catalog
    from siamese.config import TrainConfig
    from siamese.embed import Embedder
    from siamese.evaluation import evaluate_models
    from siamese.export import export_savedmodel
    from siamese.images import check_images
    from siamese.index import Index
    from siamese.plots import show_neighbours
    from siamese.similarity import folder_similarity
    from siamese.training import train

    started = time.perf_counter()
    out = Path(config.out)
    _prepare(out)
    atomic.write_json(out / "demo.config.json", config.to_dict())
    seconds: dict[str, float] = {}
    summary: dict = {"config": config.to_dict(), "seconds": seconds}

    with _step(seconds, "1. Dataset"):
        source, written = _dataset(config, out, progress)
        image_dir = written["train"].parent
        size = 28 if source == "fashion-mnist" else 32
        print(f"Using {source}: {written['train']} and {written['test']} (one item per class)")
        summary["dataset"] = source

    with _step(seconds, "2. Validate"):
        train_catalog = check_images(load_catalog(written["train"], image_dir), progress=progress)
        test_catalog = check_images(load_catalog(written["test"], image_dir), progress=progress)
        print(f"train: {train_catalog.summary()}\ntest: {test_catalog.summary()}")

    checkpoint = out / "checkpoints" / f"{source}.keras"
    with _step(seconds, f"3. Train small_cnn on the CPU ({config.epochs} epochs x {config.images_per_epoch:,} images, "
               "every pair of each batch, the test images as validation)"):
        result = train(TrainConfig(
            labeled_data=str(written["train"]), image_dir=str(image_dir), out=str(checkpoint),
            val_labeled_data=str(written["test"]), epochs=config.epochs, batch_size=config.batch_size,
            images_per_epoch=config.images_per_epoch, image_size=size, seed=config.seed,
        ), verbose="auto" if progress else 2)
        print(f"Best {result.monitor} {result.best:.4f} at epoch {result.best_epoch}: {checkpoint}")

    embedder = Embedder.load(checkpoint)
    with _step(seconds, "4. Evaluate on the test images: the trained model against the network it started from"):
        results = evaluate_models(test_catalog, checkpoint, pixels=False, ks=(5,), seed=config.seed, progress=False)
        evaluations = dict(zip(("trained", "untrained"), (e for _, e in results), strict=True))
        for name, e in evaluations.items():
            print(f"  {name:<10} {e.figures()}")
        threshold = evaluations["trained"].threshold
        print(f"Same item when distance <= {threshold.distance:.3f}: precision {threshold.precision:.3f}, "
              f"recall {threshold.recall:.3f}")
        summary["evaluation"] = {name: e.to_dict() for name, e in evaluations.items()}

    with _step(seconds, "5. Export the SavedModel"):
        export = export_savedmodel(embedder.model, out / "exports" / "savedmodel", info=embedder.info.to_dict())
        print(f"{export} (serving_default: encoded image bytes; serve_pixels: uint8 pixels)")

    with _step(seconds, "6. Index the training images (BallTree)"):
        index = embedder.index(train_catalog, labeled_data=written["train"], progress=progress)
        index_dir = index.save(out / "exports" / "index")
        print(f"{plural(len(index), 'image')} in {index_dir}")

    picture = out / "query_results.png"
    with _step(seconds, "7. Query the index with test images, one per item"):
        index = Index.load(index_dir)
        embedder.check(index)
        firsts: dict[int, Path] = {}
        for item, path in zip(test_catalog.image_item, test_catalog.paths, strict=True):
            firsts.setdefault(int(item), path)
        queries = list(firsts.values())[: config.queries]
        query_items = [test_catalog.items[i].id for i in list(firsts)[: config.queries]]
        for path, item, matches in zip(queries, query_items, embedder.search(index, queries, k=5), strict=True):
            right = sum(m.item == item for m in matches)
            print(f"  {path.name} ({item}): {right} of the 5 nearest are {item}; nearest {matches[0].filename} "
                  f"similarity {matches[0].similarity:.3f}")
        figure = show_neighbours(embedder, index, queries, image_dir, query_items=query_items, k=8, image_size=size * 2)
        figure.savefig(picture, dpi=120)
        print(f"Picture: {picture}")

    with _step(seconds, "8. Folder similarity (the ImageSim job) on a handful of test images"):
        folder = out / "similarity_images"
        folder.mkdir()
        rng = np.random.default_rng(config.seed)
        for n in sorted(rng.choice(len(test_catalog.paths), config.similarity_images, replace=False)):
            path = test_catalog.paths[n]
            shutil.copy(path, folder / f"{test_catalog.items[test_catalog.image_item[n]].id}_{path.name}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every image here is readable: a warning would be a bug
            similar = folder_similarity(embedder.model, folder, out / "similarity_out", progress=False)
        example = similar.out / f"{sorted(similar.written)[0]}.json"
        print(f"{plural(len(similar.written), 'file')} in {similar.out}; {example.name}: "
              f"{example.read_text()[:150]}...")

    seconds["total"] = round(time.perf_counter() - started, 1)
    summary["written"] = {"checkpoint": str(checkpoint), "savedmodel": str(export), "index": str(index_dir),
                          "query picture": str(picture), "similarity": str(similar.out),
                          "summary": str(out / "summary.json")}
    atomic.write_json(out / "summary.json", summary)
    trained, untrained = (evaluations[k].metrics["precision_at_1"] for k in ("trained", "untrained"))
    print(f"\n== Done in {seconds['total'] / 60:.1f} minutes on {source}: precision@1 of the test images "
          f"{trained:.4f} trained, {untrained:.4f} untrained")
    for name, path in summary["written"].items():
        print(f"  {name:<14} {path}")
    return summary
