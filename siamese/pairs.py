"""Balanced, reproducible pairs of images for contrastive training.

Label convention, used everywhere in siamese: **1 = same item** (a positive pair), **0 = different items**
(a negative pair). Positive pairs are two different images of one item; negative pairs are images of two
items that share no label. Items sharing any label are never a negative pair.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import sparse

from siamese.catalog import Catalog
from siamese.errors import SiameseError

_REJECTION_ROUNDS = 32


class Pairs(NamedTuple):
    """Image indices into `Catalog.filenames` and the pair label (float32, 1 = same item)."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray


class PairSampler:
    """Draw pairs of a catalog's images as a pure function of `(seed, epoch)`.

    Each call of `pairs(epoch, n)` returns `n // 2` positive and `n - n // 2` negative pairs in shuffled
    order. Items are drawn uniformly (every item weighs the same, however many images it has), then images
    uniformly within the item. A resumed run asking for the same epoch gets the same pairs.
    """

    def __init__(self, catalog: Catalog, seed: int = 0):
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise SiameseError(f"Expected --seed to be a non-negative integer. Received: {seed!r}")
        self.catalog = catalog
        self.seed = int(seed)
        counts = np.array([len(item.filenames) for item in catalog.items], dtype=np.int64)
        self._counts = counts
        self._offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._positive_items = np.flatnonzero(counts >= 2)
        if len(self._positive_items) == 0:
            raise SiameseError(
                f"No positive pairs: none of the {len(counts)} items has two or more images. "
                "Fix: add at least a second image to the items of the catalog."
            )
        label_index = {label: n for n, label in enumerate(catalog.labels)}
        rows = np.repeat(np.arange(len(counts)), [len(item.labels) for item in catalog.items])
        cols = [label_index[label] for item in catalog.items for label in item.labels]
        self._labels = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.int32), (rows, cols)), shape=(len(counts), len(label_index))
        )
        self._negative_items = np.flatnonzero(self._has_negative_partner())
        if len(self._negative_items) == 0:
            reason = (
                "the catalog has a single item" if len(counts) == 1 else "every two items share a label"
            )
            raise SiameseError(
                f"No negative pairs: {reason}. Negative pairs need two items with no label in common. "
                "Fix: add items, or remove labels that every item carries."
            )

    def _related(self, item: int) -> np.ndarray:
        """Indices of the items that `item` may not be paired negatively with (itself included)."""
        labels = self._labels.indices[self._labels.indptr[item] : self._labels.indptr[item + 1]]
        if len(labels) == 0:
            return np.array([item])
        return np.union1d(sparse.csc_matrix(self._labels[:, labels]).nonzero()[0], [item])

    def _has_negative_partner(self) -> np.ndarray:
        n = len(self._counts)
        result = np.zeros(n, dtype=bool)
        # Items with the same label set have the same partners: compute once per distinct set.
        by_set: dict[tuple[str, ...], list[int]] = {}
        for i, item in enumerate(self.catalog.items):
            by_set.setdefault(item.labels, []).append(i)
        for members in by_set.values():
            result[members] = len(self._related(members[0])) < n
        return result

    def _share_label(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self._labels.shape[1] == 0:
            return np.zeros(len(a), dtype=bool)
        return np.asarray(self._labels[a].multiply(self._labels[b]).sum(axis=1)).ravel() > 0

    def _images(self, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
        return self._offsets[items] + rng.integers(self._counts[items])

    def pairs(self, epoch: int, n: int) -> Pairs:
        """The `n` pairs of `epoch`: half positive, half negative, shuffled; same arguments, same pairs."""
        if n < 2:
            raise SiameseError(f"Expected at least 2 pairs per epoch. Received: {n}")
        rng = np.random.default_rng([self.seed, int(epoch)])
        n_pos, n_neg = n // 2, n - n // 2

        items = rng.choice(self._positive_items, n_pos)
        first = rng.integers(self._counts[items])
        second = rng.integers(self._counts[items] - 1)
        second += second >= first  # a different image of the same item
        pos_a, pos_b = self._offsets[items] + first, self._offsets[items] + second

        neg_items_a = rng.choice(self._negative_items, n_neg)
        neg_items_b = rng.integers(len(self._counts), size=n_neg)
        for _ in range(_REJECTION_ROUNDS):
            bad = np.flatnonzero(
                (neg_items_a == neg_items_b) | self._share_label(neg_items_a, neg_items_b)
            )
            if len(bad) == 0:
                break
            neg_items_b[bad] = rng.integers(len(self._counts), size=len(bad))
        else:  # rare partners: draw them from the explicit list of allowed items
            for i in bad:
                allowed = np.setdiff1d(np.arange(len(self._counts)), self._related(neg_items_a[i]))
                neg_items_b[i] = rng.choice(allowed)
        neg_a, neg_b = self._images(rng, neg_items_a), self._images(rng, neg_items_b)

        order = rng.permutation(n)
        same = np.concatenate([np.ones(n_pos, np.float32), np.zeros(n_neg, np.float32)])
        return Pairs(
            np.concatenate([pos_a, neg_a])[order].astype(np.int64),
            np.concatenate([pos_b, neg_b])[order].astype(np.int64),
            same[order],
        )
