"""Retrieval metrics and the "same item?" threshold: hand-worked cases, ties, errors, and slow references."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from siamese.catalog import Catalog, Item
from siamese.errors import SiameseError
from siamese.pairs import PairSampler
from siamese.retrieval import calibrate_threshold, nearest, pair_distances, precision_at_1, retrieval_metrics


def slow_retrieval(embeddings: np.ndarray, items: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Leave-one-out metrics by full sorts of exact (float64) distances, in fractions, one query at a time."""
    x = np.asarray(embeddings, np.float64)
    n = len(x)
    totals: dict[str, Fraction] = {}
    queries = 0
    for q in range(n):
        others = [j for j in range(n) if j != q]
        r = sum(items[j] == items[q] for j in others)
        if r == 0:
            continue
        queries += 1
        order = sorted(others, key=lambda j: (float(np.sum((x[q] - x[j]) ** 2)), j))
        rel = [int(items[j] == items[q]) for j in order]
        scores = {
            "precision_at_1": Fraction(rel[0]),
            "r_precision": Fraction(sum(rel[:r]), r),
            "map_at_r": sum(Fraction(sum(rel[:i]), i) * rel[i - 1] for i in range(1, r + 1)) / r,
            **{f"recall_at_{k}": Fraction(int(any(rel[:k]))) for k in ks},
        }
        for name, value in scores.items():
            totals[name] = totals.get(name, Fraction(0)) + value
    return {**{name: float(total / queries) for name, total in totals.items()}, "queries": queries}


def test_hand_worked_line_with_ties():
    # Points on a line; item c has one row, so row 5 is no query (but is still a neighbour).
    #   row:   0  1  2  3  4  5
    #   x:     0  2  6  3  4  10
    #   item:  a  a  a  b  b  c
    # Neighbours of each query, nearest first as (row item distance); equal distances: lower row first.
    #   q0 (a, R=2): 1a2 3b3 4b4 2a6 5c10 -> rel 1 0 0 1: P@1 1, R-prec 1/2, AP@R (1/1)/2   = 1/2, first hit 1
    #   q1 (a, R=2): 3b1 0a2 4b2 2a4 5c8  -> rel 0 1 0 1: P@1 0, R-prec 1/2, AP@R (1/2)/2   = 1/4, first hit 2
    #   q2 (a, R=2): 4b2 3b3 1a4 5c4 0a6  -> rel 0 0 1 0 1: P@1 0, R-prec 0, AP@R 0,              first hit 3
    #   q3 (b, R=1): 1a1 4b1 0a3 2a3 5c7  -> rel 0 1: P@1 0, R-prec 0, AP@R 0,                    first hit 2
    #   q4 (b, R=1): 3b1 1a2 2a2 0a4 5c6  -> rel 1: P@1 1, R-prec 1, AP@R 1,                      first hit 1
    # Means over the 5 queries: P@1 2/5, R-prec (1/2 + 1/2 + 1)/5 = 2/5, MAP@R (1/2 + 1/4 + 1)/5 = 7/20;
    # first hits 1 2 3 2 1: recall@1 2/5, recall@2 4/5, recall@3 5/5. The ties decide q1 and q3: ranking
    # row 4 before row 0 for q1 would give R-prec 0 and AP@R 0.
    x = np.array([[0], [2], [6], [3], [4], [10]], np.float32)
    items = np.array(["a", "a", "a", "b", "b", "c"])
    metrics = retrieval_metrics(x, items, ks=(1, 2, 3))
    assert metrics == {
        "precision_at_1": pytest.approx(2 / 5), "r_precision": pytest.approx(2 / 5),
        "map_at_r": pytest.approx(7 / 20), "recall_at_1": pytest.approx(2 / 5),
        "recall_at_2": pytest.approx(4 / 5), "recall_at_3": pytest.approx(1.0), "queries": 5,
    }
    assert metrics == pytest.approx(slow_retrieval(x, items, (1, 2, 3)))
    assert precision_at_1(x, items) == pytest.approx(2 / 5)


def test_equal_distances_rank_the_lower_row_first():
    # Row 0 at x=0 has rows 1 and 2 both at distance 1; the lower row is its nearest.
    x = np.array([[0], [1], [-1]], np.float32)
    # items a b a: q0's nearest is row 1 (b): miss; q2's nearest is row 0 (a): hit; b has no other row.
    assert retrieval_metrics(x, ["a", "b", "a"], ks=(1, 2)) == {
        "precision_at_1": 0.5, "r_precision": 0.5, "map_at_r": 0.5, "recall_at_1": 0.5, "recall_at_2": 1.0,
        "queries": 2,
    }
    # items a a b: q0's nearest is row 1 (a): hit; q1's nearest is row 0 (a): hit.
    assert retrieval_metrics(x, ["a", "a", "b"], ks=(1,))["precision_at_1"] == 1.0


def test_items_with_one_row_are_no_queries():
    x = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [9.0, 9.0]])
    metrics = retrieval_metrics(x, [7, 7, 8, 9], ks=(1,))
    assert metrics["queries"] == 2 and metrics["precision_at_1"] == metrics["map_at_r"] == 1.0


@pytest.mark.parametrize("kind", ["gaussian", "integer grid"])
def test_matches_slow_full_sort(kind):
    rng = np.random.default_rng(3)
    n = 90
    if kind == "gaussian":
        x = rng.normal(size=(n, 6)).astype(np.float32) + 3  # off the origin: not normalised
    else:
        x = rng.integers(0, 4, size=(n, 2)).astype(np.float32)  # many equal distances, all exact in float32
    items = rng.integers(0, 12, size=n)
    items[:3] = [100, 101, 102]  # items with a single row
    ks = (1, 2, 5, 20, 500)  # 500 > n - 1: every other row
    expected = slow_retrieval(x, items, ks)
    for chunk in (1, 7, 256):
        assert retrieval_metrics(x, items, ks=ks, chunk=chunk) == pytest.approx(expected, rel=1e-12)


def test_recall_grows_with_k_and_starts_at_precision_at_1():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = rng.integers(0, 40, size=300)
    ks = (1, 2, 3, 5, 8, 13, 21, 34, 299)
    metrics = retrieval_metrics(x, items, ks=ks)
    recalls = [metrics[f"recall_at_{k}"] for k in ks]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert metrics["recall_at_1"] == metrics["precision_at_1"] == pytest.approx(precision_at_1(x, items))
    assert 0 < metrics["map_at_r"] <= metrics["r_precision"] < 1


def test_retrieval_errors():
    x = np.zeros((3, 2))
    with pytest.raises(SiameseError, match=r"Expected an item with at least two rows.*Received: 3 rows"):
        retrieval_metrics(x, [1, 2, 3])
    with pytest.raises(SiameseError, match="Expected an item with at least two rows"):
        precision_at_1(x, [1, 2, 3])
    with pytest.raises(SiameseError, match=r"one item per row. Received: embeddings \(3, 2\) and items \(2,\)"):
        retrieval_metrics(x, [1, 1])
    with pytest.raises(SiameseError, match="Expected finite embeddings"):
        retrieval_metrics(np.array([[0.0], [np.nan]]), [1, 1])
    with pytest.raises(SiameseError, match=r"Expected `ks` to be positive integers. Received: \(1, 0\)"):
        retrieval_metrics(x, [1, 1, 2], ks=(1, 0))
    with pytest.raises(SiameseError, match="Expected `chunk` >= 1. Received: 0"):
        retrieval_metrics(x, [1, 1, 2], chunk=0)


def brute_force_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, int, int]:
    """(threshold, true positives, false positives) of the best F1 over every distinct distance, smallest first."""
    best = (-1.0, 0.0, 0, 0)
    for t in sorted(set(distances.tolist())):
        predicted = distances <= t
        tp = int(np.sum(predicted & (same == 1)))
        fp = int(np.sum(predicted & (same == 0)))
        fn = int(np.sum(~predicted & (same == 1)))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0]:
            best = (f1, t, tp, fp)
    return best[1:]


def test_calibrate_threshold_by_hand():
    # Sorted: 0.1+ 0.2+ 0.2- 0.4+ 0.5-  (3 positives, 2 negatives); F1 = 2 tp / (2 tp + fp + fn).
    #   <= 0.1: tp 1 fp 0 fn 2 -> 2/4;  <= 0.2: tp 2 fp 1 fn 1 -> 4/6;
    #   <= 0.4: tp 3 fp 1 fn 0 -> 6/7 (best: precision 3/4, recall 1, accuracy (3 + 1)/5);  <= 0.5: 6/8.
    threshold = calibrate_threshold(np.array([0.5, 0.2, 0.1, 0.4, 0.2]), np.array([0, 0, 1, 1, 1]))
    assert threshold.to_dict() == {
        "distance": 0.4, "precision": 0.75, "recall": 1.0, "f1": pytest.approx(6 / 7), "accuracy": 0.8,
        "positives": 3, "negatives": 2,
    }


def test_calibrate_threshold_keeps_equal_distances_together():
    # 0.1+ 0.3+ 0.3- 0.3- 0.9-: splitting the 0.3s would give F1 1, but they go to one side:
    # <= 0.1: tp 1 fp 0 fn 1 -> 2/3;  <= 0.3: tp 2 fp 2 -> 4/6 = 2/3, equal, so the smaller wins;  <= 0.9: 4/7.
    threshold = calibrate_threshold([0.3, 0.1, 0.3, 0.9, 0.3], [0, True, 1, False, 0])
    assert (threshold.distance, threshold.precision, threshold.recall) == (0.1, 1.0, 0.5)
    assert threshold.f1 == pytest.approx(2 / 3)


def test_calibrate_threshold_matches_brute_force():
    rng = np.random.default_rng(11)
    for trial in range(20):
        n = int(rng.integers(2, 200))
        same = rng.integers(0, 2, size=n).astype(np.float32)
        same[:2] = [0, 1]
        distances = np.round(rng.gamma(2.0, size=n) + same * rng.uniform(-1, 0.5), 1)  # rounded: ties
        threshold = calibrate_threshold(distances, same)
        t, tp, fp = brute_force_threshold(distances, same)
        positives = int(same.sum())
        assert threshold.distance == t, trial
        assert threshold.precision == tp / (tp + fp) and threshold.recall == tp / positives
        assert threshold.f1 == pytest.approx(2 * tp / (tp + fp + positives))
        assert threshold.accuracy == np.mean((distances <= t) == (same == 1))
        assert (threshold.positives, threshold.negatives) == (positives, n - positives)


def test_calibrate_threshold_errors():
    with pytest.raises(SiameseError, match="Received: 0 same-item pairs and 2 different-item pairs"):
        calibrate_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(SiameseError, match="Received: 2 same-item pairs and 0 different-item pairs"):
        calibrate_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(SiameseError, match="Expected one distance and one label per pair"):
        calibrate_threshold([0.1, 0.2], [1])
    with pytest.raises(SiameseError, match="labels of 0 or 1"):
        calibrate_threshold([0.1, 0.2], [1, 2])
    with pytest.raises(SiameseError, match="Expected finite distances"):
        calibrate_threshold([0.1, np.nan], [1, 0])


def test_pair_distances_with_sampled_pairs():
    # Each item's images lie within 0.5 of its own point; the items' points are 10 apart.
    catalog = Catalog(tuple(Item(f"item{i}", tuple(f"{i}/{k}.png" for k in range(3))) for i in range(5)), Path())
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(5, 8)[catalog.image_item]
    embeddings = centres + rng.uniform(-0.25, 0.25, size=centres.shape) / np.sqrt(8)
    pairs = PairSampler(catalog, seed=1).pairs(0, 100)
    distances = pair_distances(embeddings, pairs.first, pairs.second)
    expected = np.linalg.norm(embeddings[pairs.first] - embeddings[pairs.second], axis=1)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)
    threshold = calibrate_threshold(distances, pairs.same)
    assert (threshold.f1, threshold.accuracy, threshold.positives, threshold.negatives) == (1.0, 1.0, 50, 50)
    assert threshold.distance < 1


def test_pair_distances_errors():
    x = np.zeros((3, 2))
    with pytest.raises(SiameseError, match=r"Expected indices in \[0, 3\). Received: 2 to 3"):
        pair_distances(x, [0, 1], [2, 3])
    with pytest.raises(SiameseError, match="Expected integer indices. Received: float64"):
        pair_distances(x, [0.0], [1.0])
    with pytest.raises(SiameseError, match="two index arrays of one length"):
        pair_distances(x, [0, 1], [2])


def test_nearest_breaks_ties_by_the_lower_row_and_leaves_itself_out():
    gallery = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)  # every row twice
    np.testing.assert_array_equal(nearest(gallery, gallery), [0, 0, 2, 2, 4, 4])
    np.testing.assert_array_equal(nearest(gallery, gallery, exclude_self=True), [1, 0, 3, 2, 5, 4])
