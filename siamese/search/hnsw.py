"""hnswlib's graph (approximate): linked once at build time, written to and read back from its own file."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np

from siamese.search.engine import Engine, Knob, Setting, check_at_least, check_target_recall, register_engine
from siamese.search.kernel import by_block, take
from siamese.search.tuning import SEED, TARGET_RECALL, rows_except
from siamese.util import usable_cpus


@register_engine("hnsw")
class Hnsw(Engine):
    """hnswlib's graph in L2 space (its distances are squared Euclidean) of `m` links per row (default 16), linked
    keeping `ef_construction` candidates (default 200); `ef`, the query-time beam width, defaults to the smallest
    power of two reaching `target_recall` (default 0.99)."""

    summary = "hnswlib graph, approximate, much faster on large catalogs"

    settings = (
        Setting("m", int, 16, "hnsw: links per image in the graph; more: better recall, more memory",
                flag="--hnsw-m", metavar="M"),
        Setting("ef_construction", int, 200, "hnsw: candidates kept while linking; more: a better graph, slower to "
                "build", metavar="N"),
        TARGET_RECALL,
    )
    suffix = ".hnsw"
    knob = Knob("ef", "an hnsw index", "hnsw: candidates kept while searching; more: better recall, slower "
                "(default: the index's, chosen at build time for its --target-recall)",
                tune_from=16)  # hnswlib searches with max(ef, k) anyway

    def __init__(self, m: int = 16, ef_construction: int = 200, ef: int | None = None, target_recall: float = 0.99):
        super().__init__()
        check_at_least("m", m)
        check_at_least("ef_construction", ef_construction)
        check_target_recall(target_recall)
        self.m, self.ef_construction, self.knob_default, self.target_recall = m, ef_construction, ef, target_recall

    @property
    def knob_range(self) -> tuple[int, int]:
        return (1, 1 << 31)

    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        """The graph of every row but `held` (`add` them after measuring recall)."""
        import hnswlib

        self.graph = hnswlib.Index(space="l2", dim=embeddings.shape[1])
        self.graph.init_index(max_elements=len(embeddings), M=self.m, ef_construction=self.ef_construction,
                              random_seed=SEED)
        self.params = {"library": f"hnswlib {version('hnswlib')}", "space": "l2", "hnsw_m": self.m,
                       "ef_construction": self.ef_construction, "seed": SEED}
        self.add(embeddings, rows_except(len(embeddings), held))

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add `rows` (sorted) of `embeddings`, a block at a time."""
        for low, high, vectors in by_block(embeddings, rows):
            self.graph.add_items(vectors, rows[low:high], num_threads=usable_cpus())

    @classmethod
    def read(cls, path: Path | None, embeddings: np.ndarray, params: dict) -> Hnsw:
        import hnswlib

        graph = hnswlib.Index(space="l2", dim=embeddings.shape[1])
        graph.load_index(str(path), max_elements=0)
        rows, dim = embeddings.shape
        if (graph.element_count, graph.M) != (rows, params["hnsw_m"]):
            raise ValueError(f"it holds {graph.element_count} rows linked with M {graph.M}, not the {rows} rows "
                             f"linked with M {params['hnsw_m']} that index.json records")
        # a sample of rows by number (hnswlib raises on a missing one): a graph of other vectors or of another
        # dimension differs; the file's SHA-256 was checked, so this is not a defence against tampering
        sample = np.sort(np.random.default_rng(SEED).choice(rows, min(16, rows), replace=False))
        if not np.array_equal(graph.get_items(sample), take(embeddings, sample)):
            raise ValueError(f"its rows are not the {rows} x {dim} embeddings")
        engine = cls(params["hnsw_m"], params["ef_construction"])
        engine.graph, engine.params = graph, params
        return engine

    def write(self, path: Path) -> None:
        self.graph.save_index(str(path))

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        self.graph.set_ef(knob)
        try:
            labels, squared = self.graph.knn_query(queries, k=k, num_threads=usable_cpus())
        except RuntimeError:  # fewer than k rows reachable: the caller searches exactly instead
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return np.sqrt(np.maximum(squared, 0)), labels.astype(np.int64)

    @property
    def description(self) -> str:
        p = self.params
        return f"hnsw (M {p['hnsw_m']}, ef_construction {p['ef_construction']}, ef {p.get('ef')})"
