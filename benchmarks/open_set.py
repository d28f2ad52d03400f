"""Open-set retrieval: train with the CLI defaults, then search among items that training never saw.

    python benchmarks/open_set.py [--dataset fashion-mnist glyphs] [--work DIR] [-- TRAIN ARGS...]

The protocol of metric learning (Musgrave, Belongie and Lim 2020): train and test items are disjoint, and
the score is leave-one-out retrieval among the test items (precision@1, R-precision, MAP@R), for the
trained model beside the network it started from (same initial weights) and raw pixels.

- fashion-mnist: `make-dataset --source fashion-mnist --limit 20000`; train on the training images of the 7
  classes other than sneaker, bag and ankle_boot (each class is an item), test on the test images of those 3.
- glyphs: `make-dataset --source glyphs`; train on train.json (the training scripts), test on test.json (the
  test scripts, none of which training sees).

`utilities.py train` runs with its defaults (validation: held-out items split by item) and `--image-size`
the dataset's own; arguments after `--` go to train as well, to measure a variant. Prints one table per
dataset and a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter, here and in the CLI runs

UNSEEN_FASHION = ("sneaker", "bag", "ankle_boot")
SIZES = {"fashion-mnist": 28, "glyphs": 32}


def subset(source: Path, out: Path, keep) -> Path:
    """Write the items of labeled JSON `source` whose id passes `keep` to `out`."""
    items = json.loads(source.read_text())
    out.write_text(json.dumps({k: v for k, v in items.items() if keep(k)}))
    return out


def catalogs(dataset: str, work: Path) -> tuple[Path, Path, Path]:
    """(image folder, training catalog, test catalog of unseen items) of `dataset`, made once under `work`."""
    folder = work / dataset
    if not (folder / "test.json").exists():
        command = [sys.executable, "utilities.py", "make-dataset", "--source", dataset, "--output", str(folder),
                   "--no-progress"]
        if dataset == "fashion-mnist":
            command += ["--limit", "20000"]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if dataset == "glyphs":
        return folder, folder / "train.json", folder / "test.json"
    train = subset(folder / "train.json", folder / "train_7_classes.json", lambda k: k not in UNSEEN_FASHION)
    test = subset(folder / "test.json", folder / "test_3_unseen_classes.json", lambda k: k in UNSEEN_FASHION)
    return folder, train, test


def run(dataset: str, work: Path, extra: list[str]) -> dict:
    """Train on `dataset`'s training items with the CLI defaults (+ `extra`), evaluate on its unseen items."""
    from siamese.catalog import load_catalog
    from siamese.evaluation import evaluate_models, format_evaluations

    folder, train, test = catalogs(dataset, work)
    out = work / f"{dataset}.keras"
    for stale in work.glob(f"{dataset}.*"):  # a fresh run, not a resumed one
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    command = [sys.executable, "utilities.py", "train", "--labeled-data", str(train), "--image-dir", str(folder),
               "--output", str(out), "--image-size", str(SIZES[dataset]), "--no-progress", *extra]
    print("$", " ".join(command[1:]).replace(str(work), "WORK"), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start

    catalog = load_catalog(test, folder)
    results = [(dataclasses.replace(info, source=info.source.replace(str(work), "WORK")), e)
               for info, e in evaluate_models(catalog, out, progress=False)]
    print(f"{dataset}: items training never saw ({test.name})")
    print(format_evaluations(results, catalog))
    history = json.loads(out.with_name(f"{out.stem}.history.json").read_text())
    manifest = json.loads(out.with_name(f"{out.stem}.manifest.json").read_text())
    names = ("trained", "untrained", "raw pixels")
    return {
        "dataset": dataset, "train_args": extra, "train_minutes": round(seconds / 60, 2),
        "best": manifest["best"], "validation_history": [
            {k: round(v, 4) for k, v in h.items() if k in ("epoch", "val_map_at_r", "val_precision_at_1")}
            for h in history],
        **{name: {k: round(e.metrics[k], 4) for k in ("precision_at_1", "r_precision", "map_at_r")}
           for name, (_, e) in zip(names, results, strict=True)},
    }


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "siamese-bench-open-set")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.work.mkdir(parents=True, exist_ok=True)
    summary = [run(dataset, args.work, extra) for dataset in args.dataset]
    print(json.dumps(summary, indent=2))
    print("\n| dataset | model | precision@1 | R-precision | MAP@R |\n|---|---|---|---|---|")
    for s in summary:
        for name in ("trained", "untrained", "raw pixels"):
            m = s[name]
            print(f"| {s['dataset']} | {name} | {m['precision_at_1']:.4f} | {m['r_precision']:.4f} | "
                  f"{m['map_at_r']:.4f} |")


if __name__ == "__main__":
    main()
