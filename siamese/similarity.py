"""Folder similarity (the ImageSim job): for every image of a folder, its similarity to every other image.

Writes `OUT/<stem>.json` per image: `[{"similarity": 1.0, "filename": "<stem>"}, ...]`, itself first, then
the others most similar first; similarity is the cosine of the two embeddings rounded to 4 decimals.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from siamese import atomic
from siamese.errors import SiameseError, plural
from siamese.images import ImageDecodeError, decode_image, parallel_map

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def list_images(image_dir: str | os.PathLike) -> list[Path]:
    """Image files directly in `image_dir` (by suffix, any case), sorted by name; sub-folders are not read."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise SiameseError(f"Expected --image-dir to be a folder. Received: {image_dir} (not found or not a folder)")
    return sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def output_names(paths: list[Path]) -> list[str]:
    """The name each image goes by: its stem, or its whole file name where stems collide (also by case,
    which would overwrite each other's output on case-insensitive file systems)."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem.lower()] = counts.get(p.stem.lower(), 0) + 1
    return [p.stem if counts[p.stem.lower()] == 1 else p.name for p in paths]


@dataclass
class SimilarityResult:
    """What `folder_similarity` did: one JSON per name in `written`, and the files it could not read."""

    out: Path
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _embed_files(model: keras.Model, paths: list[Path], batch_size: int, progress: bool):
    """Embed files that decode, in chunks so a large folder never sits in memory; returns (kept, embeddings)."""
    size = int(model.input_shape[1])

    def decode(path: Path):
        try:
            return decode_image(path, size)
        except ImageDecodeError as e:
            return str(e)

    kept, skipped, vectors, pending = [], [], [], []

    def flush():
        if pending:
            vectors.append(np.asarray(model.predict_on_batch(np.stack(pending)), np.float32))
            pending.clear()

    for index, decoded in enumerate(parallel_map(decode, paths, progress=progress, desc="embedding images")):
        if isinstance(decoded, str):
            skipped.append((paths[index].name, decoded))
            continue
        kept.append(index)
        pending.append(decoded)
        if len(pending) == batch_size:
            flush()
    flush()
    return kept, skipped, (np.concatenate(vectors) if vectors else np.empty((0, 0), np.float32))


def folder_similarity(
    model: keras.Model,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    top_k: int | None = None,
    batch_size: int = 64,
    settings: dict | None = None,
    progress: bool = True,
) -> SimilarityResult:
    """Embed every image of `image_dir` with `model` and write one JSON per image into `out`.

    `top_k` (default: all) keeps the most similar `top_k` entries per image, itself included. Images that
    cannot be decoded are skipped with one warning. `settings` are written to `out/.siamese.json` with the
    run's counts, so the output can be traced to what made it. Each file is written atomically.
    """
    if top_k is not None and top_k < 1:
        raise SiameseError(f"Expected --top-k >= 1. Received: {top_k}")
    paths = list_images(image_dir)
    if not paths:
        raise SiameseError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}). Fix: point --image-dir "
                           "at the folder that holds them.")
    names = output_names(paths)
    kept, skipped, embeddings = _embed_files(model, paths, batch_size, progress)
    result = SimilarityResult(Path(out), skipped=skipped)
    if skipped:
        first = f"{skipped[0][0]}: {skipped[0][1]}"
        warnings.warn(f"Skipping {plural(len(skipped), 'image')} that cannot be decoded (first: {first}).",
                      UserWarning, stacklevel=2)
    if not kept:
        raise SiameseError(f"None of the {plural(len(paths), 'image')} in {image_dir} could be decoded.")
    kept_names = [names[i] for i in kept]
    keep = len(kept) if top_k is None else min(top_k, len(kept))
    for start in range(0, len(kept), 1024):
        block = embeddings[start : start + 1024] @ embeddings.T
        rows = np.arange(block.shape[0])
        block[rows, rows + start] = np.inf  # itself first, reported as 1.0
        order = np.argsort(-block, axis=1, kind="stable")[:, :keep]
        for row, ranked in zip(rows, order, strict=True):
            entries = [{"similarity": 1.0 if j == row + start else round(float(block[row, j]), 4),
                        "filename": kept_names[j]} for j in ranked]
            atomic.write_bytes(result.out / f"{kept_names[row + start]}.json", json.dumps(entries).encode())
            result.written.append(kept_names[row + start])
    run = {**(settings or {}), "image_dir": str(image_dir), "top_k": top_k, "images": len(paths),
           "written": len(result.written), "skipped": [{"file": f, "reason": r} for f, r in skipped],
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic.write_json(result.out / ".siamese.json", run)
    return result
