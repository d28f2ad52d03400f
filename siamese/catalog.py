"""The labeled catalog: items, their images and their labels, loaded from JSON and checked thoroughly.

The format (DESIGN.md):

    {"item_id": {"images": [{"filename": "relative/path.jpg"}, ...], "labels": ["red", ...]}, ...}

Two images of one item are a positive pair; two items are a negative pair unless they share a label.
`validate_catalog` reports every problem at once; `load_catalog` raises when any is unusable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from siamese.errors import SiameseError, plural

MAX_CATALOG_BYTES = 1 << 30
"""Largest labeled-data file we read (1 GiB): bigger is almost surely the wrong file."""


@dataclass(frozen=True)
class Item:
    """One catalogued thing, photographed one or more times."""

    id: str
    filenames: tuple[str, ...]
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    """Items in file order; filenames are relative to `image_dir`."""

    items: tuple[Item, ...]
    image_dir: Path

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def filenames(self) -> tuple[str, ...]:
        """Every image of every item, flattened in item order."""
        return tuple(f for item in self.items for f in item.filenames)

    @cached_property
    def paths(self) -> tuple[Path, ...]:
        """Absolute-or-as-given paths of `filenames` under `image_dir`."""
        return tuple(self.image_dir / f for f in self.filenames)

    @cached_property
    def image_item(self) -> np.ndarray:
        """For each flattened image, the index of its item (int64)."""
        counts = [len(item.filenames) for item in self.items]
        return np.repeat(np.arange(len(self.items), dtype=np.int64), counts)

    @cached_property
    def labels(self) -> tuple[str, ...]:
        """Every distinct label, sorted."""
        return tuple(sorted({label for item in self.items for label in item.labels}))

    def subset(self, item_ids: set[str] | frozenset[str]) -> Catalog:
        """The catalog restricted to `item_ids`, in the original order."""
        return Catalog(tuple(i for i in self.items if i.id in item_ids), self.image_dir)

    def without_images(self, filenames: set[str]) -> Catalog:
        """The catalog without the given filenames; items left with no image are dropped."""
        items = []
        for item in self.items:
            kept = tuple(f for f in item.filenames if f not in filenames)
            if kept:
                items.append(Item(item.id, kept, item.labels))
        return Catalog(tuple(items), self.image_dir)

    def slice_images(self, start: int, stop: int) -> Catalog:
        """The catalog of images `start` to `stop` (excluded) of `filenames`; items cut at either end keep their
        id and labels, with their images inside the range."""
        return self.without_images({*self.filenames[:start], *self.filenames[stop:]})

    def digest(self) -> str:
        """SHA-256 of the catalog's content (ids, filenames, labels), independent of key order."""
        canonical = sorted([i.id, list(i.filenames), list(i.labels)] for i in self.items)
        return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()

    def summary(self) -> str:
        """One line of counts: items, images, labels and items with a single image."""
        single = sum(len(i.filenames) == 1 for i in self.items)
        return (
            f"{plural(len(self.items), 'item')}, {plural(len(self.filenames), 'image')}, "
            f"{plural(len(self.labels), 'label')}, {plural(single, 'item')} with one image"
        )


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a catalog: where it is, what it is, and how to fix it."""

    source: str
    message: str
    item_id: str | None = None
    where: str = ""
    fix: str = ""

    def __str__(self) -> str:
        place = f"item {self.item_id!r}" if self.item_id is not None else ""
        if self.where:
            place = f"{place} at {self.where}" if place else self.where
        text = f"{self.source}: {place + ': ' if place else ''}{self.message}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


@dataclass
class Report:
    """The outcome of `validate_catalog`: the usable items, the errors and the warnings."""

    source: Path
    catalog: Catalog
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class CatalogError(SiameseError):
    """A catalog with unusable entries; `report` holds every problem found."""

    def __init__(self, report: Report):
        self.report = report
        n = len(report.errors)
        lines = [f"{report.source}: {plural(n, 'problem')} in the labeled data:"]
        lines += [f"  {p}" for p in report.errors]
        super().__init__("\n".join(lines))


class _JsonObject(dict):
    """A JSON object that remembers keys it saw more than once (json keeps only the last)."""

    duplicates: list[str]


def _object_hook(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _read_json(path: Path) -> object:
    if not path.exists():
        raise SiameseError(f"Labeled data file not found: {path}. Fix: check the --labeled-data path.")
    if not path.is_file():
        raise SiameseError(f"Expected a JSON file for --labeled-data. Received a directory: {path}")
    size = path.stat().st_size
    if size > MAX_CATALOG_BYTES:
        raise SiameseError(
            f"{path} is {size:,} bytes, over the {MAX_CATALOG_BYTES:,}-byte limit for labeled data. "
            "Fix: check that --labeled-data names the catalog JSON, or split the catalog."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SiameseError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}). Fix: save the labeled data as UTF-8 JSON."
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_object_hook)
    except json.JSONDecodeError as e:
        raise SiameseError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Fix: correct the JSON syntax there."
        ) from None
    except RecursionError:
        raise SiameseError(f"{path}: JSON nested too deeply to be a catalog.") from None


def _unsafe_reason(filename: str) -> str | None:
    """Why `filename` may not be used as a path relative to the image folder, or None."""
    if "\x00" in filename:
        return "contains a NUL byte"
    if PurePosixPath(filename).is_absolute() or PureWindowsPath(filename).anchor:
        return "is an absolute path"
    if ".." in PurePosixPath(filename).parts or ".." in PureWindowsPath(filename).parts:
        return "contains '..'"
    return None


def validate_catalog(labeled_data: str | os.PathLike, image_dir: str | os.PathLike) -> Report:
    """Check a labeled-data JSON against an image folder and report every problem at once.

    Raises `SiameseError` only when nothing can be checked (file missing, not JSON, folder missing);
    everything else is collected in the returned `Report`, whose `catalog` holds the usable items.
    """
    source = Path(labeled_data)
    image_dir = Path(image_dir)
    name = str(source)
    if not image_dir.is_dir():
        raise SiameseError(
            f"Image folder not found: {image_dir}. Fix: pass the folder the filenames are relative to "
            "as --image-dir."
        )
    data = _read_json(source)
    report = Report(source, Catalog((), image_dir))
    err, warn = report.errors.append, report.warnings.append
    if not isinstance(data, dict):
        err(Problem(name, f"Expected a JSON object of items at the top level. Received: {_kind(data)}",
                    where="$", fix='write {"item_id": {"images": [{"filename": ...}]}, ...}'))
        return report
    for key in data.duplicates:
        err(Problem(name, "item id appears more than once (JSON keeps only the last)", key,
                    fix="give each item a unique id, or merge the entries"))

    root = image_dir.resolve()
    seen: dict[Path, tuple[str, str]] = {}
    items: list[Item] = []
    for item_id, entry in data.items():
        where = f"$[{json.dumps(item_id, ensure_ascii=False)}]"
        before = len(report.errors)
        if not isinstance(entry, dict):
            err(Problem(name, f"Expected an object with 'images'. Received: {_kind(entry)}", item_id, where,
                        'write {"images": [{"filename": ...}], "labels": [...]}'))
            continue
        for key in entry.duplicates:
            err(Problem(name, f"key {key!r} appears more than once", item_id, where, "keep one of them"))
        images = entry.get("images")
        filenames: list[str] = []
        if "images" not in entry:
            err(Problem(name, "'images' is missing", item_id, where,
                        'add "images": [{"filename": "relative/path.jpg"}]'))
        elif not isinstance(images, list):
            err(Problem(name, f"Expected 'images' to be a list. Received: {_kind(images)}", item_id,
                        f"{where}.images", 'write "images": [{"filename": ...}, ...]'))
        elif not images:
            err(Problem(name, "'images' is empty", item_id, f"{where}.images",
                        "list at least one image, or remove the item"))
        else:
            for n, image in enumerate(images):
                at = f"{where}.images[{n}]"
                filename = image.get("filename") if isinstance(image, dict) else None
                if not isinstance(filename, str) or not filename:
                    got = _kind(image) if not isinstance(image, dict) else (
                        "no 'filename'" if "filename" not in image else _kind(filename))
                    err(Problem(name, f"Expected an object with a non-empty string 'filename'. Received: {got}",
                                item_id, at, 'write {"filename": "relative/path.jpg"}'))
                    continue
                at = f"{at}.filename"
                reason = _unsafe_reason(filename)
                if reason:
                    err(Problem(name, f"filename {filename!r} {reason}", item_id, at,
                                f"give the path relative to --image-dir {image_dir}, inside it"))
                    continue
                path = image_dir / filename
                real = path.resolve()
                if not real.is_relative_to(root):
                    err(Problem(name, f"{filename!r} is a link that leads outside the image folder, to {real}",
                                item_id, at, f"copy the file into {image_dir} instead of linking to it"))
                    continue
                if not path.exists():
                    err(Problem(name, f"file not found: {path}", item_id, at,
                                "correct the filename or add the file"))
                    continue
                if not path.is_file():
                    err(Problem(name, f"not a regular file: {path}", item_id, at, "point it at an image file"))
                    continue
                if real in seen:
                    other_id, other_at = seen[real]
                    err(Problem(name, f"{filename!r} is the same file as item {other_id!r} at {other_at}",
                                item_id, at, "list each file under one item only"))
                    continue
                seen[real] = (item_id, at)
                filenames.append(filename)
        labels = entry.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            err(Problem(name, f"Expected 'labels' to be a list of strings. Received: {_kind(labels, True)}",
                        item_id, f"{where}.labels", 'write "labels": ["red", "pink"], or leave it out'))
        if len(report.errors) > before:
            continue
        if len(filenames) == 1:
            warn(Problem(name, "only one image: it gives no positive pair", item_id, f"{where}.images",
                         "add more images of it to use it in training"))
        items.append(Item(item_id, tuple(filenames), tuple(sorted(set(labels)))))
    if not data and not report.errors:
        err(Problem(name, "the catalog has no items", where="$", fix="add items to the labeled data"))
    report.catalog = Catalog(tuple(items), image_dir)
    return report


def load_catalog(labeled_data: str | os.PathLike, image_dir: str | os.PathLike) -> Catalog:
    """Load and validate a catalog; raise `CatalogError` listing every problem if any entry is unusable."""
    report = validate_catalog(labeled_data, image_dir)
    if report.errors:
        raise CatalogError(report)
    return report.catalog


def split_by_item(catalog: Catalog, val_fraction: float = 0.2, seed: int = 0) -> tuple[Catalog, Catalog]:
    """Split into (train, validation) by item, never by image, reproducibly from `seed`.

    `val_fraction` (default 0.2) of the items, rounded, go to validation: at least two when non-zero and the
    catalog has four or more items (retrieval among a single held-out item is always right, so it could not
    tell a good model from a bad one), else at least one.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SiameseError(f"Expected --val-fraction in [0, 1). Received: {val_fraction}")
    if val_fraction == 0.0:
        return catalog, Catalog((), catalog.image_dir)
    n = len(catalog.items)
    if n < 2:
        raise SiameseError(
            f"A validation split needs at least 2 items; the catalog has {n}. "
            "Fix: add items, or pass --val-fraction 0."
        )
    n_val = min(max(2 if n >= 4 else 1, round(n * val_fraction)), n - 1)
    ids = sorted(item.id for item in catalog.items)
    order = np.random.default_rng(seed).permutation(n)
    val_ids = {ids[i] for i in order[:n_val]}
    train_ids = {i for i in ids if i not in val_ids}
    return catalog.subset(train_ids), catalog.subset(val_ids)


def _kind(value: object, show: bool = False) -> str:
    """Name a JSON value's type for messages (`show` appends a short repr)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    kind = names.get(type(value), type(value).__name__)
    if isinstance(value, dict):
        kind = "an object"
    if show and not isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
        kind = f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"
    return kind
