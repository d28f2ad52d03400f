"""Embedding a catalog into an embedding store (`embed_to_store`), again and again as the catalog changes.

A run embeds only the images whose file SHA-256 the store (of the same model) does not hold, copies the others'
embeddings from it, drops the rows of images no longer in the catalog, and writes the new version of the store
(see `siamese.embedding_store`), all under the store's lock. A file is hashed again only when its stamp (size,
mtime in ns, inode: `siamese.images.file_stamp`) differs from the one the store recorded when it hashed it, as git
and make tell a changed file: an edit that kept all three (a rewrite of the same size, its mtime set back by hand,
in place) goes unseen; `replace=True` hashes and embeds everything. Two runners embed: "local" in this process with the
decode workers of `siamese.embed.embed_catalog`, "ray" on Ray Data (`siamese.ray_runner`); they write the same
store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese.catalog import Catalog
from siamese.embed import Embedder, check_finite, embed_catalog
from siamese.embedding_store import PART_ROWS, EmbeddingStore, StoreWriter, claim_store, local_folder, store_exists
from siamese.errors import SiameseError
from siamese.images import ImageDecodeError, OnBadImage, check_images, file_stamp, open_file
from siamese.util import parallel_map, plural

if TYPE_CHECKING:
    import pyarrow as pa

RUNNERS = ("local", "ray")
Sink = Callable[[np.ndarray, np.ndarray], None]
"""Where a runner puts what it embedded: `sink(catalog image indices, float32 embeddings)`."""


@dataclass(frozen=True)
class EmbedResult:
    """What `embed_to_store` did: `new` images embedded, `kept` rows whose embeddings came from the store, `dropped`
    rows of images no longer in the catalog (or changed), `skipped` bad images left out; `rows` the store holds;
    `hashed` the image files read to hash them (the others' stamps matched the store's)."""

    store: str
    new: int
    kept: int
    dropped: int
    skipped: int
    rows: int
    runner: str
    hashed: int = 0

    @property
    def embedded(self) -> int:
        """Images this run embedded (`new`)."""
        return self.new

    def summary(self) -> str:
        """The one line `embed` prints."""
        skipped = f", skipped {plural(self.skipped, 'bad image')}" if self.skipped else ""
        return (f"Embedded {plural(self.new, 'new image')}, kept {self.kept:,}, dropped {self.dropped:,}{skipped} "
                f"({self.runner}): {self.store} holds {plural(self.rows, 'row')}")


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of the bytes of the regular file `path`, or None when it cannot be read (decoding then says why)."""
    digest = hashlib.sha256()
    try:
        with open_file(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, SiameseError):
        return None
    return digest.hexdigest()


def embed_to_store(
    embedder: Embedder, catalog: Catalog, store: str | os.PathLike, runner: str = "local", *, batch_size: int = 64,
    actors: int = 2, ray_address: str | None = None, replace: bool = False, on_bad_image: OnBadImage = "fail",
    labeled_data: str | os.PathLike | None = None, part_rows: int = PART_ROWS, workers: int | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed `catalog` with `embedder` into the embedding store `store` (a folder or a URI pyarrow opens) and
    return what was done (`EmbedResult`).

    `runner` "local" (default) embeds in this process, decoded by `workers` processes (default every usable CPU);
    "ray" on Ray Data, joining the cluster at `ray_address` or $RAY_ADDRESS, else starting a local Ray (shut down
    after), with `actors` (default 2) model actors, a GPU each where the cluster has GPUs. Batches hold
    `batch_size` images (default 64), parts `part_rows` rows (default 8192). An existing store of the same model
    is updated: only images whose SHA-256 it lacks are embedded; one of another model, or that does not read back
    whole, is refused; `replace` embeds every image again whatever the store holds.
    Bad images fail the run listing them, or with `on_bad_image="skip"` are left out with a warning naming them.
    `labeled_data` (the catalog's file) is recorded in the manifest.
    """
    if runner not in RUNNERS:
        raise SiameseError(f"Expected `runner` to be one of {', '.join(RUNNERS)}. Received: {runner!r}")
    if on_bad_image not in ("fail", "skip"):
        raise SiameseError(f"Expected `on_bad_image` to be 'fail' or 'skip'. Received: {on_bad_image!r}")
    for name, value in (("batch_size", batch_size), ("actors", actors), ("part_rows", part_rows)):
        if not isinstance(value, int) or value < 1:
            raise SiameseError(f"Expected `{name}` >= 1. Received: {value!r}")
    if not catalog.filenames:
        raise SiameseError("Expected a catalog with images. Received: none. Fix: pass a catalog that lists images.")
    with claim_store(store):
        old = _previous(store, embedder, replace)
        old_rows = old.rows() if old is not None else None  # read once: every part's metadata columns
        stamps, hashes, hashed = _hash_files(catalog, old_rows, workers, progress)
        known: dict[str, int] = {}
        if old_rows is not None:
            known = {sha: row for row, sha in enumerate(old_rows.column("sha256").to_pylist())}
        todo = np.array([i for i, sha in enumerate(hashes) if sha is None or sha not in known], np.int64)
        if old_rows is not None and not len(todo) and _unchanged(old_rows, catalog, hashes, stamps):
            old.verify()  # what an update would have found reading it
            return EmbedResult(os.fspath(store), 0, len(old), 0, 0, len(old), runner, hashed)
        with tempfile.TemporaryFile(dir=_scratch(store)) as scratch:
            vectors = np.memmap(scratch, np.float32, "w+", shape=(len(catalog.filenames), embedder.info.embedding_dim))
            if old is not None:
                _copy_kept(old, known, hashes, todo, vectors)
            bad = _run(embedder, catalog, todo, vectors, runner, batch_size=batch_size, actors=actors,
                       ray_address=ray_address, on_bad_image=on_bad_image, workers=workers, progress=progress)
            good = np.array([i for i, f in enumerate(catalog.filenames) if f not in bad], np.int64)
            if not len(good):
                raise SiameseError(f"Expected at least one image that decodes. Received: all "
                                   f"{plural(len(catalog.filenames), 'image')} of the catalog are bad. Fix: replace "
                                   "them, and run `validate` to list them.")
            kept_catalog = catalog.without_images(bad) if bad else catalog
            writer = StoreWriter(store, embedder.info.embedding_dim, part_rows)
            for lo in range(0, len(good), part_rows):
                rows = good[lo : lo + part_rows]
                writer.write([catalog.items[catalog.image_item[i]].id for i in rows],
                             [catalog.filenames[i] for i in rows],
                             [catalog.items[catalog.image_item[i]].labels for i in rows],
                             [hashes[i] for i in rows], vectors[rows], [stamps[i] for i in rows])
            new = len(todo) - len(bad)
            now = {(catalog.filenames[i], hashes[i]) for i in good}
            dropped = 0 if old is None else sum(
                (f, sha) not in now for f, sha in zip(*_columns(old_rows, "filename", "sha256"), strict=True))
            source = {"labeled_data": str(Path(labeled_data).resolve()) if labeled_data else None,
                      "image_dir": str(catalog.image_dir.resolve()), "sha256": kept_catalog.digest()}
            counts = {"new": new, "kept": len(good) - new, "dropped": dropped, "skipped": len(bad)}
            writer.commit({"model": embedder.info.to_dict(), "embedder": embedder.recipe, "source": source,
                           "image_size": embedder.info.image_size, "items": len(kept_catalog), "counts": counts,
                           "runner": runner})
    return EmbedResult(os.fspath(store), new, len(good) - new, dropped, len(bad), len(good), runner, hashed)


def _hash_files(catalog: Catalog, old: pa.Table | None, workers: int | None,
                progress: bool) -> tuple[list[list[int] | None], list[str | None], int]:
    """Each catalog image's stamp (None: not a readable regular file) and SHA-256 (None: unreadable), and how many
    files were read to hash them: an image whose stamp equals the one the old store's rows `old` recorded for its
    filename keeps the hash recorded with it (a store of version 1 recorded none)."""
    root = os.fspath(catalog.image_dir)
    paths = [os.path.join(root, f) for f in catalog.filenames]
    stamps: list[list[int] | None] = []
    for path in paths:
        try:
            stamps.append(file_stamp(path))
        except ImageDecodeError:
            stamps.append(None)
    hashes: list[str | None] = [None] * len(paths)
    same = np.zeros(len(paths), bool)
    if old is not None and "stamp" in old.column_names:
        import pyarrow as pa
        import pyarrow.compute as pc

        at = pc.index_in(pa.array(catalog.filenames, pa.string()), value_set=old.column("filename"))
        at = at.fill_null(-1).to_numpy()
        recorded = old.column("stamp").combine_chunks()
        known = np.asarray(recorded.is_valid())
        recorded = np.asarray(recorded.fill_null([0, 0, 0]).flatten(), np.int64).reshape(-1, 3)
        now = np.array([stamp or (-1, -1, -1) for stamp in stamps], np.int64).reshape(-1, 3)
        found = np.flatnonzero(at >= 0)
        same[found] = known[at[found]] & (recorded[at[found]] == now[found]).all(axis=1)
        shas = old.column("sha256").to_pylist()
        for i in np.flatnonzero(same):
            hashes[i] = shas[at[i]]
    todo = np.flatnonzero(~same).tolist()
    for i, sha in zip(todo, parallel_map(file_sha256, [paths[i] for i in todo], workers=workers, progress=progress,
                                         desc="hashing images"), strict=True):
        hashes[i] = sha
    return stamps, hashes, len(todo)


def _previous(store: str | os.PathLike, embedder: Embedder, replace: bool) -> EmbeddingStore | None:
    """The store at `store` to update, None to embed everything (none there, or `replace`); another model's, or one
    that cannot be read, is refused."""
    if replace or not store_exists(store):
        return None
    old = EmbeddingStore.open(store)
    want, have = embedder.info, old.model
    if (have.get("fingerprint"), have.get("embedding_dim")) != (want.fingerprint, want.embedding_dim):
        raise SiameseError(
            f"{store} was embedded by a different model ({have.get('source')}, {have.get('embedding_dim')}-d, "
            f"fingerprint {str(have.get('fingerprint'))[:12]}). Received: {want.source}, {want.embedding_dim}-d, "
            f"fingerprint {want.fingerprint[:12]}. Fix: embed with the model of the store, or pass `replace=True` "
            "to embed every image again with this one."
        )
    return old


def _scratch(store: str | os.PathLike) -> Path | None:
    """Where the run's temporary embeddings go: beside a local store (same disk), else the system's temp folder."""
    local = local_folder(store)
    return local.parent if local is not None else None


def _columns(rows: pa.Table, *names: str) -> list[list]:
    return [rows.column(name).to_pylist() for name in names]


def _unchanged(old: pa.Table, catalog: Catalog, hashes: list[str | None], stamps: list) -> bool:
    """Whether the old store's rows `old` are exactly `catalog`'s images (items, filenames, labels, hashes, stamps),
    in order."""
    if len(old) != len(catalog.filenames) or "stamp" not in old.column_names:
        return False
    items, filenames, labels, shas, recorded = _columns(old, "item", "filename", "labels", "sha256", "stamp")
    owners = [catalog.items[i] for i in catalog.image_item]
    return (items == [o.id for o in owners] and filenames == list(catalog.filenames) and shas == hashes
            and recorded == stamps and labels == [list(o.labels) for o in owners])


def _copy_kept(old: EmbeddingStore, known: dict[str, int], hashes: list[str | None], todo: np.ndarray,
               vectors: np.ndarray) -> None:
    """Copy the embeddings of the images the old store holds into `vectors` (rows by catalog image), in one pass
    over the store, a block at a time."""
    embed = np.zeros(len(hashes), bool)
    embed[todo] = True
    dest = np.flatnonzero(~embed)
    source = np.array([known[hashes[i]] for i in dest], np.int64)
    order = np.argsort(source, kind="stable")
    dest, source = dest[order], source[order]
    start = 0
    for _, block in old.batches():
        lo, hi = np.searchsorted(source, [start, start + len(block)])
        vectors[dest[lo:hi]] = block[source[lo:hi] - start]
        start += len(block)


def _run(embedder: Embedder, catalog: Catalog, todo: np.ndarray, vectors: np.ndarray, runner: str, *,
         batch_size: int, actors: int, ray_address: str | None, on_bad_image: OnBadImage, workers: int | None,
         progress: bool) -> set[str]:
    """Embed the catalog images `todo` into `vectors` with `runner`; return the filenames of the bad ones skipped."""
    if not len(todo):
        return set()

    def sink(indices: np.ndarray, embeddings: np.ndarray) -> None:
        check_finite(embeddings, embedder.info.source, [catalog.filenames[i] for i in indices])
        vectors[indices] = embeddings

    if runner == "ray":
        from siamese.ray_runner import embed_on_ray

        bad = embed_on_ray(embedder, catalog, todo, sink, batch_size=batch_size, actors=actors, address=ray_address,
                           on_bad_image=on_bad_image, progress=progress)
        return {b.filename for b in bad}
    wanted = set(todo.tolist())
    subset = catalog.without_images({f for i, f in enumerate(catalog.filenames) if i not in wanted})
    good = check_images(subset, on_bad_image, workers=workers, progress=progress)
    position = {f: i for i, f in enumerate(catalog.filenames)}
    if good.filenames:
        embeddings = embed_catalog(embedder.model, good, batch_size, workers=workers, progress=progress)
        sink(np.array([position[f] for f in good.filenames], np.int64), embeddings)
    return set(subset.filenames) - set(good.filenames)
