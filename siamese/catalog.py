"""The labeled catalog: items, their images and their labels, loaded from JSON and checked thoroughly.

The format (docs/data.md):

    {"item_id": {"images": [{"filename": "relative/path.jpg"}, ...], "labels": ["red", ...]}, ...}

Two images of one item are a positive pair; two items are a negative pair unless they share a label.
`validate_catalog` reports every problem at once; `load_catalog` raises when any is unusable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from siamese.errors import SiameseError
from siamese.util import NotRegularFileError, open_regular, plural

MAX_CATALOG_BYTES = 1 << 30
"""Largest labeled-data file we read (1 GiB): bigger is almost surely the wrong file."""
MAX_NAME_CHARS = 1000
"""Longest item id or label: longer is almost surely a mistake, and unreadable in every message."""
MAX_FILENAME_CHARS = 4096
"""Longest image filename we pass to the file system (PATH_MAX on Linux): longer is refused unread."""


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
        place = f"item {_clip(repr(self.item_id))}" if self.item_id is not None else ""
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
    """A catalog with unusable entries; `report` holds every problem found, the message (one line) the first."""

    def __init__(self, report: Report):
        self.report = report
        n = len(report.errors)
        more = f" Run `validate` to list all {n:,}." if n > 1 else ""
        super().__init__(f"{report.source}: {plural(n, 'problem')} in the labeled data; the first: "
                         f"{report.errors[0]}.{more}".replace("\n", " "))


class _JsonObject(dict):
    """A JSON object that remembers keys it saw more than once (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()  # set on the few objects that have any: no __dict__ for the rest


def _object_hook(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        repeated: dict[str, None] = {}
        for key, _ in pairs:
            if key in seen:
                repeated[key] = None
            seen.add(key)
        obj.duplicates = tuple(repeated)
    return obj


def _open_error(e: OSError, shown: str) -> SiameseError:
    """The `SiameseError` for failing to open the labeled data at `shown`."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return SiameseError(f"Labeled data file not found: {shown}. Fix: check the `labeled_data` path.")
    if e.errno == errno.ELOOP:
        return SiameseError(f"Labeled data path is a symlink loop: {shown}. "
                            "Fix: point `labeled_data` at the JSON file itself.")
    if e.errno == errno.ENAMETOOLONG:
        return SiameseError(f"Labeled data path is too long for the file system: {shown}. "
                            "Fix: check the `labeled_data` path, or move the file to a shorter one.")
    if e.errno in (errno.EACCES, errno.EPERM):
        return SiameseError(f"Labeled data file is not readable (permission denied): {shown}. "
                            "Fix: make it readable (chmod u+r) or run as a user who may read it.")
    return SiameseError(f"Cannot read the labeled data {shown}: {e.strerror}. Fix: check the `labeled_data` path.")


def _read_json(path: Path) -> object:
    """Parse the labeled data: a regular file of at most `MAX_CATALOG_BYTES`, UTF-8 JSON."""
    shown = _clip(str(path), 200)
    try:
        f, info = open_regular(path)
    except NotRegularFileError as e:
        raise SiameseError(f"Expected a JSON file for `labeled_data`. Received: {e.kind}: {shown}. "
                           "Fix: pass the catalog's JSON file.") from None
    except OSError as e:
        raise _open_error(e, shown) from None
    too_big = (f"{shown} holds more than {MAX_CATALOG_BYTES:,} bytes, the limit for labeled data. "
               "Fix: check that `labeled_data` names the catalog JSON, or split the catalog.")
    with f:
        if info.st_size > MAX_CATALOG_BYTES:
            raise SiameseError(too_big)
        try:
            raw = f.read(MAX_CATALOG_BYTES + 1)  # the file may grow after fstat
        except OSError as e:
            raise _open_error(e, shown) from None
    if len(raw) > MAX_CATALOG_BYTES:
        raise SiameseError(too_big)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SiameseError(
            f"{shown} is not UTF-8 text (bad byte at offset {e.start}). Fix: save the labeled data as UTF-8 JSON."
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_object_hook)
    except json.JSONDecodeError as e:
        raise SiameseError(
            f"{shown}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Fix: correct the JSON syntax there."
        ) from None
    except RecursionError:
        raise SiameseError(f"{shown}: JSON nested too deeply to be a catalog. "
                           "Fix: check that `labeled_data` names the catalog JSON.") from None
    except ValueError as e:  # the only other: int() refuses more digits than sys.get_int_max_str_digits()
        raise SiameseError(_long_integer_message(shown, text, e)) from None


def _long_integer_message(shown: str, text: str, error: ValueError) -> str:
    """Say where in `text` the integer too long for Python to read is, for the message of `error`."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
    # Strings are skipped whole, so digits inside them never match; an integer has no '.', 'e' or 'E' around it.
    pattern = rf'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![\d.eE+-])(-?\d{{{limit + 1},}})(?![\d.eE])'
    for match in re.finditer(pattern, text):
        if match.group(1):
            pos = match.start(1)
            line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
            digits = len(match.group(1).lstrip("-"))
            return (f"{shown}: malformed JSON at line {line}, column {column}: an integer of {digits:,} digits, "
                    f"more than the {limit:,} Python reads. Fix: write it as a string, or remove it.")
    return f"{shown}: malformed JSON: {error}. Fix: correct the JSON there."


def _unsafe_reason(filename: str) -> str | None:
    """Why `filename` may not be used as a path relative to the image folder, or None."""
    if "\x00" in filename:
        return "contains a NUL byte"
    if not _is_text(filename):
        return "contains an unpaired surrogate (half of a \\u escape pair), which no file name holds"
    # The exact checks are slow on 100k-item catalogs, so run them only where they can find something.
    maybe_anchored = filename[:1] in "/\\" or filename[1:2] == ":"
    if maybe_anchored and (PurePosixPath(filename).is_absolute() or PureWindowsPath(filename).anchor):
        return "is an absolute path"
    if ".." in filename and (".." in PurePosixPath(filename).parts or ".." in PureWindowsPath(filename).parts):
        return "contains '..'"
    return None


class _Unusable(Exception):
    """An image entry that cannot be used: the `message` and `fix` of its Problem."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


class _ImageFolder:
    """Finds catalog filenames under the image folder, with the fewest system calls (one `lstat` per file)."""

    def __init__(self, image_dir: Path):
        self.dir = image_dir
        self.root = os.path.realpath(image_dir)
        self.prefix = os.path.join(self.root, "")
        self.real_dirs: dict[str, str] = {}

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.prefix)

    def resolve(self, filename: str) -> str:
        """The real path of an image file under the folder; raise `_Unusable` saying why there is none."""
        reason = _unsafe_reason(filename)
        if reason:
            raise _Unusable(f"filename {_clip(repr(filename))} {reason}",
                            f"give the path relative to `image_dir` {self.dir}, inside it")
        if len(filename) > MAX_FILENAME_CHARS:
            raise self.os_error(filename, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))
        path = os.path.join(self.dir, filename)
        head, tail = os.path.split(path)
        try:  # strict: stop at the first missing folder, not lstat every one of thousands of path parts
            real_dir = self.real_dirs.get(head)
            if real_dir is None:
                real_dir = self.real_dirs[head] = os.path.realpath(head, strict=True)
            real = os.path.join(real_dir, tail)
            # info stays None for a path that leads outside the folder
            info = os.lstat(path) if self.inside(real) else None
            if info is not None and stat.S_ISLNK(info.st_mode):
                real = os.path.realpath(path)
                info = os.stat(path) if self.inside(real) else None
        except OSError as e:
            raise self.os_error(filename, e) from None
        if info is None:
            raise _Unusable(f"{_clip(repr(filename))} is a link that leads outside the image folder, to {_clip(real)}",
                            f"copy the file into {self.dir} instead of linking to it")
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable(f"not a regular file: {self.shown(filename)}", "point it at an image file")
        return real

    def shown(self, filename: str) -> str:
        return _clip(str(self.dir / filename), 200)

    def os_error(self, filename: str, e: OSError) -> _Unusable:
        """The `_Unusable` for the file system refusing `filename`."""
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return _Unusable(f"file not found: {self.shown(filename)}", "correct the filename or add the file")
        if e.errno == errno.ELOOP:
            return _Unusable(f"{_clip(repr(filename))} is a symlink loop",
                             "point the link at an image file, or put the file there instead")
        if e.errno == errno.ENAMETOOLONG:
            return _Unusable(f"filename of {len(filename):,} characters is too long for the file system: "
                             f"{self.shown(filename)}", "rename the file and its folders shorter, and this entry")
        return _Unusable(f"cannot read {self.shown(filename)}: {e.strerror}",
                         "make the file and its folders readable")


def validate_catalog(labeled_data: str | os.PathLike, image_dir: str | os.PathLike, progress: bool = False) -> Report:
    """Check a labeled-data JSON against an image folder and report every problem at once.

    Raises `SiameseError` only when nothing can be checked (file missing, not JSON, folder missing);
    everything else is collected in the returned `Report`, whose `catalog` holds the usable items.
    `progress` shows a bar over the items while they are checked.
    """
    from tqdm.auto import tqdm

    source = Path(labeled_data)
    image_dir = Path(image_dir)
    name = str(source)
    try:
        is_dir, why = stat.S_ISDIR(os.stat(image_dir).st_mode), ""
    except OSError as e:
        is_dir, why = False, "" if e.errno == errno.ENOENT else f" ({e.strerror})"
    if not is_dir:
        raise SiameseError(
            f"Image folder not found: {_clip(str(image_dir), 200)}{why}. Fix: pass the folder the filenames are "
            "relative to as `image_dir`."
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

    folder = _ImageFolder(image_dir)
    seen: dict[str, tuple[str, str]] = {}
    items: list[Item] = []
    entries = tqdm(data.items(), total=len(data), desc="checking items", unit="item", disable=not progress,
                   leave=False)
    for item_id, entry in entries:
        text_ok = _is_text(item_id)
        where = f"$[{_clip(json.dumps(item_id, ensure_ascii=not text_ok))}]"
        before = len(report.errors)
        if len(item_id) > MAX_NAME_CHARS:
            err(Problem(name, f"item id of {len(item_id):,} characters, over the {MAX_NAME_CHARS:,}-character limit",
                        item_id, where, "give the item a shorter id"))
        if not text_ok:
            err(Problem(name, "item id contains an unpaired surrogate (half of a \\u escape pair)", item_id, where,
                        "write the id as plain UTF-8 text"))
        if not isinstance(entry, dict):
            err(Problem(name, f"Expected an object with 'images'. Received: {_kind(entry)}", item_id, where,
                        'write {"images": [{"filename": ...}], "labels": [...]}'))
            continue
        for key in entry.duplicates:
            err(Problem(name, f"key {_clip(repr(key))} appears more than once", item_id, where, "keep one of them"))
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
                try:
                    real = folder.resolve(filename)
                except _Unusable as e:
                    err(Problem(name, e.message, item_id, at, e.fix))
                    continue
                if real in seen:
                    other_id, other_at = seen[real]
                    err(Problem(name, f"{_clip(repr(filename))} is the same file as item {_clip(repr(other_id))} "
                                f"at {other_at}", item_id, at, "list each file under one item only"))
                    continue
                seen[real] = (item_id, at)
                filenames.append(filename)
        labels = entry.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            err(Problem(name, f"Expected 'labels' to be a list of strings. Received: {_kind(labels, True)}",
                        item_id, f"{where}.labels", 'write "labels": ["red", "pink"], or leave it out'))
        else:
            for n, label in enumerate(labels):
                if len(label) > MAX_NAME_CHARS:
                    err(Problem(name, f"label of {len(label):,} characters, over the {MAX_NAME_CHARS:,}-character "
                                "limit", item_id, f"{where}.labels[{n}]", "shorten the label"))
                elif not _is_text(label):
                    err(Problem(name, "label contains an unpaired surrogate (half of a \\u escape pair)", item_id,
                                f"{where}.labels[{n}]", "write the label as plain UTF-8 text"))
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


def load_catalog(labeled_data: str | os.PathLike, image_dir: str | os.PathLike, progress: bool = False) -> Catalog:
    """Load and validate a catalog; raise `CatalogError` listing every problem if any entry is unusable.

    `progress` shows a bar over the items while they are checked."""
    report = validate_catalog(labeled_data, image_dir, progress)
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
        raise SiameseError(f"Expected `val_fraction` in [0, 1). Received: {val_fraction}")
    if val_fraction == 0.0:
        return catalog, Catalog((), catalog.image_dir)
    n = len(catalog.items)
    if n < 2:
        raise SiameseError(
            f"A validation split needs at least 2 items; the catalog has {n}. "
            "Fix: add items, or pass `val_fraction=0`."
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
        text = text if _is_text(text) else json.dumps(value)  # unpaired surrogates would not print
        kind = f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"
    return kind


def _clip(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters, its full length noted, so that a huge value keeps messages readable."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _is_text(value: str) -> bool:
    """Whether `value` can be written as UTF-8 (JSON's "\\ud800" escapes give strings that cannot)."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
