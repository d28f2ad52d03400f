"""Pairs: the label rule, the balance, and (seed, epoch) reproducibility, on real catalogs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import solid_catalog

from siamese.catalog import load_catalog
from siamese.errors import SiameseError
from siamese.pairs import PairSampler, PKSampler


@pytest.fixture
def labeled(tmp_path):
    """Six items; red/pink/blue labels make some pairs of items never negative."""
    path = solid_catalog(tmp_path, {
        "rose": (3, ["red", "pink"]), "brick": (2, ["red"]), "flamingo": (4, ["pink"]),
        "sky": (2, ["blue"]), "stone": (3, []), "lonely": (1, ["green"]),
    })
    return load_catalog(path, tmp_path)


def share_label(catalog, i, j) -> bool:
    return bool(set(catalog.items[i].labels) & set(catalog.items[j].labels))


def test_label_rule_and_pair_kinds(labeled):
    sampler = PairSampler(labeled, seed=7)
    item = labeled.image_item
    for epoch in range(5):
        pairs = sampler.pairs(epoch, 400)
        for a, b, same in zip(pairs.first, pairs.second, pairs.same, strict=True):
            if same == 1:
                assert item[a] == item[b] and a != b
            else:
                assert item[a] != item[b]
                assert not share_label(labeled, item[a], item[b]), (item[a], item[b])


def test_balance_and_dtypes(labeled):
    pairs = PairSampler(labeled).pairs(0, 101)
    assert pairs.same.dtype == np.float32 and pairs.first.dtype == np.int64
    assert int(pairs.same.sum()) == 50 and len(pairs.same) == 101
    # shuffled: positives are not all at the front
    assert 0 < pairs.same[:50].sum() < 50


def test_same_seed_and_epoch_same_pairs_otherwise_different(labeled):
    sampler = PairSampler(labeled, seed=1)
    first = sampler.pairs(3, 256)
    again = PairSampler(labeled, seed=1).pairs(3, 256)
    assert all((x == y).all() for x, y in zip(first, again, strict=True))
    other_epoch = sampler.pairs(4, 256)
    other_seed = PairSampler(labeled, seed=2).pairs(3, 256)
    assert not (first.first == other_epoch.first).all()
    assert not (first.first == other_seed.first).all()


def test_every_allowed_item_and_image_is_drawn(labeled):
    pairs = PairSampler(labeled).pairs(0, 4000)
    used = np.unique(np.concatenate([pairs.first, pairs.second]))
    assert used.tolist() == list(range(len(labeled.filenames)))
    # items are drawn uniformly: each of the 5 items with two or more images starts ~1/5 of positives
    pos_items = labeled.image_item[pairs.first[pairs.same == 1]]
    counts = np.bincount(pos_items, minlength=len(labeled))
    assert counts[5] == 0  # "lonely" has one image
    assert (np.abs(counts[:5] / counts.sum() - 0.2) < 0.04).all()


def test_rare_negative_partners_are_found_by_the_fallback(tmp_path):
    # 150 items share "crowd": their only negative partners are "odd" and "even" (2 of 152 items), so
    # drawing a partner at random is nearly always refused and the explicit fallback must find them.
    spec = {f"c{i}": (2, ["crowd"]) for i in range(150)}
    spec["odd"] = (2, ["x"])
    spec["even"] = (2, ["y"])
    catalog = load_catalog(solid_catalog(tmp_path, spec), tmp_path)
    pairs = PairSampler(catalog).pairs(0, 600)
    negatives = pairs.same == 0
    first, second = catalog.image_item[pairs.first[negatives]], catalog.image_item[pairs.second[negatives]]
    ids = [(catalog.items[a].id, catalog.items[b].id) for a, b in zip(first, second, strict=True)]
    assert len(ids) == 300
    assert all(a != b and ("odd" in (a, b) or "even" in (a, b)) for a, b in ids)
    assert len({a for a, _ in ids}) > 100  # crowd items do get drawn as the first member


def test_clear_errors_when_a_kind_of_pair_is_impossible(tmp_path):
    one = load_catalog(solid_catalog(tmp_path / "one", {"only": (3, [])}), tmp_path / "one")
    with pytest.raises(SiameseError, match="No negative pairs: the catalog has a single item"):
        PairSampler(one)
    shared = load_catalog(solid_catalog(tmp_path / "s", {"a": (2, ["x"]), "b": (2, ["x", "y"])}), tmp_path / "s")
    with pytest.raises(SiameseError, match="No negative pairs: every two items share a label.*Fix: add items"):
        PairSampler(shared)
    singles = load_catalog(solid_catalog(tmp_path / "p", {"a": (1, []), "b": (1, [])}), tmp_path / "p")
    with pytest.raises(SiameseError, match="No positive pairs: none of the 2 items has two or more images"):
        PairSampler(singles)
    with pytest.raises(SiameseError, match="Expected `seed` to be a non-negative integer. Received: -1"):
        PairSampler(one, seed=-1)
    ok = load_catalog(solid_catalog(tmp_path / "ok", {"a": (2, []), "b": (2, [])}), tmp_path / "ok")
    with pytest.raises(SiameseError, match="Expected at least 2 pairs per epoch. Received: 1"):
        PairSampler(ok).pairs(0, 1)


def test_triplets_follow_the_label_rule_and_are_reproducible(labeled):
    sampler = PairSampler(labeled, seed=3)
    item = labeled.image_item
    triplets = sampler.triplets(0, 500)
    for a, p, n in zip(*triplets, strict=True):
        assert item[a] == item[p] and a != p
        assert item[a] != item[n] and not share_label(labeled, item[a], item[n])
    again = sampler.triplets(0, 500)
    assert all((x == y).all() for x, y in zip(triplets, again, strict=True))
    assert not (sampler.triplets(1, 500).anchor == triplets.anchor).all()


def test_no_triplets_without_an_anchor(tmp_path):
    # "a" has two images but shares a label with "b"; "c" shares no label but has only one image.
    spec = {"a": (2, ["x"]), "b": (1, ["x"]), "c": (1, ["y"])}
    catalog = load_catalog(solid_catalog(tmp_path, spec), tmp_path)
    triplets = PairSampler(catalog).triplets(0, 10)  # a's negative partner is c
    assert set(catalog.image_item[triplets.anchor]) == {0}
    spec = {"a": (2, ["x"]), "b": (2, ["x"]), "c": (1, ["y"])}
    catalog = load_catalog(solid_catalog(tmp_path / "2", spec), tmp_path / "2")
    assert len(PairSampler(catalog).triplets(0, 10).anchor) == 10
    # "a" shares a label with everyone; only the single-image "b" and "c" make a negative pair.
    spec = {"a": (2, ["x", "y"]), "b": (1, ["x"]), "c": (1, ["y"])}
    catalog = load_catalog(solid_catalog(tmp_path / "3", spec), tmp_path / "3")
    assert PairSampler(catalog).pairs(0, 4).same.sum() == 2  # pairs are still possible
    with pytest.raises(SiameseError, match="No triplets: no item has both two images and another item sharing"):
        PairSampler(catalog).triplets(0, 10)


def test_batches_are_p_items_by_k_images_reproducibly(labeled):
    sampler = PKSampler(labeled, seed=3)
    item = labeled.image_item
    batches = sampler.batches(0, 50, 8, per_item=2)
    assert batches.shape == (50, 8) and batches.dtype == np.int64
    for batch in batches:
        # items come in runs of per_item images; a run's images are different images of the item
        runs, lonely = [], 5  # "lonely" has one image: it takes one place, the next item starts after it
        k = 0
        while k < len(batch):
            width = 1 if item[batch[k]] == lonely else 2
            runs.append(batch[k : k + width])
            k += width
        for run in runs:
            assert len(set(item[run])) == 1 and len(set(run)) == len(run)
        assert len({item[run[0]] for run in runs}) == len(runs)  # drawn without replacement in a round
    assert (sampler.batches(0, 50, 8, 2) == batches).all()
    assert not (sampler.batches(1, 50, 8, 2) == batches).all()
    drawn = np.bincount(item[batches.ravel()], minlength=6)
    assert (drawn > 0).all()  # every item takes part, "lonely" too (it has negative partners)


def test_batches_larger_than_the_catalog_draw_items_again_with_other_images(labeled):
    # 6 items, 15 images: a batch of 24 (K = 4) takes every item, then a second round of them
    batch = PKSampler(labeled, seed=0).batches(0, 1, 24, per_item=4)[0]
    item = labeled.image_item
    for i, count in enumerate(len(x.filenames) for x in labeled.items):
        images = batch[item[batch] == i]
        # every image of the item before any is repeated
        assert len(set(images.tolist())) == min(len(images), count)


def test_relations_follow_the_label_rule(labeled):
    sampler = PKSampler(labeled, seed=1)
    batch = sampler.batches(0, 1, 12, per_item=3)[0]
    relation = sampler.relations(batch)
    item = labeled.image_item
    assert relation.shape == (12, 12) and relation.dtype == np.float32
    for a in range(12):
        for b in range(12):
            i, j = item[batch[a]], item[batch[b]]
            if batch[a] == batch[b]:
                want = -1.0  # an image with itself is no pair
            elif i == j:
                want = 1.0
            else:
                want = -1.0 if share_label(labeled, i, j) else 0.0
            assert relation[a, b] == want, (a, b)


def test_batch_settings_are_checked(labeled):
    sampler = PKSampler(labeled)
    with pytest.raises(SiameseError, match="Expected `images_per_item` >= 2. Received: 1"):
        sampler.batches(0, 1, 8, per_item=1)
    with pytest.raises(SiameseError, match="Expected `batch_size` >= 2 for batch-all training. Received: 1"):
        sampler.batches(0, 1, 1, per_item=2)
