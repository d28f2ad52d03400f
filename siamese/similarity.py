"""Folder similarity (the ImageSim job): for every image of a folder, its similarity to every other image.

Writes `OUT/<stem>.json` per image: `[{"similarity": 1.0, "filename": "<stem>"}, ...]`, itself first, then
the others most similar first; similarity is the cosine of the two embeddings rounded to 4 decimals.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from siamese import atomic
from siamese.embed import check_finite, embed_sources
from siamese.errors import SiameseError
from siamese.search.kernel import kneighbors
from siamese.util import plural, utc_now

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
RUN_FILE = ".siamese.json"
"""The run record in the output folder: settings, counts, and which image each output file is of."""


def list_images(image_dir: str | os.PathLike) -> list[Path]:
    """Image files directly in `image_dir` (by suffix, any case), sorted by name; sub-folders are not read."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise SiameseError(f"Expected `image_dir` to be a folder. Received: {image_dir} (not found or not a folder)")
    return sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def output_names(paths: list[Path]) -> list[str]:
    """The name each image goes by, unique by construction (also by case, for case-insensitive file systems):
    its stem, or its whole file name where the stem is shared, is another image's file name or is the run
    record's (`.siamese`); a name still taken gets `~2`, `~3`..."""
    stems = Counter(p.stem.lower() for p in paths)
    reserved = {p.name.lower() for p in paths} | {Path(RUN_FILE).stem}
    names, used = [], {Path(RUN_FILE).stem}
    for p in paths:
        name = base = p.stem if stems[p.stem.lower()] == 1 and p.stem.lower() not in reserved else p.name
        copy = 1
        while name.lower() in used:
            copy += 1
            name = f"{base}~{copy}"
        used.add(name.lower())
        names.append(name)
    return names


def _own_files(out: Path) -> set[str] | None:
    """The names in `out` that a similarity run wrote, as its `.siamese.json` says (runs before it listed them:
    every .json file), or None when `out` holds no record of one."""
    try:
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        files = run.get("files")
        if files is None:
            return {RUN_FILE, *(p.name for p in out.iterdir() if p.suffix == ".json" and p.is_file())}
        return {RUN_FILE, *(f"{name}.json" for name in files)}
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def claim_output(out: str | os.PathLike) -> AbstractContextManager[Path]:
    """Lock the output folder `out` and check that it is new, empty, or holds only what an earlier similarity run
    wrote (see `atomic.claim_folder`), which the new run replaces whole."""
    return atomic.claim_folder(out, _own_files, "similarity files")


@dataclass
class SimilarityResult:
    """What `folder_similarity` did: one JSON per name in `written`, and the files it could not read."""

    out: Path
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def folder_similarity(
    model: keras.Model,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    top_k: int | None = None,
    batch_size: int = 64,
    settings: dict | None = None,
    progress: bool = True,
    source: str = "The model",
) -> SimilarityResult:
    """Embed every image of `image_dir` with `model` and write one JSON per image into `out`.

    `top_k` (default: all) keeps the most similar `top_k` entries per image, itself included. Images that
    cannot be decoded are skipped with one warning. `settings` are written to `out/.siamese.json` with the
    run's counts and which image each file is of, so the output can be traced to what made it. The whole
    folder is written beside `out` and swapped in (`atomic.replace_folder`) under its lock (`claim_output`): a
    crash leaves the previous run's folder whole, and a rerun leaves no file of an image since deleted.
    `source` names the model in errors (default "The model").
    """
    if top_k is not None and top_k < 1:
        raise SiameseError(f"Expected `top_k` >= 1. Received: {top_k}")
    paths = list_images(image_dir)
    if not paths:
        raise SiameseError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}). Fix: point `image_dir` "
                           "at the folder that holds them.")
    names = output_names(paths)
    result = SimilarityResult(Path(out))
    with claim_output(out), atomic.replace_folder(out) as new:
        kept, skipped, embeddings = embed_sources(model, paths, batch_size, skip_bad=True, progress=progress)
        result.skipped = [(paths[n].name, reason) for n, reason in skipped]
        if result.skipped:
            first = f"{result.skipped[0][0]}: {result.skipped[0][1]}"
            warnings.warn(f"Skipping {plural(len(result.skipped), 'image')} that cannot be decoded (first: {first}).",
                          UserWarning, stacklevel=2)
        if not kept:
            raise SiameseError(f"None of the {plural(len(paths), 'image')} in {image_dir} could be decoded.")
        check_finite(embeddings, source, [paths[i].name for i in kept])
        kept_names = [names[i] for i in kept]
        keep = len(kept) if top_k is None else min(top_k, len(kept))
        by_cosine = np.zeros(len(kept), np.float32)  # half norms of zero: the kernel ranks by q.g
        for start in range(0, len(kept), 1024):
            rows = np.arange(start, min(start + 1024, len(kept)))
            # itself first, reported as 1.0; then the others, most similar first, ties by lower row
            scores, ranked = kneighbors(embeddings, embeddings[rows], keep - 1, by_cosine, exclude=rows,
                                        return_scores=True)
            for row, similar, others in zip(rows, scores, ranked, strict=True):
                entries = [{"similarity": 1.0, "filename": kept_names[row]}, *(
                    {"similarity": round(float(x), 4), "filename": kept_names[j]} for x, j in zip(similar, others,
                                                                                                  strict=True))]
                (new / f"{kept_names[row]}.json").write_text(json.dumps(entries, allow_nan=False))
                result.written.append(kept_names[row])
        run = {**(settings or {}), "image_dir": str(image_dir), "top_k": top_k, "images": len(paths),
               "written": len(result.written),
               "files": {name: paths[i].name for name, i in zip(kept_names, kept, strict=True)},
               "skipped": [{"file": f, "reason": r} for f, r in result.skipped],
               "finished": utc_now()}
        atomic.write_json(new / RUN_FILE, run)
    return result
