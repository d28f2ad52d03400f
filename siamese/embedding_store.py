"""The embedding store: a catalog's embeddings on disk, the pivot between the model and the index.

A folder (or a URI pyarrow's filesystems open, e.g. `s3://bucket/store`) of:

    manifest.json            format, version, the model (fingerprint, source, image size, dim) and its recipe,
                             the catalog's hash, counts, and the part files with their row counts, sizes, SHA-256
    part-<hash>.parquet      one row per image, in catalog order: row (int64), item, filename, labels
                             (list<string>), sha256 (of the image file's bytes), stamp (the file's size,
                             mtime in ns and inode when it was hashed: fixed_size_list<int64>[3], null where
                             unknown; not in version 1), embedding (fixed_size_list<float32>[dim])

Parts are written under names made of their content's hash, never over a part the manifest names with other
bytes; the manifest is written last and atomically, and is the commit point: a run killed before it leaves the
store as it was. Parts no manifest names are removed after the swap. A store is read a part at a time
(`EmbeddingStore.batches`), each part checked against the manifest's size and SHA-256 as it is read, so nothing
that reads a store needs all of it in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese import __version__, atomic
from siamese.errors import SiameseError
from siamese.util import plural, utc_now

if TYPE_CHECKING:
    import pyarrow as pa

    from siamese.search import Engine, Index

FORMAT = "siamese-embeddings"
FORMAT_VERSION = 2
"""Version 2 added the parts' `stamp` column; stores of version 1 still read (and update, hashing every file)."""
MANIFEST = "manifest.json"
PART_ROWS = 8192
"""Rows per part file (default): 42 MiB of embeddings at 1,280 dimensions, the most a reader holds at once."""
METADATA = ("row", "item", "filename", "labels", "sha256", "stamp")
"""The columns of a store besides `embedding`, which `EmbeddingStore.rows` returns (no stamp in version 1)."""
_PART = re.compile(r"part-[0-9a-f]{16}\.parquet")
_OURS = re.compile(r"(part-[0-9a-f]{16}\.parquet|\.(manifest\.json|part-[0-9a-f]{16}\.parquet)\..+\.tmp)")
"""Names a store's folder may hold: parts (named or left by a killed run) and the temporary files of atomic writes."""


def _location(path: str | os.PathLike) -> tuple[pa.fs.FileSystem, str, Path | None]:
    """(filesystem, path in it, local folder or None) of a store's folder: a local path, or any URI pyarrow opens."""
    from pyarrow import fs

    text = os.fspath(path)
    if "://" not in text:
        folder = Path(text).absolute()
        return fs.LocalFileSystem(), str(folder), folder
    try:
        filesystem, inner = fs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:
        raise SiameseError(f"Expected a folder or a URI pyarrow opens (s3://, gs://, hdfs://, file://). Received: "
                           f"{text} ({e}). Fix: check the scheme and the credentials.") from None
    local = Path(inner) if isinstance(filesystem, fs.LocalFileSystem) else None
    return filesystem, inner.rstrip("/"), local


def local_folder(path: str | os.PathLike) -> Path | None:
    """The local folder of the store at `path` (a path, or a file:// URI); None for a remote URI."""
    return _location(path)[2]


def store_exists(path: str | os.PathLike) -> bool:
    """Whether `path` holds a store's manifest (sound or not: `EmbeddingStore.open` checks it)."""
    filesystem, root, _ = _location(path)
    return filesystem.get_file_info(f"{root}/{MANIFEST}").size is not None


def _schema(dim: int, version: int = FORMAT_VERSION) -> pa.Schema:
    import pyarrow as pa

    stamp = [("stamp", pa.list_(pa.int64(), 3))] if version >= 2 else []
    return pa.schema([("row", pa.int64()), ("item", pa.string()), ("filename", pa.string()),
                      ("labels", pa.list_(pa.string())), ("sha256", pa.string()), *stamp,
                      ("embedding", pa.list_(pa.float32(), dim))])


def store_files(folder: Path) -> set[str] | None:
    """The names in the local store `folder` that a run of this tool wrote (manifest, parts, temporary files of a
    killed run), or None when its manifest is missing or not a store's: what `claim_store` may write over."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return {MANIFEST, *(p.name for p in folder.iterdir() if _OURS.fullmatch(p.name))}


def claim_store(path: str | os.PathLike) -> AbstractContextManager:
    """Lock the local store folder `path` (see `atomic.claim_folder`: a second run fails at once) and check that it
    is new, empty or a store and nothing else. A URI is not locked: one run at a time there is the caller's to keep."""
    local = local_folder(path)
    return nullcontext() if local is None else atomic.claim_folder(local, store_files, "an embedding store")


class EmbeddingStore:
    """A store written by `siamese.embed_to_store`, opened read-only with `EmbeddingStore.open(path)`.

    `manifest` is manifest.json; `model` the model that embedded it (source, fingerprint, image_size,
    embedding_dim) and `embedder` its recipe (`Embedder.load`'s arguments); `len(store)` its rows."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = os.fspath(path)
        self.filesystem, self._root, self.local = _location(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingStore:
        """Open the store at `path`, checking its manifest (format, version, dims, counts) and that every part
        it names is there with the size it records; refused with a message naming the file and the fix."""
        filesystem, root, _ = _location(path)
        name = f"{os.fspath(path).rstrip('/')}/{MANIFEST}"
        try:
            with filesystem.open_input_stream(f"{root}/{MANIFEST}") as f:
                text = f.read()
        except (FileNotFoundError, OSError) as e:
            missing = isinstance(e, FileNotFoundError) or "not found" in str(e).lower()
            raise SiameseError(f"{path} is not an embedding store: {MANIFEST} is {'missing' if missing else e}. "
                               "Fix: write one with `embed --output` and pass that folder.") from None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise SiameseError(f"{name} is not JSON ({e}). Fix: embed the catalog again with `replace=True`.") from None
        store = cls(path, manifest)
        store._check()
        return store

    def _refuse(self, problem: str) -> SiameseError:
        return _refusal(self.path, problem)

    def _check(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise SiameseError(f"Expected {MANIFEST} of format {FORMAT!r}. Received: {self.path}/{MANIFEST} of "
                               f"{(m.get('format') if isinstance(m, dict) else type(m).__name__)!r}. Fix: pass a "
                               "folder written by `embed`.")
        if m.get("version") not in range(1, FORMAT_VERSION + 1):
            raise SiameseError(f"Expected an embedding store of format version 1 to {FORMAT_VERSION}. Received: "
                               f"{self.path} of version {m.get('version')!r}. Fix: embed it again with this "
                               f"siamese ({__version__}), or use the siamese that wrote it.")
        dim, rows, parts = m.get("dim"), m.get("rows"), m.get("parts")
        if not (isinstance(dim, int) and dim >= 1 and isinstance(rows, int) and rows >= 0):
            raise self._refuse(f"expected a dim >= 1 and rows >= 0 in {MANIFEST}, found {dim!r} and {rows!r}")
        for key in ("model", "embedder", "source"):
            if not isinstance(m.get(key), dict):
                raise self._refuse(f"expected {key} to be an object in {MANIFEST}, found {m.get(key)!r:.80}")
        if m["model"].get("embedding_dim") != dim:
            raise self._refuse(f"the model makes {m['model'].get('embedding_dim')!r}-d embeddings, the store "
                               f"holds {dim}-d ones")
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and _PART.fullmatch(p["name"])
            and isinstance(p.get("rows"), int) and p["rows"] >= 1 and isinstance(p.get("bytes"), int)
            and isinstance(p.get("sha256"), str) for p in parts
        ):
            raise self._refuse(f"expected parts [{{name: part-<hash>.parquet, rows, bytes, sha256}}, ...] in "
                               f"{MANIFEST}, found {parts!r:.80}")
        if sum(p["rows"] for p in parts) != rows:
            raise self._refuse(f"{MANIFEST} counts {rows:,} rows, its parts {sum(p['rows'] for p in parts):,}")
        infos = self.filesystem.get_file_info([f"{self._root}/{p['name']}" for p in parts]) if parts else []
        for part, info in zip(parts, infos, strict=True):
            if info.size is None:
                raise self._refuse(f"part {part['name']} is missing")
            if info.size != part["bytes"]:
                raise self._refuse(f"part {part['name']} is {info.size:,} bytes, {MANIFEST} says "
                                   f"{part['bytes']:,}: it was modified or cut short")

    def __len__(self) -> int:
        return self.manifest["rows"]

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.path!r}, {plural(len(self), 'row')}, {self.dim}-d)"

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def model(self) -> dict:
        """The model that embedded the store: source, fingerprint, image_size, embedding_dim."""
        return self.manifest["model"]

    @property
    def embedder(self) -> dict:
        """The model's recipe, the keyword arguments of `siamese.Embedder.load`."""
        return self.manifest["embedder"]

    @property
    def parts(self) -> list[dict]:
        return self.manifest["parts"]

    @property
    def version(self) -> int:
        """The store's format version (1 or 2; see `FORMAT_VERSION`)."""
        return self.manifest["version"]

    def rows(self) -> pa.Table:
        """Every row's metadata (row, item, filename, labels, sha256, stamp: `METADATA`; no stamp in version 1) in
        row order, without the embeddings (only those columns are read)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema(self.dim, self.version)
        columns = [name for name in METADATA if name in schema.names]
        tables = []
        for part in self.parts:
            try:
                tables.append(pq.read_table(f"{self._root}/{part['name']}", columns=columns,
                                            filesystem=self.filesystem))
            except (pa.ArrowException, OSError) as e:
                self._check_part(part)  # a modified part is refused as such
                raise self._refuse(f"part {part['name']} is not a Parquet file ({e})") from None
        return pa.concat_tables(tables) if tables else schema.empty_table().drop_columns(["embedding"])

    def verify(self) -> None:
        """Check every part's SHA-256 against the manifest, a part at a time (what `batches` checks as it reads)."""
        for part in self.parts:
            self._check_part(part)

    def _check_part(self, part: dict) -> None:
        digest = hashlib.sha256()
        with self.filesystem.open_input_stream(f"{self._root}/{part['name']}") as f:
            for block in iter(lambda f=f: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != part["sha256"]:
            raise self._refuse(f"part {part['name']} was modified after the store was written (SHA-256 mismatch)")

    def batches(self, n: int = PART_ROWS) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """`(metadata, embeddings)` blocks of at most `n` rows (default `PART_ROWS`) in row order: the columns of
        `rows` and float32 `(rows, dim)`. One part is read at a time and checked (`read_part`) before any of it
        is used."""
        if n < 1:
            raise SiameseError(f"Expected `n` >= 1. Received: {n}")
        start = 0
        for part in self.parts:
            yield from read_part(self.path, part, self.dim, self.version, start, n,
                                 location=(self.filesystem, self._root))
            start += part["rows"]


def _refusal(path: str, problem: str) -> SiameseError:
    return SiameseError(f"{path}: {problem}. Fix: embed the catalog again into it with `replace=True`, or into a new "
                        "folder.")


def read_part(path: str, part: dict, dim: int, version: int, start: int, n: int = PART_ROWS, metadata: bool = True,
              location: tuple[pa.fs.FileSystem, str] | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """`(metadata, embeddings)` blocks of at most `n` rows of `part` (a manifest entry: name, rows, bytes, sha256)
    of the store at `path` (of format `version`, `dim`-d), whose first row is `start`; the metadata is the columns
    of `rows`, or only "row" without `metadata`. `location`: the store's (filesystem, folder in it), if opened.
    The whole part is checked against the entry (size, SHA-256, schema, row numbers) before any of it is used;
    refused with the part's name and the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, root = location or _location(path)[:2]
    name = part["name"]
    with filesystem.open_input_stream(f"{root}/{name}") as f:
        data = f.read()
    if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise _refusal(path, f"part {name} was modified after the store was written (SHA-256 mismatch)")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise _refusal(path, f"part {name} is not a Parquet file ({e})") from None
    expected = _schema(dim, version)
    if not parquet.schema_arrow.equals(expected) or parquet.metadata.num_rows != part["rows"]:
        raise _refusal(path, f"part {name} holds {parquet.metadata.num_rows:,} rows of {parquet.schema_arrow}, "
                             f"expected {part['rows']:,} rows of {expected}")
    for batch in parquet.iter_batches(batch_size=n, columns=None if metadata else ["row", "embedding"]):
        table = pa.Table.from_batches([batch])
        embedding = table.column("embedding").combine_chunks()
        if embedding.null_count:
            raise _refusal(path, f"part {name} holds rows without an embedding")
        vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(start, start + len(rows))):
            raise _refusal(path, f"part {name} holds rows {rows[0]:,} to {rows[-1]:,} where {start:,} to "
                                 f"{start + len(rows) - 1:,} belong")
        start += len(rows)
        yield table.drop_columns(["embedding"]), vectors


class StoreWriter:
    """Writes the parts of a new version of the store at `path` (`part_rows` rows each, default `PART_ROWS`), then
    its manifest (`commit`). Hold `claim_store(path)`. Nothing the old manifest names is touched until `commit`."""

    def __init__(self, path: str | os.PathLike, dim: int, part_rows: int = PART_ROWS):
        if part_rows < 1:
            raise SiameseError(f"Expected `part_rows` >= 1. Received: {part_rows}")
        self.path = os.fspath(path)
        self.filesystem, self._root, self.local = _location(path)
        self.dim, self.part_rows = dim, part_rows
        self.parts: list[dict] = []
        self.rows = 0
        self.filesystem.create_dir(self._root, recursive=True)

    def write(self, items: Sequence[str], filenames: Sequence[str], labels: Sequence[Sequence[str]],
              sha256: Sequence[str], embeddings: np.ndarray,
              stamps: Sequence[Sequence[int] | None] | None = None) -> None:
        """Append rows (numbered on from the rows written so far) as parts of at most `part_rows` rows; `stamps`
        (default: none known) are the files' `siamese.images.file_stamp` when they were hashed."""
        stamps = [None] * len(filenames) if stamps is None else stamps
        for lo in range(0, len(filenames), self.part_rows):
            hi = min(lo + self.part_rows, len(filenames))
            self._part(items[lo:hi], filenames[lo:hi], labels[lo:hi], sha256[lo:hi], embeddings[lo:hi],
                       stamps[lo:hi])

    def _part(self, items, filenames, labels, sha256, embeddings: np.ndarray, stamps) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        vectors = np.ascontiguousarray(embeddings, np.float32)
        if vectors.shape != (len(filenames), self.dim):
            raise SiameseError(f"Expected embeddings of shape {(len(filenames), self.dim)}. Received: {vectors.shape}")
        columns = [pa.array(np.arange(self.rows, self.rows + len(filenames)), pa.int64()),
                   pa.array(list(items), pa.string()), pa.array(list(filenames), pa.string()),
                   pa.array([list(x) for x in labels], pa.list_(pa.string())), pa.array(list(sha256), pa.string()),
                   pa.array([None if x is None else list(x) for x in stamps], pa.list_(pa.int64(), 3)),
                   pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_arrays(columns, schema=_schema(self.dim)), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        name = f"part-{digest[:16]}.parquet"
        if self.local is not None:
            atomic.write_bytes(self.local / name, data)
        else:  # an object store publishes an object whole when it is closed
            with self.filesystem.open_output_stream(f"{self._root}/{name}") as f:
                f.write(data)
        self.parts.append({"name": name, "rows": len(filenames), "bytes": len(data), "sha256": digest})
        self.rows += len(filenames)

    def commit(self, manifest: dict) -> None:
        """Write the manifest (`manifest` plus format, version, dim, rows, parts, created), the commit point, then
        remove the parts it does not name."""
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **manifest, "dim": self.dim, "rows": self.rows,
                    "parts": self.parts, "created": utc_now(), "siamese": __version__}
        data = (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        if self.local is not None:
            atomic.write_bytes(self.local / MANIFEST, data)
        else:
            with self.filesystem.open_output_stream(f"{self._root}/{MANIFEST}") as f:
                f.write(data)
        self._remove_unnamed()

    def _remove_unnamed(self) -> None:
        from pyarrow import fs

        named = {p["name"] for p in self.parts}
        for info in self.filesystem.get_file_info(fs.FileSelector(self._root)):
            if info.type == fs.FileType.File and _OURS.fullmatch(info.base_name) and info.base_name not in named:
                self.filesystem.delete_file(info.path)


def index_stores(stores: Sequence[str | os.PathLike], engine: str | Engine = "balltree", runner: str = "local",
                 ray_address: str | None = None) -> Index:
    """One `Index` (`engine`: an `Engine` or a registered name, default balltree) of the rows of `stores` in the
    order given, with no model and no images: parts are read one at a time, their embeddings and rows written to
    temporary files in the first store's folder and memory-mapped back, so building holds the engine and the pages
    in use, never a Python object per row. The index records the stores' model
    and recipe, so its queries are embedded as a catalog's index's are. Stores of different models are refused.
    `runner` "ray" (faiss only; default "local") adds the rows on Ray, at `ray_address` (default $RAY_ADDRESS, else
    a local Ray): see `siamese.search.faiss_ray`."""
    from siamese.search import Index, make_engine
    from siamese.search.faiss_ray import with_runner

    if not stores:
        raise SiameseError("Expected at least one embedding store. Received: none. Fix: pass the stores' folders.")
    opened = [EmbeddingStore.open(s) for s in stores]
    first = opened[0]
    for store in opened[1:]:
        if (store.model.get("fingerprint"), store.dim) != (first.model.get("fingerprint"), first.dim):
            raise SiameseError(
                f"Expected stores embedded by one model. Received: {store.path} by {store.model.get('source')} "
                f"({store.dim}-d, fingerprint {str(store.model.get('fingerprint'))[:12]}), {first.path} by "
                f"{first.model.get('source')} ({first.dim}-d, fingerprint {str(first.model.get('fingerprint'))[:12]})"
                f". Fix: embed {store.path} again with the model of the others (`replace=True`)."
            )
    total = sum(len(s) for s in opened)
    if total == 0:
        raise SiameseError(f"Expected stores with rows. Received: {', '.join(s.path for s in opened)}, empty. Fix: "
                           "embed a catalog into them first.")
    engine = with_runner(engine, runner, opened, ray_address)
    make_engine(engine).check_fits(total, first.dim)  # before any part is read
    import pyarrow as pa

    from siamese.search.rows import Rows

    # the embeddings and rows go to unnamed files (nothing is left behind, even by a kill) on the store's disk,
    # memory-mapped back: building holds neither, only the pages in use
    vectors_file = tempfile.TemporaryFile(dir=first.local)  # noqa: SIM115 (the index's arrays keep them open)
    rows_file = tempfile.TemporaryFile(dir=first.local)  # noqa: SIM115
    columns = Rows.from_lists([], [], []).table.schema
    with pa.ipc.new_file(rows_file, columns) as writer:
        for store in opened:
            for meta, vectors in store.batches():  # a record batch a part: none held after it is written
                vectors_file.write(np.ascontiguousarray(vectors, np.float32).data)
                writer.write_table(meta.select(columns.names).cast(columns))
    vectors_file.flush()
    rows_file.flush()
    embeddings = np.memmap(vectors_file, np.float32, "r", shape=(total, first.dim))
    digest = hashlib.sha256(json.dumps([s.manifest["source"].get("sha256") for s in opened]).encode())
    source = {**first.manifest["source"], "stores": [str(s.local or s.path) for s in opened],
              "sha256": digest.hexdigest() if len(opened) > 1 else first.manifest["source"].get("sha256")}
    return Index(embeddings, rows=Rows.open(rows_file), engine=engine, model=first.model, embedder=first.embedder,
                 source=source)
