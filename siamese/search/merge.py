"""Shards: a slice of a catalog for `index --shard I/N` (`shard_catalog`), whether a part is done (`finished_part`),
and one index of the parts (`merge_parts`). Deprecated beside `embed --runner ray` and `index --embeddings`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese.catalog import Catalog, Item
from siamese.errors import SiameseError
from siamese.search.engine import Engine, engine_class, make_engine
from siamese.search.index import Index
from siamese.search.kernel import write_rows
from siamese.util import plural

if TYPE_CHECKING:
    from siamese.embed import ModelInfo


def merge_parts(directories: Sequence[str | os.PathLike], engine: str | Engine | None = None, **settings) -> Index:
    """One index of the shard parts in `directories` (written by `index --shard I/N`), rows in catalog order.

    Refuses parts of different models or catalogs, missing or repeated shards, naming the folder and the fix.
    `engine` (an `Engine`, or a registered name) defaults to the parts'; with a name, `settings` (the engine's
    keyword arguments, e.g. leaf_size, m; those it does not take are ignored, as the command line passes every
    flag given) default to the parts' (`Engine.build_settings`) when the engine is theirs.
    Embeddings and rows equal those of indexing the catalog at once.
    The joined embeddings are memory-mapped from a temporary file beside the first part, so a merge holds the
    engine and a block of them (see `Index`), not all of them.
    """
    if not directories:
        raise SiameseError("Expected at least one part to merge. Received: none. Fix: pass the parts' folders.")
    parts = []
    for directory in directories:
        index = Index.load(directory)
        if not index.part:
            raise SiameseError(f"Expected shard parts. Received: {directory}, an index of a whole catalog. "
                               "Fix: pass the folders written by `index --shard I/N`.")
        parts.append((Path(directory), index))
    first_dir, first = parts[0]
    shards, batch_size = first.part["shards"], first.part["batch_size"]
    for directory, index in parts[1:]:
        if index.model.get("fingerprint") != first.model.get("fingerprint"):
            raise SiameseError(
                f"Expected parts embedded by one model. Received: {directory} by {index.model.get('source')} "
                f"(fingerprint {str(index.model.get('fingerprint'))[:12]}), {first_dir} by "
                f"{first.model.get('source')} (fingerprint {str(first.model.get('fingerprint'))[:12]}). "
                f"Fix: rebuild {directory} with the model of the others (--keras-model)."
            )
        if index.part["catalog_sha256"] != first.part["catalog_sha256"]:
            raise SiameseError(
                f"Expected parts of one catalog. Received: {directory} of {index.source.get('labeled_data')} "
                f"(SHA-256 {index.part['catalog_sha256'][:12]}), {first_dir} of {first.source.get('labeled_data')} "
                f"(SHA-256 {first.part['catalog_sha256'][:12]}). Fix: rebuild {directory} from the "
                "--labeled-data of the others."
            )
        if (index.part["shards"], index.part["batch_size"]) != (shards, batch_size):
            raise SiameseError(
                f"Expected parts of one split. Received: {directory} is shard {index.part['shard']}/"
                f"{index.part['shards']} of batches of {index.part['batch_size']}, {first_dir} shard "
                f"{first.part['shard']}/{shards} of batches of {batch_size}. Fix: build every part with the "
                "same --shard I/N and --batch-size."
            )
    by_shard: dict[int, tuple[Path, Index]] = {}
    for directory, index in parts:
        shard = index.part["shard"]
        if shard in by_shard:
            raise SiameseError(f"Expected each shard once. Received: shard {shard}/{shards} twice, in "
                               f"{by_shard[shard][0]} and {directory}. Fix: pass one of them.")
        by_shard[shard] = (directory, index)
    missing = [s for s in range(1, shards + 1) if s not in by_shard]
    if missing:
        listed = ", ".join(f"{s}/{shards}" for s in missing)
        raise SiameseError(f"Expected every shard of {shards}. Received: no part for shard {listed}. Fix: build "
                           f"{'it' if len(missing) == 1 else 'them'} with `index ... --shard {missing[0]}/{shards}` "
                           "and pass every part.")
    stop = 0
    for shard in range(1, shards + 1):
        directory, index = by_shard[shard]
        start, end = index.part["rows"]
        if start != stop or len(index) > end - start:
            raise SiameseError(f"Expected shard {shard}/{shards} to start at catalog image {stop}. Received: "
                               f"{directory} holds images {start} to {end}. Fix: rebuild it with "
                               f"`index ... --shard {shard}/{shards} --batch-size {batch_size}`.")
        stop = end
    ordered = [by_shard[s][1] for s in range(1, shards + 1)]
    if isinstance(engine, Engine):
        engine = make_engine(engine, **settings)  # refuses settings beside an engine
    else:
        kind = engine_class(engine or first.engine.name)
        inherited = first.engine.build_settings() if kind.name == first.engine.name else {}
        engine = kind.from_settings({**inherited, **settings})
    items = [item for index in ordered for item in index.items]
    filenames = [f for index in ordered for f in index.filenames]
    labels = [labels for index in ordered for labels in index.labels]
    catalog = Catalog(_items_of_rows(items, filenames, labels), Path(first.source.get("image_dir", ".")))
    source = {**first.source, "sha256": catalog.digest(), "parts": [str(d.resolve()) for d, _ in parts]}
    return Index(_joined([index.embeddings for index in ordered], first_dir), items, filenames, labels,
                 engine=engine, model=first.model, embedder=first.embedder, source=source)


def _joined(arrays: Sequence[np.ndarray], directory: Path) -> np.ndarray:
    """The rows of `arrays` one after another, written a block at a time (see `kernel.blocks`) to an unnamed temporary
    file in `directory` and memory-mapped read-only: joining memory-mapped parts holds a block, not the whole."""
    with tempfile.TemporaryFile(dir=directory) as f:  # gone from the disk once nothing maps it
        for array in arrays:
            write_rows(f, array.astype(np.float32, copy=False))
        f.flush()
        return np.memmap(f, np.float32, "r", shape=(sum(map(len, arrays)), arrays[0].shape[1]))


def _items_of_rows(items: Sequence[str], filenames: Sequence[str], labels: Sequence[tuple[str, ...]]) -> tuple:
    """The catalog items of index rows in catalog order (each item's rows are consecutive)."""
    out = []
    for item, rows in groupby(zip(items, filenames, labels, strict=True), key=lambda row: row[0]):
        rows = list(rows)
        out.append(Item(item, tuple(filename for _, filename, _ in rows), tuple(rows[0][2])))
    return tuple(out)


def shard_catalog(catalog: Catalog, shard: int, shards: int, batch_size: int = 64) -> tuple[Catalog, dict]:
    """Shard `shard` (1-based) of `shards` of `catalog`'s images: a contiguous run of whole batches of
    `batch_size` (default 64), so every batch is the one indexing the whole catalog embeds and the merged parts
    equal it byte for byte. Returns the slice and the part record an `Index` keeps (`part`): shard, shards,
    batch_size, rows (first and after-last image of the slice in the catalog), images, catalog_sha256."""
    images = len(catalog.filenames)
    batches = -(-images // batch_size)
    if not 1 <= shard <= shards <= batches:
        raise SiameseError(
            f"Expected `shard` I/N with 1 <= I <= N <= {batches:,} (the catalog's {plural(images, 'image')} make "
            f"{batches:,} batches of `batch_size={batch_size}`). Received: `shard={shard}/{shards}`. Fix: number "
            "shards from 1, and ask for at most one shard per batch."
        )
    start = (shard - 1) * batches // shards * batch_size
    stop = min(shard * batches // shards * batch_size, images)
    part = {"shard": shard, "shards": shards, "batch_size": batch_size, "rows": [start, stop], "images": images,
            "catalog_sha256": catalog.digest()}
    return catalog.slice_images(start, stop), part


def finished_part(directory: str | os.PathLike, info: ModelInfo, part: dict, engine: str) -> bool:
    """Whether `directory` holds, whole, the shard `part` (see `shard_catalog`) embedded by the model `info`
    with `engine`: such a shard need not be embedded again."""
    if not (Path(directory) / "index.json").is_file():
        return False
    try:
        index = Index.load(directory)
    except SiameseError:
        return False
    return (index.part, index.model.get("fingerprint"), index.engine.name) == (part, info.fingerprint, engine)
