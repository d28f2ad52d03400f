"""The faiss engine under a memory budget (`max_memory`): the index the budget picks, the budget's refusal, PQ codes
with and without re-ranking against the embeddings, and a round trip through the index's folder."""

from __future__ import annotations

import pytest

from siamese.errors import SiameseError
from siamese.search.faiss import choose_index_key, family, format_size, parse_size


@pytest.mark.parametrize(("text", "size"), [("4G", 4 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29), ("64k", 1 << 16),
                                            ("2T", 2 << 40), ("1048576", 1 << 20), (" 8 GiB", 8 << 30),
                                            ("100MB", 100 << 20), (".5K", 512), (123, 123)])
def test_a_size_is_bytes_or_a_number_of_k_m_g_t_of_1024(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["x", "4X", "-1", "", "4 G B", "1e9", "G", True, -5])
def test_a_size_not_like_4g_is_refused(text):
    with pytest.raises(SiameseError, match=rf"^Expected `max_memory` like 4G or 512M\. Received: {text!r}$"):
        parse_size(text)


def test_sizes_are_written_rounded_up_and_read_back_at_least_as_large():
    assert [format_size(n) for n in (12, 1 << 10, 1234567, 1 << 30, 3 << 39)] == [
        "12 B", "1.0 KiB", "1.2 MiB", "1.0 GiB", "1.5 TiB"]
    for size in (1, 1023, 1025, 1234567, 10**9 + 1, 7 << 40):
        assert size <= parse_size(format_size(size, flag=True)) <= size * 1.1 + 1


@pytest.mark.parametrize(("rows", "dim", "budget", "key"), [
    (50_000, 128, "1G", "Flat"),  # below 100,000 rows: exact where it fits, as without a budget
    (99_999, 128, "60M", "Flat"),
    (50_000, 128, "20M", "OPQ64_128,IVF1024_HNSW32,PQ64x8"),  # the flat index (24.4 MiB) does not fit
    (50_000, 128, "2.5M", "OPQ16_128,IVF1024_HNSW32,PQ16x8"),
    (20_000, 128, "1M", "OPQ16_128,IVF512,PQ16x8"),  # few lists: found by a flat quantizer
    (1_000_000, 128, "1G", "IDMap,HNSW32,Flat"),  # from 100,000 rows: the graph if it fits
    (1_000_000, 128, "700M", "IDMap,HNSW16,Flat"),  # fewer links
    (1_000_000, 128, "600M", "IVF16384,Flat"),  # no graph of 8 links: uncompressed lists
    (1_000_000, 128, "100M", "OPQ64_128,IVF16384_HNSW32,PQ64x8"),
    (1_000_000, 100, "30M", "OPQ8_104,IVF16384_HNSW32,PQ8x8"),  # rotated into a multiple of 8 dimensions
    (10_000_000, 768, "8G", "OPQ256_768,IVF65536_HNSW32,PQ256x8"),
    (100_000_000, 512, "4T", "IDMap,HNSW32,Flat"),
])
def test_the_budget_picks_the_index_it_holds(rows, dim, budget, key):
    chosen, size = choose_index_key(rows, dim, parse_size(budget))
    assert chosen == key
    assert size * 1.1 <= parse_size(budget)
    assert family(chosen) == {"F": "flat", "I": "hnsw" if "HNSW" in key else "ivf-flat", "O": "pq"}[key[0]]


def test_more_budget_never_picks_a_smaller_index():
    for rows, dim in ((50_000, 128), (1_000_000, 128), (2_000_000, 64)):
        sizes = [choose_index_key(rows, dim, parse_size(f"{mib}M"))[1] for mib in range(40, 4000, 7)]
        assert sizes == sorted(sizes)


@pytest.mark.parametrize(("rows", "dim", "budget", "least", "holds"), [
    (50_000, 128, "1M", "1.7", "OPQ4_128,IVF1024_HNSW32,PQ4x8"),
    (1_000_000, 128, "20M", "26.3", "OPQ4_128,IVF16384_HNSW32,PQ4x8"),
    (5_000, 128, "100K", "2.7", "the exact Flat index \\(PQ takes 9,984 rows or more\\)"),
])
def test_a_budget_too_small_for_any_index_is_refused_with_the_least_that_fits(rows, dim, budget, least, holds):
    with pytest.raises(SiameseError, match=rf"^Expected `max_memory` >= {least} MiB for {rows:,} rows of {dim} "
                                           rf"dimensions\. Received: {format_size(parse_size(budget))}\. Fix: pass "
                                           rf"`max_memory={least}M` or more, the least that holds {holds}; or no "
                                           r"budget\.$"):
        choose_index_key(rows, dim, parse_size(budget))
    assert choose_index_key(rows, dim, parse_size(f"{least}M"))  # the budget named fits
