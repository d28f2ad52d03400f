"""Retrieval metrics on embeddings: how often the nearest image is of the same item."""

from __future__ import annotations

import numpy as np

from siamese.errors import SiameseError


def nearest(queries: np.ndarray, gallery: np.ndarray, exclude_self: bool = False, chunk: int = 2048) -> np.ndarray:
    """Index into `gallery` of each query's nearest neighbour by Euclidean distance (exact, BLAS products).

    With `exclude_self`, `queries` is `gallery` and each row skips itself (leave-one-out).
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise SiameseError(f"Expected 2-D embeddings of one size. Received: {queries.shape} and {gallery.shape}")
    half_norms = 0.5 * np.einsum("ij,ij->i", gallery, gallery)
    out = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        # argmin |q - g|^2 = argmax (q.g - |g|^2 / 2)
        scores = queries[start : start + chunk] @ gallery.T - half_norms
        if exclude_self:
            rows = np.arange(scores.shape[0])
            scores[rows, rows + start] = -np.inf
        out[start : start + chunk] = scores.argmax(axis=1)
    return out


def precision_at_1(embeddings: np.ndarray, items: np.ndarray, gallery: np.ndarray | None = None,
                   gallery_items: np.ndarray | None = None) -> float:
    """Fraction of queries whose nearest gallery image has the same item.

    Without a gallery, each embedding is a query against all the others (leave-one-out); queries whose
    item has no other image are left out, since no answer could be right.
    """
    items = np.asarray(items)
    if gallery is None:
        _, inverse, counts = np.unique(items, return_inverse=True, return_counts=True)
        keep = counts[inverse] > 1
        if keep.sum() == 0:
            raise SiameseError("precision@1 needs an item with at least two images.")
        found = nearest(embeddings, embeddings, exclude_self=True)
        return float(np.mean(items[found][keep] == items[keep]))
    found = nearest(embeddings, gallery)
    return float(np.mean(np.asarray(gallery_items)[found] == items))
