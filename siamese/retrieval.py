"""Retrieval metrics on embeddings: how often the nearest image is of the same item, and a calibrated
"same item?" distance threshold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from siamese.catalog import Catalog
from siamese.errors import SiameseError
from siamese.pairs import PairSampler
from siamese.search.kernel import kneighbors, squared_norms
from siamese.util import plural


def nearest(queries: np.ndarray, gallery: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Index into `gallery` of each query's nearest neighbour by Euclidean distance, equal distances by lower
    index (exact: `siamese.search.kernel.kneighbors`).

    With `exclude_self`, `queries` is `gallery` and each row skips itself (leave-one-out).
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise SiameseError(f"Expected 2-D embeddings of one size. Received: {queries.shape} and {gallery.shape}")
    exclude = np.arange(len(queries)) if exclude_self else None
    return kneighbors(gallery, queries, 1, exclude=exclude)[1][:, 0]


def _other_rows(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's item code and how many other rows share its item; raises if every item has a single row."""
    _, codes, counts = np.unique(items, return_inverse=True, return_counts=True)
    others = counts[codes] - 1
    if not others.any():
        raise SiameseError(
            f"Expected an item with at least two rows for leave-one-out retrieval. Received: "
            f"{plural(len(items), 'row')}, each of its own item. Fix: evaluate on images where some items "
            "have two or more images."
        )
    return codes, others


def precision_at_1(embeddings: np.ndarray, items: np.ndarray, gallery: np.ndarray | None = None,
                   gallery_items: np.ndarray | None = None) -> float:
    """Fraction of queries whose nearest gallery image has the same item.

    Without a gallery, each embedding is a query against all the others (leave-one-out); queries whose
    item has no other image are left out, since no answer could be right.
    """
    items = np.asarray(items)
    if gallery is None:
        keep = _other_rows(items)[1] > 0
        found = nearest(embeddings, embeddings, exclude_self=True)
        return float(np.mean(items[found][keep] == items[keep]))
    found = nearest(embeddings, gallery)
    return float(np.mean(np.asarray(gallery_items)[found] == items))


def _rankings(embeddings: np.ndarray, queries: np.ndarray, depth: np.ndarray,
              chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each `chunk` of `queries`: its rows, and the indices of the `depth[rows].max()` nearest other rows
    of each, nearest first, equal distances by lower index (`siamese.search.kernel.kneighbors`)."""
    half_norms = (0.5 * squared_norms(embeddings)).astype(np.float32)
    for start in range(0, len(queries), chunk):
        rows = queries[start : start + chunk]
        yield rows, kneighbors(embeddings, embeddings[rows], depth[rows].max(), half_norms, exclude=rows)[1]


def retrieval_metrics(embeddings: np.ndarray, items: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = 256) -> dict[str, float]:
    """Leave-one-out retrieval: each row queries all the other rows by Euclidean distance (float32, like
    `nearest`; equal distances rank the lower row first).

    Returns a dict of `precision_at_1`, `r_precision`, `map_at_r` (as pytorch-metric-learning's AccuracyCalculator
    defines them, R being the number of other rows of the query's item, without its cap of 1023
    neighbours), `recall_at_{k}` for each k of `ks` (default 1, 5, 10: the fraction of queries with a row
    of their item among the k nearest; k past the number of other rows counts them all) and `queries`.
    Queries whose item has no other row are left out (still neighbours of the others); raises if none is left.
    `chunk` (default 256) queries are ranked at a time, using about chunk x max(depth, 8192) x 12 bytes.
    """
    embeddings = np.asarray(embeddings, np.float32)
    items = np.asarray(items)
    if embeddings.ndim != 2 or items.shape != embeddings.shape[:1]:
        raise SiameseError(
            f"Expected 2-D embeddings and one item per row. Received: embeddings {embeddings.shape} and "
            f"items {items.shape}"
        )
    if not np.isfinite(embeddings).all():
        raise SiameseError("Expected finite embeddings. Received: NaN or infinite values. Fix: check the model.")
    if len(ks) == 0 or any(not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise SiameseError(f"Expected `ks` to be positive integers. Received: {ks!r}")
    if chunk < 1:
        raise SiameseError(f"Expected `chunk` >= 1. Received: {chunk}")
    codes, others = _other_rows(items)
    depth = np.minimum(np.maximum(others, max(ks)), len(items) - 1)  # neighbours each query needs
    queries = np.flatnonzero(others)
    queries = queries[np.argsort(depth[queries], kind="stable")]  # chunks of alike depth rank fewer columns
    sums = dict.fromkeys(["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in ks)], 0.0)
    for rows, ranked in _rankings(embeddings, queries, depth, chunk):
        width = ranked.shape[1]
        same = codes[ranked] == codes[rows, None]
        first = np.where(same.any(axis=1), same.argmax(axis=1), width)  # rank of the first same-item row
        r = others[rows]
        within = same & (np.arange(width) < r[:, None])  # same-item rows among the first R
        found = np.cumsum(within, axis=1, dtype=np.int32)
        sums["r_precision"] += (found[:, -1] / r).sum()
        found *= within  # found(i) * rel(i), whose sum over i / i is R * AP@R
        sums["map_at_r"] += (np.einsum("ij,j->i", found, 1 / np.arange(1, width + 1)) / r).sum()
        sums["precision_at_1"] += (first == 0).sum()
        for k in ks:
            sums[f"recall_at_{k}"] += (first < k).sum()
    return {**{name: float(total / len(queries)) for name, total in sums.items()}, "queries": len(queries)}


def pair_distances(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Euclidean distance between rows `first[i]` and `second[i]` of `embeddings` (float32), e.g. of
    `PairSampler.pairs(epoch, n)`."""
    embeddings = np.asarray(embeddings, np.float32)
    first, second = np.asarray(first), np.asarray(second)
    if embeddings.ndim != 2 or first.ndim != 1 or first.shape != second.shape:
        raise SiameseError(
            f"Expected 2-D embeddings and two index arrays of one length. Received: embeddings "
            f"{embeddings.shape}, first {first.shape} and second {second.shape}"
        )
    for indices in (first, second):
        if not np.issubdtype(indices.dtype, np.integer):
            raise SiameseError(f"Expected integer indices. Received: {indices.dtype}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(embeddings)):
            raise SiameseError(
                f"Expected indices in [0, {len(embeddings)}). Received: {indices.min()} to {indices.max()}. "
                "Fix: pass the embeddings of the catalog the pairs were drawn from."
            )
    return np.linalg.norm(embeddings[first] - embeddings[second], axis=1)


def metric_title(name: str) -> str:
    """A metric's name for people: precision_at_1 -> "precision@1", map_at_r -> "MAP@R", recall_at_5 -> "recall@5"."""
    titles = {"precision_at_1": "precision@1", "r_precision": "R-precision", "map_at_r": "MAP@R"}
    return titles.get(name, name.replace("_at_", "@"))


@dataclass(frozen=True)
class Threshold:
    """A "same item?" rule, distance <= `distance`, and how it scores on the pairs it was calibrated on
    (`positives` same-item pairs, `negatives` different-item pairs)."""

    distance: float
    precision: float
    recall: float
    f1: float
    accuracy: float
    positives: int
    negatives: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"same item when distance <= {self.distance:.4f} (cosine >= {1 - self.distance**2 / 2:.4f}): "
                f"precision {self.precision:.4f}, recall {self.recall:.4f}, F1 {self.f1:.4f} on "
                f"{self.positives + self.negatives:,} pairs ({self.positives:,} same-item)")


def calibrate_threshold(distances: np.ndarray, same: np.ndarray) -> Threshold:
    """The threshold on pair distances (same item when distance <= threshold) with the highest F1.

    `same` is 1 (or True) for pairs of one item and 0 for pairs of two. The threshold is one of the
    distances, so pairs at an equal distance fall on the same side; among equal F1s the smallest wins.
    """
    distances = np.asarray(distances, np.float64)
    same = np.asarray(same)
    if distances.ndim != 1 or same.shape != distances.shape:
        raise SiameseError(
            f"Expected one distance and one label per pair. Received: distances {distances.shape} and "
            f"labels {same.shape}"
        )
    if not np.isfinite(distances).all() or not np.isin(same, (0, 1)).all():
        raise SiameseError(
            "Expected finite distances and labels of 0 or 1 (1 = same item). Received: "
            f"distances from {distances.min()} to {distances.max()} and labels {np.unique(same)[:5]}"
        )
    positives = int(np.count_nonzero(same))
    negatives = len(same) - positives
    if positives == 0 or negatives == 0:
        raise SiameseError(
            f"Expected same-item and different-item pairs to calibrate a threshold. Received: "
            f"{plural(positives, 'same-item pair')} and {plural(negatives, 'different-item pair')}. "
            "Fix: draw pairs with PairSampler, which balances the two."
        )
    order = np.argsort(distances)
    distances, same = distances[order], same[order] == 1
    ends = np.flatnonzero(np.append(distances[1:] != distances[:-1], True))  # last pair at each distance
    true_pos = np.cumsum(same)[ends]
    false_pos = ends + 1 - true_pos
    f1 = 2 * true_pos / (positives + true_pos + false_pos)
    best = int(np.argmax(f1))
    tp, fp = int(true_pos[best]), int(false_pos[best])
    return Threshold(
        distance=float(distances[ends[best]]),
        precision=tp / (tp + fp),
        recall=tp / positives,
        f1=float(f1[best]),
        accuracy=(tp + negatives - fp) / len(same),
        positives=positives,
        negatives=negatives,
    )


@dataclass(frozen=True)
class Evaluation:
    """How well embeddings find the right item: `metrics` of `retrieval_metrics`, the calibrated
    `threshold`, and the pair `distances` with their `same` labels it was calibrated on (for plots)."""

    metrics: dict[str, float]
    threshold: Threshold
    distances: np.ndarray
    same: np.ndarray

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "threshold": self.threshold.to_dict()}

    def figures(self) -> str:
        """The retrieval figures on one line, e.g. "precision@1 0.8886  R-precision 0.8352  MAP@R 0.7930 ..."."""
        shown = [(name, value) for name, value in self.metrics.items() if name != "queries"]
        return "  ".join(f"{metric_title(name)} {value:.4f}" for name, value in shown)

    def __str__(self) -> str:
        return (f"{self.figures()} ({self.metrics['queries']:,} query images, leave-one-out); "
                f"{self.threshold}")


def evaluate_embeddings(embeddings: np.ndarray, catalog: Catalog, ks: Sequence[int] = (1, 5, 10),
                        pairs: int = 4096, seed: int = 0) -> Evaluation:
    """Retrieval among `catalog`'s items (leave-one-out, `embeddings` in `catalog.filenames` order) and a
    "same item?" threshold calibrated on `pairs` (default 4,096) pairs drawn by `PairSampler` with `seed`."""
    metrics = retrieval_metrics(embeddings, catalog.image_item, ks)
    drawn = PairSampler(catalog, seed=seed).pairs(0, pairs)
    distances = pair_distances(embeddings, drawn.first, drawn.second)
    return Evaluation(metrics, calibrate_threshold(distances, drawn.same), distances, drawn.same)
