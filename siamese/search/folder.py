"""The on-disk format of an index: a folder, never a pickle (loading a pickle runs code).

    index.json              the engine (name, params), counts, recall, the model's fingerprint, names and SHA-256
                            of the files below
    embeddings-<hash>.npy   float32 (rows, dim), L2-normalised: with the rows, the source of truth
    rows-<hash>.arrow       item, filename and labels of each row: an uncompressed Arrow IPC file, memory-mapped
                            on load (`siamese.search.rows`); before version 3, rows-<hash>.json
    engine-<hash><suffix>   engines with a file only (`Engine.suffix`): hnsw's graph in hnswlib's own format
                            (.hnsw, `save_index`), faiss's index in FAISS's own format (.faiss, `write_index`)

`index.json` is replaced last and atomically, so a crash while saving leaves the previous index whole. Engines
without a file (balltree, brute) are rebuilt on load; the others are read back. Loading checks every shape, type,
value and hash before using anything (files of 64 MiB and more only where they changed since this user's last
full check of them: see `siamese.search.verified`), and that the engine file holds as many rows of as many
dimensions as the embeddings. The embeddings are then memory-mapped read-only, so an hnsw or faiss index does not
hold them twice in memory. Folders of every earlier format version still load (see `FORMAT_VERSION`).

`save` reads an `Index`; `read` returns what `Index.from_built` takes, so this module never imports `Index`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese import __version__, atomic
from siamese.errors import SiameseError
from siamese.search.engine import ENGINES
from siamese.search.kernel import save_npy, squared_norms
from siamese.search.rows import Rows
from siamese.search.verified import Verified, stamp
from siamese.util import utc_now

if TYPE_CHECKING:
    from siamese.search.index import Index  # save reads one; nothing here builds one

FORMAT = "siamese-index"
FORMAT_VERSION = 3
"""Version 3 keeps the engine as {"name", "params"} and the rows in Arrow; version 2 (approximate engines, recall
and shard parts) kept the engine's name under "backend", its params under "engine" and the rows in JSON; version 1
(balltree, brute) its leaf size at the top level. All three load."""
NORM_TOLERANCE = 1e-3
EMBEDDER_KEYS = frozenset({"keras_model", "backbone", "weights", "image_size"})
"""What index.json's embedder may hold: the keyword arguments of `siamese.embed.Embedder.load` (its `recipe`)."""


def save(index: Index, directory: str | os.PathLike) -> Path:
    """Write the index to `directory` (created if needed; see the module docstring) and return the folder.

    The folder is written whole beside `directory` and swapped in (`atomic.replace_folder`) under its lock
    (`claim_output`), so a crash or a second run leaves the previous index whole. A folder that holds anything
    but an index of this tool, and a shard part this index was merged from, are refused. The large files' hashes
    of the writing are recorded as this user's full check of them (see `siamese.search.verified`).
    """
    directory = Path(directory)
    refuse_part_output(directory, (index.source or {}).get("parts", []))
    with claim_output(directory), atomic.replace_folder(directory) as new:
        files = {
            **write_hashed(new, "rows", ".arrow", index.rows.write),
            **write_hashed(new, "embeddings", ".npy", lambda path: save_npy(path, index.embeddings)),
        }
        engine = index.engine
        if engine.suffix:
            files.update(write_hashed(new, "engine", engine.suffix, engine.write))
        settings = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "engine": {"name": engine.name, "params": engine.params},
            "recall": index.recall,
            "rows": len(index),
            "dim": index.dim,
            "files": files,
            "model": index.model,
            "embedder": index.embedder,
            "source": index.source,
            "part": index.part,
            "created": utc_now(),
            "siamese": __version__,
        }
        atomic.write_json(new / "index.json", settings)
    # what was just written and hashed counts as checked in full: the first load of a large index is fast too
    verified = Verified(directory)
    for stem in ("rows", "embeddings", "engine"):
        if stem in files:
            path = directory / files[stem]
            verified.passed(path, files[f"{stem}_sha256"], stamp(path))
    verified.save()
    return directory


def read(directory: str | os.PathLike) -> dict:
    """The keyword arguments of `Index.from_built` for the index saved in `directory` by `save`, refusing anything
    malformed, inconsistent or modified."""
    directory = Path(directory)
    settings_path = directory / "index.json"
    if not settings_path.is_file():
        raise SiameseError(f"{directory} is not an index: no index.json. Fix: build one with "
                          "`python utilities.py --export balltree ...` and pass its --output folder.")

    def refuse(problem: str) -> SiameseError:
        return SiameseError(f"{directory}: {problem}. Fix: rebuild the index with `--export balltree`.")

    try:
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        found = (settings.get("format"), settings.get("version"))
    except (ValueError, AttributeError) as e:
        raise refuse(f"index.json is malformed ({type(e).__name__}: {e})") from None
    if found[0] != FORMAT or found[1] not in range(1, FORMAT_VERSION + 1):
        raise refuse(f"expected format {FORMAT} version 1 to {FORMAT_VERSION}, found {found[0]!r} version "
                     f"{found[1]!r}")
    try:
        files = settings["files"]
        embeddings_path = directory / Path(files["embeddings"]).name
        rows_path = directory / Path(files["rows"]).name
        rows_count, dim = int(settings["rows"]), int(settings["dim"])
        name, params = engine_of(settings, found[1])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise refuse(f"index.json is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(name, str) or name not in ENGINES:
        raise refuse(f"expected an engine of {', '.join(ENGINES)}, found {name!r}")
    verified = Verified(directory)
    embeddings = check_embeddings(embeddings_path, rows_count, dim, files.get("embeddings_sha256"), refuse, verified)
    rows = read_rows(rows_path, rows_count, files.get("rows_sha256"), refuse, verified)
    for key in ("model", "embedder", "source", "part", "recall"):
        if not isinstance(settings.get(key), dict | None):
            raise refuse(f"expected {key} to be an object or null, found {settings[key]!r:.80}")
    if set(settings.get("embedder") or {}) - EMBEDDER_KEYS:
        raise refuse(f"expected an embedder with keys among {', '.join(sorted(EMBEDDER_KEYS))}, found "
                     f"{sorted(settings['embedder'])}")
    kind = ENGINES[name]
    if kind.suffix:
        engine_path = directory / Path(str(files.get("engine"))).name
        if not engine_path.is_file() or not matches(engine_path, files.get("engine_sha256"), verified):
            raise refuse(f"{engine_path.name} is missing or was modified after the index was written "
                         "(SHA-256 mismatch)")
        try:
            engine = kind.read(engine_path, embeddings, params)
        except (RuntimeError, ValueError, KeyError, TypeError, SiameseError) as e:
            raise refuse(f"{engine_path.name} does not agree with the embeddings: {e}") from None
    else:
        try:
            engine = kind.read(None, embeddings, params)
        except (ValueError, TypeError, SiameseError) as e:
            raise refuse(str(e)) from None
    verified.save()
    recall = settings.get("recall")
    if recall:  # what a rebuild (a merge of parts) keeps
        engine.target_recall = recall["target"]
    return {"embeddings": embeddings, "rows": rows, "engine": engine, "recall": recall,
            **{key: settings.get(key) for key in ("model", "embedder", "source", "part")}}


def read_rows(path: Path, count: int, sha256: str | None, refuse: Callable[[str], SiameseError],
              verified: Verified) -> Rows:
    """The `count` rows of the Arrow file at `path` (memory-mapped), or of the JSON of format versions 1 and 2, after
    checking the file's SHA-256 (see `matches`) before anything parses it."""
    try:
        text = path.read_bytes() if path.suffix == ".json" else None  # read once: hashed, then parsed
        if not (matches(path, sha256, verified) if text is None else hashlib.sha256(text).hexdigest() == sha256):
            raise refuse(f"{path.name} was modified after the index was written (SHA-256 mismatch)")
        if text is not None:
            data = json.loads(text)
            del text
            parts = data["items"], data["filenames"], data["labels"]
            if not all(isinstance(x, list) and len(x) == count for x in parts):
                raise refuse(f"{path.name} does not have one item, filename and labels list per row ({count})")
            rows = Rows.from_lists(*parts)
        else:
            rows = Rows.open(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise refuse(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
    if len(rows) != count:
        raise refuse(f"{path.name} holds {len(rows)} rows, not the {count} that index.json records")
    return rows


def engine_of(settings: dict, version: int) -> tuple[object, dict]:
    """(name, params) of the engine index.json `settings` of format `version` record."""
    if version >= 3:
        return settings["engine"]["name"], dict(settings["engine"]["params"])
    if version == 2:
        return settings["backend"], dict(settings["engine"])
    return settings["backend"], {"leaf_size": settings["leaf_size"]}


def matches(path: Path, sha256: str | None, verified: Verified) -> bool:
    """Whether the file at `path` has the SHA-256 `sha256`: read in full, unless `verified` holds a full check of
    it that nothing wrote to since (see `siamese.search.verified`)."""
    if verified.current(path, sha256):
        return True
    before = stamp(path)
    if sha256_of(path) != sha256:
        return False
    verified.passed(path, sha256, before)
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_hashed(directory: Path, stem: str, suffix: str, write: Callable[[Path], object]) -> dict[str, str]:
    """Write a file with `write(path)` as `stem-<first 16 hex of its SHA-256><suffix>` in `directory` (a folder
    no one else reads yet); return its index.json entries: {stem: name, stem_sha256: hash}."""
    path = directory / f"{stem}{suffix}"
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_of(path)
    name = f"{stem}-{digest[:16]}{suffix}"
    os.replace(path, directory / name)
    return {stem: name, f"{stem}_sha256": digest}


def index_files(directory: Path) -> set[str] | None:
    """The names in `directory` that belong to the index its index.json describes (index.json included), or
    None when it holds no index.json or one this tool did not write."""
    try:
        settings = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        files = settings["files"] if settings.get("format") == FORMAT else None
        named = {Path(v).name for k, v in files.items() if not k.endswith("_sha256") and isinstance(v, str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"index.json", *named}


def refuse_part_output(directory: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> None:
    """Refuse to write a merged index over one of the shard `parts` it is merged from."""
    if Path(directory).resolve() in {Path(p).resolve() for p in parts}:
        raise SiameseError(f"Expected an output folder apart from the parts merged. Received: {directory}, one of "
                           "the parts. Fix: write the merged index to a new folder.")


def claim_output(directory: str | os.PathLike) -> AbstractContextManager[Path]:
    """Lock the index folder `directory` and check that it is new, empty, or an index this tool wrote and nothing
    else (see `atomic.claim_folder`): writing an index there deletes no one's files."""
    return atomic.claim_folder(directory, index_files, "an index")


def check_embeddings(
    path: Path, rows: int, dim: int, sha256: str | None, refuse: Callable[[str], SiameseError], verified: Verified
) -> np.ndarray:
    """Read-only memory map of the .npy at `path`, after checking its header (plain float32 `(rows, dim)`: a pickle
    or an object array is refused, never unpickled) and one streaming pass over the file that checks that its rows
    are finite and unit, and its SHA-256: checking holds 16 MiB of it in memory at a time, not a second copy. The
    pass is skipped where `verified` holds a full check of the file that nothing wrote to since."""
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, and by the with)
    except OSError as e:
        raise refuse(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
    with f:
        try:
            shape, fortran, dtype = headers[np.lib.format.read_magic(f)](f)
        except (KeyError, ValueError, EOFError) as e:
            raise refuse(f"{path.name} is not a plain .npy array ({type(e).__name__}: {e})") from None
        if dtype.hasobject:
            raise refuse(f"{path.name} is not a plain .npy array (an object array, which only a pickle loads)")
        if dtype != np.float32 or fortran or shape != (rows, dim):
            raise refuse(f"expected float32 embeddings of shape {(rows, dim)}; {path.name} holds {dtype} {shape}"
                         f"{' in Fortran order' if fortran else ''}")
        if verified.current(path, sha256):
            return np.load(path, mmap_mode="r", allow_pickle=False)
        before = stamp(path)
        digest = hashlib.sha256()
        header = f.tell()
        f.seek(0)
        digest.update(f.read(header))
        block = max(1, (1 << 24) // (4 * dim))
        for start in range(0, rows, block):
            data = f.read(4 * dim * min(block, rows - start))
            if len(data) != 4 * dim * min(block, rows - start):
                raise refuse(f"{path.name} is truncated: shorter than its header says")
            digest.update(data)
            squared = squared_norms(np.frombuffer(data, np.float32).reshape(-1, dim))
            if not np.isfinite(squared).all():
                raise refuse(f"{path.name} holds NaN or infinite values")
            if np.abs(np.sqrt(squared) - 1).max() > NORM_TOLERANCE:
                raise refuse(f"{path.name} holds rows that are not L2-normalised")
        for rest in iter(lambda: f.read(1 << 20), b""):
            digest.update(rest)
    if digest.hexdigest() != sha256:
        raise refuse(f"{path.name} was modified after the index was written (SHA-256 mismatch)")
    verified.passed(path, sha256, before)
    return np.load(path, mmap_mode="r", allow_pickle=False)
