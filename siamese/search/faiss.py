"""FAISS on inner products of unit vectors: exact `IndexFlatIP` below FAISS_IVF_MIN_ROWS rows, approximate
`IndexIVFFlat` above; or, under a memory budget (`max_memory`), the FAISS index that budget holds
(`choose_index_key`: flat, HNSW, IVF-Flat, IVF of 8-bit scalar codes, or OPQ + IVF + PQ codes). Written to and
read back from its own file."""

from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import numpy as np

from siamese.errors import SiameseError
from siamese.search.engine import Engine, Knob, Setting, check_at_least, check_target_recall, register_engine
from siamese.search.kernel import blocks, by_block, candidate_distances, squared_norms, take
from siamese.search.tuning import SEED, TARGET_RECALL, rows_except
from siamese.util import usable_cpus

FAISS_IVF_MIN_ROWS = 100_000
"""A faiss index of fewer rows is exact (`IndexFlatIP`); of more, `IndexIVFFlat` with 4 sqrt(rows) lists. Under a
budget, fewer rows are exact if their flat index fits; more are never searched exhaustively (HNSW, IVF or PQ)."""

# The budget's choice of index follows autofaiss's get_optimal_index_keys_v2 (criteo/autofaiss, external/optimize.py):
# flat for few rows, else HNSW if its graph fits, else IVF-Flat, else OPQ + IVF + PQ codes of the most bytes that fit;
# between the last two, IVF of 8-bit scalar codes (a byte a dimension), which autofaiss skips and FAISS's guidelines
# name for "memory quite important" (wiki: Guidelines to choose an index).
HEADROOM = 1.1
"""An index fits a budget if HEADROOM times its estimated size does: FAISS's lists grow while rows are added, and
the allocator keeps some. (The estimates match the size of the written index, which read_index loads, within 1%.)"""
HNSW_M = (32, 8)
"""Links per row of an HNSW index under a budget: the most that fit, at most 32; fewer than 8 is not tried."""
PQ_M = (256, 128, 64, 48, 32, 24, 16, 8, 4)
"""Bytes per row (sub-quantizers of 8 bits) of a PQ index, the most that fit; autofaiss's list."""
PQ_MIN_ROWS = 39 * 256
"""Fewest rows a PQ index is built of: FAISS trains each sub-quantizer's 256 centroids on at least 39 rows apiece."""
LIST_MIN_ROWS = 39
"""Fewest rows per list of an IVF index under a budget (FAISS's k-means warns with fewer)."""
HNSW_QUANTIZER_LISTS = 1000
"""IVF lists from which a PQ index finds the lists to probe by an HNSW32 graph of their centroids (autofaiss's)."""
ID_BYTES = 8
"""Each row's id in FAISS's inverted lists (and in the IDMap of an HNSW index): int64."""


def parse_size(value: str | int) -> int:
    """Bytes of a size like "4G", "512M", "1.5G" or "1048576" (K, M, G, T: multiples of 1024; an optional B or
    iB after, any case), or of an int of bytes; SiameseError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not match:
        raise SiameseError(f"Expected `max_memory` like 4G or 512M. Received: {value!r}")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def format_size(size: int, flag: bool = False) -> str:
    """`size` bytes in words, rounded up to a tenth of its unit: "1.0 GiB", "512.0 KiB", "12 B"; with `flag`, as
    `parse_size` reads it back ("1G", "1.3M", at least `size`)."""
    power = min(4, max(0, int(math.log(size, 1024)))) if size >= 1 else 0
    if not power:
        return f"{size}" if flag else f"{size} B"
    value = math.ceil(size / 1024**power * 10) / 10
    unit = "KMGT"[power - 1]
    return f"{value:g}{unit}" if flag else f"{value:.1f} {unit}iB"


def budget_lists(rows: int) -> int:
    """IVF lists of an index of `rows` under a budget: autofaiss's (the power of two nearest 4 sqrt(rows) below a
    million rows, 16,384 below ten million, 65,536 from there), at most rows / LIST_MIN_ROWS."""
    lists = 16_384 if rows < 10_000_000 else 65_536
    if rows < 1_000_000:
        lists = 2 ** round(math.log2(4 * math.sqrt(rows)))
    return max(1, min(lists, rows // LIST_MIN_ROWS))


def flat_bytes(rows: int, dim: int) -> int:
    return 4 * rows * dim


def hnsw_bytes(rows: int, dim: int, m: int) -> int:
    """Each row's vector, its 2 m links on the ground level (int32) and about one more upper-level link, its offset
    into the links and level (12), and its id in the IDMap."""
    return rows * (4 * dim + 4 * (2 * m + 1) + 12 + ID_BYTES)


def ivf_flat_bytes(rows: int, dim: int, lists: int) -> int:
    """Each row's vector and id in its list, and the lists' centroids."""
    return rows * (4 * dim + ID_BYTES) + 4 * lists * dim


def sq8_bytes(rows: int, dim: int, lists: int) -> int:
    """Each row's code (a byte a dimension) and id in its list, the lists' centroids (and their HNSW32 graph, from
    HNSW_QUANTIZER_LISTS lists) and the quantizer's range of each dimension."""
    return rows * (dim + ID_BYTES) + 4 * lists * dim + quantizer_graph_bytes(lists) + 8 * dim


def quantizer_graph_bytes(lists: int) -> int:
    """The HNSW32 graph of the centroids of `lists` lists, from HNSW_QUANTIZER_LISTS lists; else none."""
    return lists * (4 * (2 * 32 + 1) + 12) if lists >= HNSW_QUANTIZER_LISTS else 0


def pq_bytes(rows: int, dim: int, m: int, lists: int) -> int:
    """Each row's m bytes of code and id in its list, the lists' centroids (and their HNSW32 graph, from
    HNSW_QUANTIZER_LISTS lists), the OPQ rotation and the sub-quantizers' 256 centroids each."""
    out = pq_dim(dim, m)
    return rows * (m + ID_BYTES) + 4 * lists * out + quantizer_graph_bytes(lists) + 4 * dim * out + 4 * 256 * out


def pq_dim(dim: int, m: int) -> int:
    """The dimension OPQ rotates `dim` into for m sub-quantizers: the least multiple of m from `dim`."""
    return m * math.ceil(dim / m)


def quantizer_key(lists: int) -> str:
    return f"IVF{lists}_HNSW32" if lists >= HNSW_QUANTIZER_LISTS else f"IVF{lists}"


def pq_key(dim: int, m: int, lists: int) -> str:
    return f"OPQ{m}_{pq_dim(dim, m)},{quantizer_key(lists)},PQ{m}x8"


def sq8_key(lists: int) -> str:
    return f"{quantizer_key(lists)},SQ8"


def family(key: str) -> str:
    """What kind of index the FAISS `key` of `choose_index_key` is: flat, hnsw, ivf-flat, sq8 or pq."""
    if key == "Flat":
        return "flat"
    if "HNSW" in key and "IVF" not in key:
        return "hnsw"
    return "pq" if ",PQ" in key else "sq8" if key.endswith(",SQ8") else "ivf-flat"


TRAIN_BYTES = 256 << 20
"""The least the training sample of an index under a budget may take (256 MiB), however small the budget; else the
budget's own (`train_room`): while trained, the index is empty, and the sample is freed before a row is added. An
IVF index gets no more lists than LIST_MIN_ROWS a list of such a sample trains. Ten million rows of 128 dimensions
in 65,536 lists train on 2.6M rows: 1.3 GB, held TRAIN_COPIES times."""
TRAIN_COPIES = {"ivf-flat": 1, "sq8": 2, "pq": 2}
"""Copies of its training sample an index holds while trained, by family: the sample; and its residuals to the
lists (SQ8: the codes' ranges), or the sample rotated by OPQ (PQ: its codebooks train on the residuals of 65,536
rows). Two-level k-means holds a sample of its coarse level beside them (`coarse_bytes`), out of the budget too."""


COARSE_ROWS = 2000
"""Rows a coarse centroid of two-level k-means trains on, at most (FAISS's two_level_clustering's): a copy of up to
COARSE_ROWS sqrt(lists) rows of the sample, held beside it (`coarse_bytes`)."""


def coarse_bytes(lists: int, dim: int) -> int:
    """Bytes of the coarse level's sample that `two_level_centroids` holds for `lists` lists (none below
    TWO_LEVEL_LISTS, trained by plain k-means)."""
    return 0 if lists < TWO_LEVEL_LISTS else COARSE_ROWS * round(math.sqrt(lists)) * 4 * dim


def train_room(max_memory: int, dim: int, kind: str, lists: int = 0) -> int:
    """Rows of training sample an index of `kind` (ivf-flat, sq8 or pq) of `lists` lists (default 0) may hold under
    `max_memory`: the budget, less its HEADROOM and the coarse sample of its two-level k-means (`coarse_bytes`),
    TRAIN_COPIES[kind] times; or TRAIN_BYTES if more."""
    room = max(max_memory / HEADROOM - coarse_bytes(lists, dim), TRAIN_BYTES)
    return int(room // (4 * dim * TRAIN_COPIES[kind]))


def trainable_lists(lists: int, max_memory: int, dim: int, kind: str) -> int:
    """`lists`, or the largest power of two of lists that the training sample `max_memory` holds trains
    (LIST_MIN_ROWS rows each; `train_room`, beside the coarse sample of as many lists as the budget alone trains)."""

    def fit(wanted: int, room: int) -> int:
        most = room // LIST_MIN_ROWS
        return wanted if wanted <= most else 2 ** max(0, math.floor(math.log2(max(1, most))))

    first = fit(lists, train_room(max_memory, dim, kind))
    return fit(first, train_room(max_memory, dim, kind, first))  # fewer lists: a smaller coarse sample


def choose_index_key(rows: int, dim: int, max_memory: int) -> tuple[str, int]:
    """The FAISS index_factory key (inner product) of the index of `rows` vectors of `dim` dimensions that best
    fits `max_memory` bytes, and its estimated size in bytes: "Flat" (exact) below FAISS_IVF_MIN_ROWS rows; from
    there "IDMap,HNSW{m},Flat" (m links per row, 8 to 32), "IVF{lists},Flat" or "IVF{lists}[_HNSW32],SQ8"; else
    (or below FAISS_IVF_MIN_ROWS rows where the flat index does not fit) "OPQ{m}_{d},IVF{lists}[_HNSW32],PQ{m}x8"
    with the most bytes m per row that fit. An index fits if HEADROOM times its size does; IVF lists are
    `budget_lists`, or fewer where their training sample would not fit (`trainable_lists`). SiameseError naming
    the least budget that fits when none does (no PQ index below PQ_MIN_ROWS rows)."""

    def fits(size: int) -> bool:
        return size * HEADROOM <= max_memory

    lists = budget_lists(rows)
    if rows < FAISS_IVF_MIN_ROWS:
        if fits(flat_bytes(rows, dim)):
            return "Flat", flat_bytes(rows, dim)
    else:
        m = min(HNSW_M[0], math.floor((max_memory / HEADROOM / rows - 4 * dim - 4 - 12 - ID_BYTES) / 8))
        if m >= HNSW_M[1]:
            return f"IDMap,HNSW{m},Flat", hnsw_bytes(rows, dim, m)
        if fits(ivf_flat_bytes(rows, dim, lists)):
            few = trainable_lists(lists, max_memory, dim, "ivf-flat")
            return f"IVF{few},Flat", ivf_flat_bytes(rows, dim, few)
        if fits(sq8_bytes(rows, dim, lists)):
            few = trainable_lists(lists, max_memory, dim, "sq8")
            return sq8_key(few), sq8_bytes(rows, dim, few)
    sizes = [m for m in PQ_M if m < dim] or [1]
    if rows >= PQ_MIN_ROWS:
        for m in sizes:
            if fits(pq_bytes(rows, dim, m, lists)):
                few = trainable_lists(lists, max_memory, dim, "pq")
                return pq_key(dim, m, few), pq_bytes(rows, dim, m, few)
        least, smallest = pq_bytes(rows, dim, sizes[-1], lists), pq_key(dim, sizes[-1], lists)
    else:
        least, smallest = flat_bytes(rows, dim), f"the exact Flat index (PQ takes {PQ_MIN_ROWS:,} rows or more)"
    least = math.ceil(least * HEADROOM)
    raise SiameseError(f"Expected `max_memory` >= {format_size(least)} for {rows:,} rows of {dim} dimensions. "
                       f"Received: {format_size(max_memory)}. Fix: pass `max_memory={format_size(least, True)}` or "
                       f"more, the least that holds {smallest}; or no budget.")


OPQ_NITER = 50
"""Iterations of OPQ's rotation training (FAISS's default; it trains on at most 65,536 rows, whatever the rows)."""
QUANTIZER_EF = 2
"""The HNSW32 graph of a PQ index's list centroids searches with efSearch QUANTIZER_EF x nprobe (autofaiss's)."""
HNSW_MAX_EF = 1 << 16
"""The largest efSearch (`nprobe`) of an HNSW index under a budget."""
TWO_LEVEL_LISTS = 4096
"""IVF lists from which a budget index's lists are trained by two-level k-means (`two_level_centroids`), not by
k-means over every list (exact assignment: rows x lists distances an iteration). On 2 cores, 1,000,000 x 128 rows
took 6.2 s against 134 s into 4,096 lists, 17 s against about 340 s into 16,384 (each row 0.1 to 0.8% less near
its centroid); 262,144 rows into 1,024 lists took 6.9 s by plain k-means, quick enough to keep it."""


def two_level_centroids(x: np.ndarray, lists: int, niter: int = 10) -> np.ndarray:
    """`lists` unit centroids of the unit rows `x` by seeded spherical two-level k-means, `niter` iterations a level
    (default 10, an IVF's): sqrt(lists) coarse clusters, then each split into a share of `lists` proportional to its
    rows. FAISS's faiss.contrib.clustering.two_level_clustering (bench_ivf's --two_level_clustering), except that a
    coarse cluster too small for a centroid of its own gets none (FAISS's fails there: k-means of 0 centroids). A
    row is compared with 2 sqrt(lists) centroids per iteration, not with all `lists`."""
    import faiss

    rows, dim = x.shape
    coarse = faiss.Kmeans(dim, max(1, round(math.sqrt(lists))), niter=niter, spherical=True, seed=SEED,
                          max_points_per_centroid=COARSE_ROWS)
    coarse.train(x)
    _, assigned = coarse.assign(x)
    counts = np.bincount(assigned, minlength=coarse.k)
    shares = np.diff(np.cumsum(counts) * lists // rows, prepend=0)
    order = np.argsort(assigned, kind="stable")
    centroids, start = [], 0
    for count, share in zip(counts, shares, strict=True):
        members = order[start : start + count]
        start += count
        if share:
            # min_points_per_centroid 1: a share of rows / lists (at least LIST_MIN_ROWS) rows a centroid is what
            # train_rows asks for, not a reason for FAISS's warning
            fine = faiss.Kmeans(dim, int(share), niter=niter, spherical=True, seed=SEED, min_points_per_centroid=1)
            fine.train(np.ascontiguousarray(x[np.sort(members)]))
            centroids.append(fine.centroids)
    return np.concatenate(centroids)


@register_engine("faiss")
class Faiss(Engine):
    """A FAISS index: exact `IndexFlatIP` (`nlist` 0), or `IndexIVFFlat` of `nlist` lists (default: 0 below
    100,000 rows, 4 sqrt(rows) above) probing `nprobe` of them per query (default: the smallest power of two
    reaching `target_recall`, default 0.99).

    With `max_memory` (bytes, or a size like "4G"; see `parse_size`), the index that budget holds instead
    (`choose_index_key`), built by faiss.index_factory: trained on a seeded sample of at most what FAISS uses and
    the budget leaves, then filled a block at a time. `nprobe` is then the lists probed (IVF, PQ), or efSearch
    (HNSW). `rerank` N > 0 searches for max(N, k) candidates and ranks them by their exact distance to the
    embeddings the index was built over (PQ codes only approximate it)."""

    summary = "exact IndexFlatIP below 100,000 images, approximate IVF above; or what --max-memory holds"
    runner = None
    """Where the rows of a trained IVF index are added: here (None), or on Ray (a `faiss_ray.RayRunner`, which
    `index_stores(..., runner="ray")` sets)."""

    settings = (
        Setting("nlist", int, None, "faiss: inverted lists of the IVF index; 0 keeps it exact", metavar="N",
                default_text="default: 0 below 100,000 images, 4 sqrt(images) above"),
        TARGET_RECALL,
        Setting("max_memory", str, None, "faiss: the memory the index may take, e.g. 4G or 512M (K, M, G, T: "
                "multiples of 1024), which picks it: exact below 100,000 images where it fits, else HNSW, IVF, IVF "
                "of 8-bit codes, or OPQ+IVF+PQ codes of the most bytes per image that fit", metavar="SIZE",
                default_text="default: none, exact below 100,000 images, IVF above"),
        Setting("rerank", int, 0, "faiss: rank this many candidates (at least --k) by their exact distance to the "
                "index's embeddings, for PQ codes' recall; 0 is off", metavar="N"),
    )
    suffix = ".faiss"
    knob = Knob("nprobe", f"a faiss index of at least {FAISS_IVF_MIN_ROWS:,} rows (IVF; or built with --nlist or "
                "--max-memory)", "faiss IVF: lists searched per query, up to nlist (of an HNSW index under "
                "--max-memory: its efSearch); more: better recall, slower (default: the index's, chosen at build "
                "time for its --target-recall)")

    def __init__(self, nlist: int | None = None, nprobe: int | None = None, target_recall: float = 0.99,
                 max_memory: str | int | None = None, rerank: int = 0):
        super().__init__()
        if nlist is not None:
            check_at_least("nlist", nlist, 0)
        check_target_recall(target_recall)
        check_at_least("rerank", rerank, 0)
        max_memory = None if max_memory is None else parse_size(max_memory)
        if nlist is not None and max_memory is not None:
            raise SiameseError(f"Expected `nlist` or `max_memory`, not both. Received: `nlist={nlist}` and "
                               f"`max_memory={format_size(max_memory, True)}`. Fix: leave out `nlist`: the budget "
                               "chooses the lists.")
        self.nlist, self.knob_default, self.target_recall = nlist, nprobe, target_recall
        self.max_memory, self.rerank = max_memory, rerank

    @property
    def knob_range(self) -> tuple[int, int] | None:
        if self.params.get("family") == "hnsw":
            return (1, HNSW_MAX_EF)
        return (1, self.params["nlist"]) if self.params.get("nlist") else None

    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        """Exact `IndexFlatIP` of every row (`nlist` 0), or `IndexIVFFlat` trained on every row (at most 256 per
        list, FAISS's default sample) holding every row but `held` (`add` them after measuring recall); with
        `max_memory`, the index it holds (see `build_budget`)."""
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        self.embeddings = embeddings  # what `rerank` ranks by: the index's own rows, not a copy
        if self.max_memory is not None:
            self.build_budget(embeddings, held)
            return
        rows, dim = embeddings.shape
        nlist = self.nlist
        if nlist is None:
            nlist = int(4 * rows**0.5) if rows >= FAISS_IVF_MIN_ROWS else 0
        if nlist > rows:
            raise SiameseError(f"Expected 0 <= `nlist` <= {rows} (the rows to index; 0 is exact). Received: {nlist}")
        self.params = {"library": f"faiss {faiss.__version__}", "metric": "inner_product", "nlist": nlist}
        if self.rerank:
            self.params["rerank"] = self.rerank
        if not nlist:
            self.index = faiss.IndexFlatIP(dim)
            self.index.add(embeddings)
            self.params["type"] = "IndexFlatIP"
            return
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed, self.index.cp.spherical = SEED, True
        self.index.train(embeddings)
        self.params.update(type="IndexIVFFlat", spherical=True, seed=SEED, train_rows=min(rows, 256 * nlist))
        self.add_trained(embeddings, rows_except(rows, held))

    def check_fits(self, rows: int, dim: int) -> None:
        if self.max_memory is not None:
            choose_index_key(rows, dim, self.max_memory)

    def build_budget(self, embeddings: np.ndarray, held: np.ndarray) -> None:
        """The index of `choose_index_key` (refused before any work when none fits `max_memory`), in inner product:
        an IVF or PQ one trained on a seeded sample (`train_rows`), then every row but `held` added a block at a
        time; a flat one of every row."""
        import faiss

        rows, dim = embeddings.shape
        key, estimated = choose_index_key(rows, dim, self.max_memory)
        kind = family(key)
        self.index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
        self.params = {"library": f"faiss {faiss.__version__}", "metric": "inner_product", "key": key,
                       "family": kind, "type": type(faiss.downcast_index(self.index)).__name__,
                       "max_memory": self.max_memory, "estimated_bytes": estimated, "nlist": 0, "rerank": self.rerank}
        if kind == "flat":
            self.add(embeddings, np.arange(rows))
            return
        if kind != "hnsw":  # an IVF index, of vectors, 8-bit codes or PQ codes
            ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
            ivf.cp.seed, ivf.cp.spherical = SEED, True
            if kind == "pq":
                ivf.pq.cp.seed = SEED
                ivf.do_polysemous_training = False  # polysemous codes serve Hamming filtering, unused here; slow
                opq = faiss.downcast_VectorTransform(faiss.downcast_index(self.index).chain.at(0))
                opq.niter = OPQ_NITER
            train = self.train_rows(rows, dim, ivf.nlist, kind)
            # a sample of every row is the rows themselves (a memory map stays one), not a copy
            sample = embeddings if train == rows else take(
                embeddings, np.sort(np.random.default_rng(SEED).choice(rows, train, replace=False)))
            if ivf.nlist >= TWO_LEVEL_LISTS:
                self.train_lists(ivf, sample, opq if kind == "pq" else None)
                self.params["lists_trained"] = f"two-level k-means ({round(math.sqrt(ivf.nlist))} coarse)"
            else:
                self.params["lists_trained"] = "k-means"
            # k-means assigns rows to centroids by exact search: by an HNSW quantizer, it would relink the graph of
            # the centroids every iteration (three times slower at 1,024 lists)
            clustering = faiss.IndexFlatIP(ivf.d)
            ivf.clustering_index = clustering
            self.index.train(sample)  # the lists, unless trained above; OPQ and the PQ codebooks
            ivf.clustering_index = None  # `clustering` is Python's to free
            del sample
            trim_heap()
            self.params.update(nlist=ivf.nlist, spherical=True, seed=SEED, train_rows=train)
        self.add_trained(embeddings, rows_except(rows, held))

    @staticmethod
    def train_lists(ivf, sample: np.ndarray, opq=None) -> None:
        """Put the `two_level_centroids` of `sample` into the quantizer of the IVF index `ivf` (an HNSW one links
        them), so that its training trains only what else it holds. The lists are of rows as OPQ rotates them:
        `opq`, trained first on the sample (index.train then leaves it be)."""
        rotated = sample
        if opq is not None:
            opq.train(sample)
            rotated = opq.apply(sample)
        ivf.quantizer.add(two_level_centroids(rotated, ivf.nlist, ivf.cp.niter))
        del rotated
        if not (ivf.quantizer.is_trained and ivf.quantizer.ntotal == ivf.nlist):
            raise RuntimeError(f"the quantizer holds {ivf.quantizer.ntotal} centroids of {ivf.nlist} lists")

    def add_trained(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """`add` the sorted `rows` to the trained index: on `runner` where it has one and the index is IVF; here,
        an IVF index under a budget is first `reserve`d."""
        import faiss

        if self.runner is None or not self.runner.add(self, embeddings, rows):
            if self.max_memory is not None and faiss.try_extract_index_ivf(self.index) is not None:
                self.reserve(embeddings)
            self.add(embeddings, rows)

    def reserve(self, embeddings: np.ndarray) -> None:
        """Size each list of the trained, empty IVF index for the rows of `embeddings` it is to hold, as the
        quantizer assigns them (every row: `tune` adds the held ones last), so that adding them never regrows a
        list. A list that grows doubles, and the C heap keeps what it freed: 5M rows of 72 bytes into 16,384 lists
        took 618 MiB unreserved (531 trimmed after each block), 343 reserved. Costs a pass of the quantizer."""
        import faiss

        ivf = faiss.extract_index_ivf(self.index)
        if ivf.ntotal:
            raise RuntimeError(f"the index holds {ivf.ntotal} rows: only an empty one is reserved")
        index = faiss.downcast_index(self.index)
        chain = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())] if isinstance(
            index, faiss.IndexPreTransform) else []
        counts = np.zeros(ivf.nlist, np.int64)
        for _, block in blocks(embeddings):
            x = np.ascontiguousarray(block, np.float32)
            for transform in chain:
                x = transform.apply(x)
            counts += np.bincount(ivf.quantizer.assign(x, 1).ravel(), minlength=ivf.nlist)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        for list_no in np.flatnonzero(counts).tolist():
            lists.resize(list_no, int(counts[list_no]))  # allocated to the size, then emptied: the room stays
            lists.resize(list_no, 0)

    def train_rows(self, rows: int, dim: int, lists: int, kind: str) -> int:
        """Rows to train an IVF index of `kind` (ivf-flat, sq8 or pq) on: those FAISS uses (256 per list; 65,536
        for OPQ and the PQ codebooks), at most what the budget holds (`train_room`), at least what FAISS asks for
        (LIST_MIN_ROWS per list; PQ_MIN_ROWS)."""
        wanted = max(256 * lists, 256 * 256) if kind == "pq" else 256 * lists
        least = max(LIST_MIN_ROWS * lists, PQ_MIN_ROWS) if kind == "pq" else LIST_MIN_ROWS * lists
        return min(rows, wanted, max(train_room(self.max_memory, dim, kind, lists), least))

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add `rows` (sorted) of `embeddings`, a block at a time (a flat index under a budget: every row)."""
        ids = self.params.get("family") != "flat"
        for low, high, vectors in by_block(embeddings, rows):
            if ids:
                self.index.add_with_ids(vectors, rows[low:high])
            else:
                self.index.add(vectors)

    @classmethod
    def read(cls, path: Path | None, embeddings: np.ndarray, params: dict) -> Faiss:
        import faiss

        # memory-mapped: loading an IVF index of 400,000 x 128 rows took 1 MiB, not 200 (the kernel pages its lists
        # in as queries touch them); the index's files are never written in place, so the map stays valid
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        if "key" in params:
            return cls.read_budget(index, embeddings, params)
        kind = type(faiss.downcast_index(index)).__name__
        nlist = faiss.extract_index_ivf(index).nlist if kind == "IndexIVFFlat" else 0
        if (index.ntotal, index.d, kind, nlist, index.metric_type) != (
            *embeddings.shape, params.get("type"), params.get("nlist"), faiss.METRIC_INNER_PRODUCT
        ):
            raise ValueError(f"it holds {index.ntotal} x {index.d} rows in an {kind} (nlist {nlist}), not the "
                             f"{embeddings.shape[0]} x {embeddings.shape[1]} rows in an {params.get('type')} "
                             f"(nlist {params.get('nlist')}) that index.json records")
        # nlist stays unset: a rebuild of other rows (a merge) chooses its own
        engine = cls(rerank=params.get("rerank", 0))
        engine.index, engine.params, engine.embeddings = index, params, embeddings
        return engine

    @classmethod
    def read_budget(cls, index, embeddings: np.ndarray, params: dict) -> Faiss:
        """The engine of an index built under a budget: `index` must be of index.json's key (the structure
        index_factory makes of it: types, transforms, lists, codes, links) over as many rows of as many dimensions
        as `embeddings`."""
        import faiss

        rows, dim = embeddings.shape
        key = params["key"]
        made = faiss.index_factory(dim, str(key), faiss.METRIC_INNER_PRODUCT)
        expected = structure(made)
        found = structure(index)
        if (index.ntotal, index.d, found) != (rows, dim, expected):
            raise ValueError(f"it holds {index.ntotal} x {index.d} rows in {types(index)}, not the "
                             f"{rows} x {dim} rows in a {key} index that index.json records")
        # nothing else set: a rebuild of other rows (a merge) chooses its own index under the same budget
        engine = cls(max_memory=params["max_memory"], rerank=params.get("rerank", 0))
        engine.index, engine.params, engine.embeddings = index, params, embeddings
        return engine

    def write(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def search_parameters(self, knob: int | None) -> list:
        """FAISS's search parameters of the query-time `knob` for this index (outermost first; the inner ones
        must stay alive while it searches), or [] for an exact one."""
        import faiss

        if not knob:
            return []
        if self.params.get("family") == "hnsw":
            return [faiss.SearchParametersHNSW(efSearch=knob)]  # an IDMap hands them to its HNSW index
        found = [faiss.SearchParametersIVF(nprobe=knob)]
        if isinstance(faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer), faiss.IndexHNSW):
            found.append(faiss.SearchParametersHNSW(efSearch=QUANTIZER_EF * knob))
            found[0].quantizer_params = found[1]
        if isinstance(faiss.downcast_index(self.index), faiss.IndexPreTransform):
            found.insert(0, faiss.SearchParametersPreTransform(index_params=found[0]))
        return found

    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.omp_set_num_threads(usable_cpus())
        queries = np.ascontiguousarray(queries)
        params = self.search_parameters(knob)
        wanted = max(k, self.rerank) if self.rerank else k
        scores, indices = self.index.search(queries, wanted, params=params[0] if params else None)
        if self.rerank:
            return self.reranked(queries, indices.astype(np.int64), k)
        # rows are unit vectors: |q - g|^2 = |q|^2 + 1 - 2 q.g (approximate q.g for PQ codes); a missing
        # neighbour (index -1) stays -1
        squared = squared_norms(queries)[:, None] + 1 - 2 * scores.astype(np.float64)
        return np.sqrt(np.maximum(squared, 0)).astype(np.float32), indices.astype(np.int64)

    def reranked(self, queries: np.ndarray, found: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest of each query's candidate rows `found` (-1: none) by their exact distance to the
        embeddings (float64, `candidate_distances`; ties by lower row)."""
        distances = np.full((len(queries), k), np.inf, np.float32)
        indices = np.full((len(queries), k), -1, np.int64)
        squared = candidate_distances(self.embeddings, queries, found)
        order = np.lexsort((found, squared), axis=1)[:, :k]
        best = np.take_along_axis(found, order, axis=1)
        near = np.take_along_axis(squared, order, axis=1)
        indices[:, : best.shape[1]] = np.where(np.isfinite(near), best, -1)
        distances[:, : best.shape[1]] = np.sqrt(near)
        return distances, indices

    @property
    def description(self) -> str:
        p = self.params
        rerank = f", rerank {p['rerank']}" if p.get("rerank") else ""
        if "key" in p:
            knob = {"flat": "exact", "hnsw": f"efSearch {p.get('nprobe')} as nprobe"}.get(
                p["family"], f"nprobe {p.get('nprobe')}")
            return f"faiss {p['key']} ({knob}, {format_size(p['max_memory'])} budget{rerank})"
        if p["nlist"]:
            return f"faiss {p['type']} (nlist {p['nlist']}, nprobe {p.get('nprobe')}{rerank})"
        return f"faiss {p['type']} (exact{rerank})"


def trim_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc's malloc_trim; nothing where there is none):
    FAISS's freed buffers (a training sample's copies, a merged copy's lists) otherwise stay resident."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def structure(given) -> tuple:
    """What the FAISS index `given` is made of, to compare with what index_factory makes of a key: its type,
    dimension and metric; its transforms (type, in and out dimensions); its lists and code size (IVF), links (HNSW)
    and sub-quantizers (PQ) or scalar quantizer (SQ); and the same of the indexes inside it (an IDMap's, a
    transform's, an IVF's quantizer).
    Types are as read_index reads them back (an IndexFlat of inner products is an IndexFlatIP)."""
    import faiss

    index = faiss.downcast_index(given)  # a wrapper that does not own the index: `given` keeps it alive
    name = type(index).__name__
    parts: list = ["IndexFlat" if name in ("IndexFlatIP", "IndexFlatL2") else name, index.d, index.metric_type]
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            name = type(transform).__name__  # an OPQMatrix is written as its matrix, and read as a LinearTransform
            parts.append(("LinearTransform" if name == "OPQMatrix" else name, transform.d_in, transform.d_out))
    if isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap):
        parts.append(structure(index.index))
    if isinstance(index, faiss.IndexIVF):
        parts += [index.nlist, index.code_size, structure(index.quantizer)]
    if isinstance(index, faiss.IndexIVFPQ):
        parts += [index.pq.M, index.pq.nbits]
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        parts.append(index.sq.qtype)
    if isinstance(index, faiss.IndexHNSW):
        parts.append(index.hnsw.nb_neighbors(1))
    return tuple(parts)


def types(index) -> str:
    """The FAISS index's type and those it wraps, e.g. "an IndexPreTransform of an IndexIVFPQ"."""
    import faiss

    names = []
    while index is not None:
        index = faiss.downcast_index(index)
        names.append(f"an {type(index).__name__}")
        index = index.index if isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap) else None
    return " of ".join(names)
