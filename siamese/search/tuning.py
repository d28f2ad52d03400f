"""Recall tuning of approximate engines: at build time, measure recall@10 against exact search on a seeded
sample of the index's own rows and keep the smallest query-time knob (`ef`, `nprobe`) that reaches the target."""

from __future__ import annotations

import numpy as np

from siamese.search.engine import Engine, Setting
from siamese.search.kernel import candidate_distances, kneighbors, take

RECALL_QUERIES = 1000
"""Most own rows (a seeded sample of a tenth) held out of an approximate engine to measure its recall@10."""
SEED = 0
"""hnswlib's random_seed, FAISS's k-means seed and the recall sample's seed."""
PLATEAU = 0.002
"""Least gain of recall@10 from doubling the knob that tuning keeps going for, where the target is out of reach."""
TARGET_RECALL = Setting("target_recall", float, 0.99, "hnsw, faiss IVF: the recall@10 on held-out images that the "
                        "default --ef (--nprobe) of queries must reach, chosen at build time", metavar="R")
"""The build setting of every engine `tune` tunes."""


def held_out(rows: int) -> np.ndarray:
    """The rows (sorted) that measure recall: a seeded sample of a tenth, at most RECALL_QUERIES."""
    return np.sort(np.random.default_rng(SEED).choice(rows, min(RECALL_QUERIES, rows // 10), replace=False))


def rows_except(rows: int, held: np.ndarray) -> np.ndarray:
    """0 ... rows - 1 without `held`."""
    keep = np.ones(rows, bool)
    keep[held] = False
    return np.flatnonzero(keep)


def powers_of_two(first: int, last: int) -> list[int]:
    """first, 2 first, 4 first... below `last`, then `last`: the query-time settings tried at build time."""
    values = [first]
    while values[-1] * 2 < last:
        values.append(values[-1] * 2)
    return [*values, last] if last > first else [first]


def recall(embeddings: np.ndarray, queries: np.ndarray, truth: np.ndarray, found: np.ndarray) -> float:
    """Share of the true k nearest rows found; a found row as near as the true k-th counts (ties, duplicates).
    Distances are in float64 (`candidate_distances`)."""
    kth = candidate_distances(embeddings, queries, truth[:, -1:])
    hits = (candidate_distances(embeddings, queries, found) <= kth * (1 + 1e-9)).sum()  # a missing row (-1): inf
    return float(hits / found.size)


def tune(engine: Engine, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> dict | None:
    """Measure recall@10 of an approximate `engine` built without the `held` rows, searching for them, at its
    `knob_default`, or at the smallest power of two that reaches its `target_recall` (or the last before recall
    gains less than PLATEAU from a doubling, where the target is out of reach); keep that value in its
    `params`, then add the held rows. With none held (under 10 rows), search exhaustively, measured on all.
    `half_norms`: the rows' |row|^2 / 2. Returns index.json's "recall" (None for an exact engine)."""
    if engine.knob_default is not None:
        engine.check_knob(engine.knob.name, engine.knob_default)
    if engine.knob_range is None:
        return None
    rows = len(embeddings)
    queries = take(embeddings, held) if len(held) else np.asarray(embeddings)
    k = min(10, rows - len(held))
    half_norms = half_norms.copy()
    half_norms[held] = np.inf  # not in the engine yet: never a neighbour
    _, truth = kneighbors(embeddings, queries, k, half_norms, lean=True)
    tried = powers_of_two(engine.knob.tune_from, min(engine.knob_range[1], rows - len(held)))
    chosen = engine.knob_default
    before = None
    for value in [chosen] if chosen is not None else tried if len(held) else tried[-1:]:
        measured = recall(embeddings, queries, truth, engine.search(queries, k, value)[1])
        if measured >= engine.target_recall:
            break
        if before is not None and measured - before[1] < PLATEAU:  # e.g. PQ codes: more probes stop helping
            value, measured = before
            break
        before = value, measured
    engine.params[engine.knob.name] = value
    engine.add(embeddings, held)
    return {"recall_at_10": measured, "k": k, "queries": len(queries), "held_out": bool(len(held)), "seed": SEED,
            "target": engine.target_recall}
