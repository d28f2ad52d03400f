"""scikit-learn's BallTree (the original toolkit's engine): exact, rebuilt from the embeddings on load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siamese.search.engine import Engine, Setting, check_at_least, register_engine


@register_engine("balltree", "ball_tree")
class BallTree(Engine):
    """scikit-learn's `BallTree` of `leaf_size` (default 40) rows per leaf."""

    summary = "scikit-learn, exact, the original's"

    settings = (Setting("leaf_size", int, 40, "balltree: leaf size"),)

    def __init__(self, leaf_size: int = 40):
        super().__init__()
        check_at_least("leaf_size", leaf_size)
        self.leaf_size = leaf_size
        self.params = {"leaf_size": leaf_size}

    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        from sklearn.neighbors import BallTree  # imported here: scikit-learn takes 100 MiB that other engines spare

        self.tree = BallTree(embeddings, leaf_size=self.leaf_size)

    @classmethod
    def read(cls, path: Path | None, embeddings: np.ndarray, params: dict) -> BallTree:
        leaf_size = params.get("leaf_size")
        if type(leaf_size) is not int or leaf_size < 1:
            raise ValueError(f"expected the balltree's leaf_size to be an integer >= 1, found {leaf_size!r}")
        engine = cls(leaf_size)
        engine.build(embeddings, np.empty(0, np.int64), np.empty(0, np.float32))
        return engine

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self.tree.query(queries, k=k)
        return distances.astype(np.float32), indices.astype(np.int64)
