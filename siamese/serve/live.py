"""The index a server answers from, and its swap for a new one without downtime.

`Live.current` is a `Served`: an index, the embedder that built it and the batcher that runs it. A request takes
`current` once and uses it to the end, so a swap never changes an answer half-way. `reload` loads the folder again
beside the old one and swaps only when the new index loads and its model checks out; otherwise the old one keeps
serving.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from siamese.embed import Embedder
from siamese.search import Index
from siamese.serve.batcher import Batcher

log = logging.getLogger("siamese.serve")


def stamp(directory: Path) -> tuple[int, int] | None:
    """What changes when `directory` is re-indexed: its index.json's inode and modification time."""
    try:
        st = os.stat(directory / "index.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass
class Served:
    """One loaded index, its embedder and batcher, and what the API reports of them."""

    index: Index
    embedder: Embedder
    batcher: Batcher
    stamp: tuple[int, int] | None
    labels: frozenset[str] = frozenset()  # every label of the index's images
    image_dir: Path | None = None

    def __post_init__(self) -> None:
        # vectorised over the Arrow rows: no Python object per indexed row (an item's rows: `index.rows.of_item`)
        self.labels = frozenset(self.index.rows.all_labels())
        folder = self.index.source.get("image_dir")
        self.image_dir = Path(folder).resolve() if folder else None

    def info(self) -> dict:
        labels = sorted(self.labels)
        return {"engine": self.index.engine.description, "rows": len(self.index), "items": self.index.rows.item_count,
                "dim": self.index.dim, "model": {k: self.index.model.get(k) for k in ("source", "fingerprint")},
                "recall_at_10": self.index.recall_at_10, "image_size": self.batcher.image_size, "labels": labels}


class Live:
    """The served index of `directory`, reloaded by `reload` (on SIGHUP, or when `changed`)."""

    def __init__(self, directory: str | os.PathLike, keras_model: str | os.PathLike | None = None,
                 max_batch: int = 32, wait_ms: float = 2.0):
        self.directory = Path(directory)
        self.keras_model = keras_model
        self.max_batch, self.wait_ms = max_batch, wait_ms
        self._lock = threading.Lock()
        self.current = self._load(None)

    def _load(self, old: Served | None) -> Served:
        before = stamp(self.directory)
        index = Index.load(self.directory)
        if old is not None and old.embedder.info.fingerprint == index.model.get("fingerprint"):
            embedder, batcher = old.embedder, old.batcher  # same model: no reload, one batcher
        else:
            embedder = Embedder.of_index(index, self.keras_model)
            batcher = Batcher(embedder.model, self.max_batch, self.wait_ms)
        return Served(index, embedder, batcher, before)

    def changed(self) -> bool:
        """Whether index.json changed since the served index was loaded."""
        now = stamp(self.directory)
        return now is not None and now != self.current.stamp

    def reload(self) -> bool:
        """Load the folder again and swap it in; on failure log why and keep serving the old index."""
        with self._lock:
            old = self.current
            try:
                new = self._load(old)
            except Exception as e:  # any failure keeps the old index serving
                log.warning("reload of %s refused, still serving the old index: %s", self.directory, e)
                old.stamp = stamp(self.directory)  # do not retry the same broken folder every second
                return False
            self.current = new
            log.info("reloaded %s: %d rows (was %d)", self.directory, len(new.index), len(old.index))
            return True
