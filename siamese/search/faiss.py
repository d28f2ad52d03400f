"""FAISS on inner products of unit vectors: exact `IndexFlatIP` below FAISS_IVF_MIN_ROWS rows, approximate
`IndexIVFFlat` above; written to and read back from its own file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siamese.errors import SiameseError
from siamese.search.engine import Engine, Knob, Setting, check_at_least, check_target_recall, register_engine
from siamese.search.kernel import by_block, squared_norms
from siamese.search.tuning import SEED, TARGET_RECALL, rows_except
from siamese.util import usable_cpus

FAISS_IVF_MIN_ROWS = 100_000
"""A faiss index of fewer rows is exact (`IndexFlatIP`); of more, `IndexIVFFlat` with 4 sqrt(rows) lists."""


@register_engine("faiss")
class Faiss(Engine):
    """A FAISS index: exact `IndexFlatIP` (`nlist` 0), or `IndexIVFFlat` of `nlist` lists (default: 0 below
    100,000 rows, 4 sqrt(rows) above) probing `nprobe` of them per query (default: the smallest power of two
    reaching `target_recall`, default 0.99)."""

    summary = "exact IndexFlatIP below 100,000 images, approximate IVF above"

    settings = (
        Setting("nlist", int, None, "faiss: inverted lists of the IVF index; 0 keeps it exact", metavar="N",
                default_text="default: 0 below 100,000 images, 4 sqrt(images) above"),
        TARGET_RECALL,
    )
    suffix = ".faiss"
    knob = Knob("nprobe", f"a faiss index of at least {FAISS_IVF_MIN_ROWS:,} rows (IVF; or built with --nlist)",
                "faiss IVF: lists searched per query, up to nlist; more: better recall, slower (default: the "
                "index's, chosen at build time for its --target-recall)")

    def __init__(self, nlist: int | None = None, nprobe: int | None = None, target_recall: float = 0.99):
        super().__init__()
        if nlist is not None:
            check_at_least("nlist", nlist, 0)
        check_target_recall(target_recall)
        self.nlist, self.knob_default, self.target_recall = nlist, nprobe, target_recall

    @property
    def knob_range(self) -> tuple[int, int] | None:
        return (1, self.params["nlist"]) if self.params.get("nlist") else None

    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        """Exact `IndexFlatIP` of every row (`nlist` 0), or `IndexIVFFlat` trained on every row (at most 256 per
        list, FAISS's default sample) holding every row but `held` (`add` them after measuring recall)."""
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        rows, dim = embeddings.shape
        nlist = self.nlist
        if nlist is None:
            nlist = int(4 * rows**0.5) if rows >= FAISS_IVF_MIN_ROWS else 0
        if nlist > rows:
            raise SiameseError(f"Expected 0 <= `nlist` <= {rows} (the rows to index; 0 is exact). Received: {nlist}")
        self.params = {"library": f"faiss {faiss.__version__}", "metric": "inner_product", "nlist": nlist}
        if not nlist:
            self.index = faiss.IndexFlatIP(dim)
            self.index.add(embeddings)
            self.params["type"] = "IndexFlatIP"
            return
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed, self.index.cp.spherical = SEED, True
        self.index.train(embeddings)
        self.params.update(type="IndexIVFFlat", spherical=True, seed=SEED, train_rows=min(rows, 256 * nlist))
        self.add(embeddings, rows_except(rows, held))

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add `rows` (sorted) of `embeddings`, a block at a time."""
        for low, high, vectors in by_block(embeddings, rows):
            self.index.add_with_ids(vectors, rows[low:high])

    @classmethod
    def read(cls, path: Path | None, embeddings: np.ndarray, params: dict) -> Faiss:
        import faiss

        index = faiss.read_index(str(path))
        kind = type(faiss.downcast_index(index)).__name__
        nlist = faiss.extract_index_ivf(index).nlist if kind == "IndexIVFFlat" else 0
        if (index.ntotal, index.d, kind, nlist, index.metric_type) != (
            *embeddings.shape, params.get("type"), params.get("nlist"), faiss.METRIC_INNER_PRODUCT
        ):
            raise ValueError(f"it holds {index.ntotal} x {index.d} rows in an {kind} (nlist {nlist}), not the "
                             f"{embeddings.shape[0]} x {embeddings.shape[1]} rows in an {params.get('type')} "
                             f"(nlist {params.get('nlist')}) that index.json records")
        engine = cls()  # nlist stays unset: a rebuild of other rows (a merge) chooses its own
        engine.index, engine.params = index, params
        return engine

    def write(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        params = faiss.SearchParametersIVF(nprobe=knob) if knob else None
        scores, indices = self.index.search(np.ascontiguousarray(queries), k, params=params)
        # rows are unit vectors: |q - g|^2 = |q|^2 + 1 - 2 q.g; a missing neighbour (index -1) stays -1
        squared = squared_norms(queries)[:, None] + 1 - 2 * scores.astype(np.float64)
        return np.sqrt(np.maximum(squared, 0)).astype(np.float32), indices.astype(np.int64)

    @property
    def description(self) -> str:
        p = self.params
        if p["nlist"]:
            return f"faiss {p['type']} (nlist {p['nlist']}, nprobe {p.get('nprobe')})"
        return f"faiss {p['type']} (exact)"
