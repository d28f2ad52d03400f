"""Balanced, reproducible pairs of images for contrastive training.

Label convention, used everywhere in siamese: **1 = same item** (a positive pair), **0 = different items**
(a negative pair). Positive pairs are two different images of one item; negative pairs are images of two
items that share no label. Items sharing any label are never a negative pair.

Two samplers, one job each: `PairSampler` draws pairs and triplets (`batches='pairs'`); `PKSampler` draws P x K
batches, P items x K images each, every two images of which are a pair, and says which (`relations`: 1 same item,
0 negative, -1 no pair) (`batches='pk'`). Both draw an epoch from their own generator of `(seed, epoch)`.
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


class Triplets(NamedTuple):
    """Image indices: an anchor, a positive (same item) and a negative (an item sharing no label)."""

    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray


class ItemSampler:
    """What both samplers know of a catalog: each item's images, which items can give a positive pair (two or
    more images) and a negative one (an item sharing no label), refused when there is none of either; and the
    generator of an epoch, a pure function of `(seed, epoch)`, so a resumed run draws what it drew before."""

    def __init__(self, catalog: Catalog, seed: int = 0):
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise SiameseError(f"Expected `seed` to be a non-negative integer. Received: {seed!r}")
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
        self._image_item = catalog.image_item
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

    def generator(self, epoch: int) -> np.random.Generator:
        """The random generator of `epoch`: the same for the same seed and epoch."""
        return np.random.default_rng([self.seed, int(epoch)])


class PairSampler(ItemSampler):
    """Draw pairs (and triplets) of a catalog's images as a pure function of `(seed, epoch)`.

    Each call of `pairs(epoch, n)` returns `n // 2` positive and `n - n // 2` negative pairs in shuffled
    order; `triplets(epoch, n)` returns anchor/positive/negative triplets for the triplet loss. Items are
    drawn uniformly (every item weighs the same, however many images it has), then images uniformly
    within the item.
    """

    def _rng(self, epoch: int, n: int, what: str) -> np.random.Generator:
        if n < 2:
            raise SiameseError(f"Expected at least 2 {what} per epoch. Received: {n}")
        return self.generator(epoch)

    def _share_label(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self._labels.shape[1] == 0:
            return np.zeros(len(a), dtype=bool)
        return np.asarray(self._labels[a].multiply(self._labels[b]).sum(axis=1)).ravel() > 0

    def _images(self, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
        return self._offsets[items] + rng.integers(self._counts[items])

    def _positive_images(self, rng: np.random.Generator, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two different images of each of `items`."""
        first = rng.integers(self._counts[items])
        second = rng.integers(self._counts[items] - 1)
        second += second >= first
        return self._offsets[items] + first, self._offsets[items] + second

    def _negative_partners(self, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
        """For each of `items`, a random item sharing no label with it (and not itself)."""
        partners = rng.integers(len(self._counts), size=len(items))
        for _ in range(_REJECTION_ROUNDS):
            bad = np.flatnonzero((items == partners) | self._share_label(items, partners))
            if len(bad) == 0:
                return partners
            partners[bad] = rng.integers(len(self._counts), size=len(bad))
        for i in bad:  # rare partners: draw them from the explicit list of allowed items
            partners[i] = rng.choice(np.setdiff1d(np.arange(len(self._counts)), self._related(items[i])))
        return partners

    def pairs(self, epoch: int, n: int) -> Pairs:
        """The `n` pairs of `epoch`: half positive, half negative, shuffled; same arguments, same pairs."""
        rng = self._rng(epoch, n, "pairs")
        n_pos, n_neg = n // 2, n - n // 2
        pos_a, pos_b = self._positive_images(rng, rng.choice(self._positive_items, n_pos))
        neg_items = rng.choice(self._negative_items, n_neg)
        neg_a = self._images(rng, neg_items)
        neg_b = self._images(rng, self._negative_partners(rng, neg_items))
        order = rng.permutation(n)
        same = np.concatenate([np.ones(n_pos, np.float32), np.zeros(n_neg, np.float32)])
        return Pairs(
            np.concatenate([pos_a, neg_a])[order].astype(np.int64),
            np.concatenate([pos_b, neg_b])[order].astype(np.int64),
            same[order],
        )

    def triplets(self, epoch: int, n: int) -> Triplets:
        """The `n` triplets of `epoch`: an anchor image, another image of its item, and an image of an item
        sharing no label with it. Anchors are items with two or more images and a negative partner."""
        rng = self._rng(epoch, n, "triplets")
        anchors = np.intersect1d(self._positive_items, self._negative_items)
        if len(anchors) == 0:
            raise SiameseError(
                "No triplets: no item has both two images and another item sharing none of its labels. "
                "Fix: add images or items, or use `loss='contrastive'`."
            )
        items = rng.choice(anchors, n)
        anchor, positive = self._positive_images(rng, items)
        negative = self._images(rng, self._negative_partners(rng, items))
        return Triplets(anchor.astype(np.int64), positive.astype(np.int64), negative.astype(np.int64))



class PKSampler(ItemSampler):
    """Draw P x K batches of a catalog's images (`batches`) as a pure function of `(seed, epoch)`, and the
    relations among a batch's images (`relations`), for the losses over every pair of a batch."""

    def batches(self, epoch: int, n: int, batch_size: int, per_item: int) -> np.ndarray:
        """The `n` batches of `epoch`: `(n, batch_size)` image indices (int64).

        Each batch is P items x K images: items are drawn uniformly without replacement, `per_item` (K)
        different images of each (all of them when an item has fewer), until `batch_size` images are drawn
        (the last item may get fewer); an item's K images are next to each other. Items that can form a pair
        are drawn (two or more images, or a negative partner). With fewer such items than a batch needs, a
        new round of them is drawn, and an item drawn twice gets different images while it has enough.
        Same arguments, same batches.
        """
        if batch_size < 2:
            raise SiameseError(f"Expected `batch_size` >= 2 for batch-all training. Received: {batch_size}")
        if per_item < 2:
            raise SiameseError(f"Expected `images_per_item` >= 2. Received: {per_item}")
        if n < 1:
            raise SiameseError(f"Expected at least 1 batch per epoch. Received: {n}")
        rng = self.generator(epoch)
        pool = np.union1d(self._positive_items, self._negative_items)
        out = np.empty((n, batch_size), np.int64)
        for b in range(n):
            draws, takes, filled = [], [], 0
            while filled < batch_size:  # one round: items without replacement
                items = rng.choice(pool, min(len(pool), batch_size - filled), replace=False)
                take = np.minimum(self._counts[items], per_item)
                end = np.cumsum(take)
                used = min(int(np.searchsorted(end, batch_size - filled)) + 1, len(items))
                take = take[:used]
                take[-1] -= max(int(end[used - 1]) - (batch_size - filled), 0)
                draws.append(items[:used])
                takes.append(take)
                filled += int(take.sum())
            items, take = np.concatenate(draws), np.concatenate(takes)
            images = np.empty(batch_size, np.int64)
            starts = np.concatenate([[0], np.cumsum(take)[:-1]])
            for item in np.unique(items):  # every draw of an item together: different images while there are
                where = np.flatnonzero(items == item)
                need, count = int(take[where].sum()), int(self._counts[item])
                rounds = [rng.permutation(count) for _ in range(need // count)] if need > count else []
                picked = np.concatenate([*rounds, rng.choice(count, need - count * len(rounds), replace=False)])
                picked += self._offsets[item]
                k = 0
                for w in where:
                    images[starts[w] : starts[w] + take[w]] = picked[k : k + take[w]]
                    k += take[w]
            out[b] = images
        return out

    def relations(self, images: np.ndarray) -> np.ndarray:
        """`(n, n)` float32: for every two of `images`, 1 if they are two different images of one item, 0 if
        their items share no label (a negative pair), -1 if they are no pair (the same image, or two items
        sharing a label)."""
        images = np.asarray(images, np.int64)
        items = self._image_item[images]
        same = items[:, None] == items[None, :]
        if self._labels.shape[1]:
            rows = self._labels[items]
            shared = (rows @ rows.T).toarray() > 0
        else:
            shared = np.zeros(same.shape, bool)
        relation = np.where(same, 1.0, np.where(shared, -1.0, 0.0)).astype(np.float32)
        relation[images[:, None] == images[None, :]] = -1.0
        return relation
