"""Input pipelines: pairs decoded from files equal the decoder's output, with or without a cache, read as the
PyDataset Keras reads on any backend or through tf.data alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import solid_catalog, write_image

import siamese.pipeline as pipeline_module
from siamese.catalog import load_catalog
from siamese.errors import SiameseError
from siamese.images import ImageDecodeError, decode_image
from siamese.pairs import PairSampler, PKSampler
from siamese.pipeline import ItemBatches, PairBatches, decoded_images, steps_per_epoch
from siamese.tfdata import image_dataset, tf_dataset


@pytest.fixture
def catalog(digits):
    return load_catalog(digits / "test.json", digits)


FORMS = ("PyDataset", "tf.data")


def batches(source, n, form="PyDataset"):
    """The first `n` batches `(x, y)` of `source` (x a tuple of arrays for pairs), as numpy: read as Keras reads a
    PyDataset, or through `tf_dataset`."""
    if form == "tf.data":
        return list(tf_dataset(source).take(n).as_numpy_iterator())
    return [source[i] for i in range(n)]


def take(source, n, form="PyDataset"):
    """The first `n` batches of pairs (triplets) of `source`, flat: `(images_a, images_b, same)`."""
    return [(*x, y) for x, y in batches(source, n, form)]


@pytest.mark.parametrize("form", FORMS)
def test_pairs_from_files_are_the_decoded_images_of_the_sampled_pairs(catalog, form):
    sampler = PairSampler(catalog, seed=5)
    ds = PairBatches(sampler, 16, batch_size=8, pairs_per_epoch=20)  # rounded up to 3 batches of 8
    assert steps_per_epoch(20, 8) == 3
    got = take(ds, 6, form)  # two epochs
    assert ds.num_batches is None  # endless
    for epoch in range(2):
        pairs = sampler.pairs(epoch, 24)
        got_a = np.concatenate([b[0] for b in got[3 * epoch : 3 * epoch + 3]])
        got_y = np.concatenate([b[2] for b in got[3 * epoch : 3 * epoch + 3]])
        assert got_a.shape == (24, 16, 16, 3) and got_a.dtype == np.uint8
        assert (got_y == pairs.same).all()
        for k in (0, 11, 23):
            assert (got_a[k] == decode_image(catalog.paths[pairs.first[k]], 16)).all()


def same_batches(got, want) -> bool:
    """Whether two lists of flat batches (tuples of arrays) are equal."""
    return len(got) == len(want) and all(
        (p == q).all() for x, y in zip(got, want, strict=True) for p, q in zip(x, y, strict=True))


def test_cached_and_single_process_pipelines_equal_the_file_pipeline_and_resume_at_an_epoch(catalog):
    sampler = PairSampler(catalog, seed=2)
    from_files = take(PairBatches(sampler, 12, batch_size=16, pairs_per_epoch=32), 4)
    for cache, workers, form in (("none", 1, "tf.data"), ("memory", None, "PyDataset"), ("disk", None, "tf.data")):
        cached = PairBatches(sampler, 12, batch_size=16, pairs_per_epoch=32, cache=cache, workers=workers)
        assert same_batches(take(cached, 4, form), from_files)
    resumed = PairBatches(sampler, 12, batch_size=16, pairs_per_epoch=32, start_epoch=1)
    assert same_batches(take(resumed, 2, "tf.data"), from_files[2:])
    assert same_batches(take(resumed, 2), from_files[2:])


def test_batches_load_alike_in_any_order_and_a_repeat_gives_the_first_batches_again(catalog):
    sampler = PKSampler(catalog, seed=3)
    source = ItemBatches(sampler, 8, batch_size=12, images_per_epoch=36)  # 3 batches an epoch
    forward = [source[i] for i in range(7)]
    backward = [ItemBatches(sampler, 8, batch_size=12, images_per_epoch=36)[i] for i in reversed(range(7))][::-1]
    assert same_batches(backward, forward)  # what prefetching threads may do
    fixed = ItemBatches(sampler, 8, batch_size=12, images_per_epoch=36, repeat=2)
    assert fixed.num_batches == 2
    assert same_batches([fixed[i] for i in range(5)], [forward[i % 2] for i in range(5)])
    assert same_batches(batches(fixed, 5, "tf.data"), [forward[i % 2] for i in range(5)])


def test_disk_cache_is_reused_until_a_file_changes(catalog, monkeypatch):
    calls = []
    real = pipeline_module.decode_image
    monkeypatch.setattr(pipeline_module, "decode_image", lambda p, s: calls.append(p) or real(p, s))
    first = decoded_images(catalog, 8, "disk", progress=False)
    assert isinstance(first, np.memmap) and len(calls) == len(catalog.filenames)
    calls.clear()
    again = decoded_images(catalog, 8, "disk", progress=False)
    assert calls == [] and (again == first).all()
    os.utime(catalog.paths[0], ns=(1, 1))  # touched: the cache key changes, everything is decoded again
    decoded_images(catalog, 8, "disk", progress=False)
    assert len(calls) == len(catalog.filenames)


def test_image_dataset_keeps_catalog_order(catalog):
    batches = [b.numpy() for b in image_dataset(catalog, 10, batch_size=64)]
    images = np.concatenate(batches)
    assert images.shape == (len(catalog.filenames), 10, 10, 3)
    assert (images[-1] == decode_image(catalog.paths[-1], 10)).all()
    cached = np.concatenate([b.numpy() for b in image_dataset(catalog, 10, batch_size=64, cache="memory")])
    assert (cached == images).all()


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    catalog = load_catalog(solid_catalog(tmp_path, {"a": (2, [])}), tmp_path)
    strip, fifo = catalog.paths
    write_image(strip, size=(20000, 10))  # both changed after the catalog was loaded
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match=f"^{fifo}: not a regular file but a named pipe"):
        decoded_images(catalog, 8, "disk", progress=False)
    write_image(fifo.with_name("gone.png")).rename(fifo)
    with pytest.raises(ImageDecodeError, match=f"^{strip}: 20000x10 is an aspect ratio of 2,000:1, over the limit"):
        decoded_images(catalog, 8, "memory", progress=False)


def test_pipeline_arguments_are_checked(tmp_path):
    catalog = load_catalog(solid_catalog(tmp_path, {"a": (2, []), "b": (2, [])}), tmp_path)
    sampler = PairSampler(catalog)
    with pytest.raises(SiameseError, match="Expected `cache` to be one of none, memory, disk. Received: 'ram'"):
        PairBatches(sampler, 8, cache="ram")  # type: ignore[arg-type]
    with pytest.raises(SiameseError, match="Expected `batch_size` >= 1. Received: 0"):
        PairBatches(sampler, 8, batch_size=0)
    with pytest.raises(SiameseError, match=r"Expected decoded images of shape \(4, 8, 8, 3\)"):
        PairBatches(sampler, 8, cache="memory", images=np.zeros((4, 9, 9, 3), np.uint8))


def test_triplet_stream_decodes_anchor_positive_negative(catalog):
    sampler = PairSampler(catalog, seed=4)
    [((anchors, positives, negatives), zeros)] = batches(PairBatches(sampler, 8, batch_size=6, triplets=True), 1,
                                                         "tf.data")
    drawn = sampler.triplets(0, steps_per_epoch(1024, 6) * 6)
    assert anchors.shape == (6, 8, 8, 3) and (zeros == 0).all()
    for k in range(6):
        assert (negatives[k] == decode_image(catalog.paths[drawn.negative[k]], 8)).all()
        assert (positives[k] == decode_image(catalog.paths[drawn.positive[k]], 8)).all()


@pytest.mark.parametrize("form", FORMS)
def test_batch_stream_holds_the_sampled_batches_and_their_relations_and_resumes(catalog, form):
    sampler = PKSampler(catalog, seed=6)
    ds = ItemBatches(sampler, 8, batch_size=12, images_per_item=3, images_per_epoch=30)  # 3 batches an epoch
    got = batches(ds, 6, form)
    for epoch in range(2):
        drawn = sampler.batches(epoch, 3, 12, 3)
        for b in range(3):
            images, target = got[3 * epoch + b]
            assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8 and target.shape == (12, 13)
            assert (target[:, 0] == np.arange(12)).all()  # each row's position, for a replica's share
            assert (target[:, 1:] == sampler.relations(drawn[b])).all()
            for k in (0, 5, 11):
                assert (images[k] == decode_image(catalog.paths[drawn[b][k]], 8)).all()
    cached = ItemBatches(sampler, 8, batch_size=12, images_per_item=3, images_per_epoch=30, cache="memory",
                         start_epoch=1)
    assert same_batches(batches(cached, 3, form), got[3:])


def test_the_shards_of_a_stream_are_the_slices_of_its_batches_in_order(catalog):
    sampler = PKSampler(catalog, seed=7)
    whole = batches(ItemBatches(sampler, 8, batch_size=12, images_per_epoch=24), 3, "tf.data")
    shards = [batches(ItemBatches(sampler, 8, batch_size=12, images_per_epoch=24, shard=(i, 3)), 3) for i in range(3)]
    for b, (x, y) in enumerate(whole):
        assert (np.concatenate([s[b][0] for s in shards]) == x).all()
        assert (np.concatenate([s[b][1] for s in shards]) == y).all()  # positions and relations: the whole batch's
        assert shards[2][b][1].shape == (4, 13) and (shards[2][b][1][:, 0] == [8, 9, 10, 11]).all()
    drawn = PairSampler(catalog, seed=7)
    pairs = take(PairBatches(drawn, 8, batch_size=6, pairs_per_epoch=12), 2)
    halves = [take(PairBatches(drawn, 8, batch_size=6, pairs_per_epoch=12, shard=(i, 2)), 2, "tf.data")
              for i in range(2)]
    for b, (a, other, same) in enumerate(pairs):
        for n, want in enumerate((a, other, same)):
            assert (np.concatenate([h[b][n] for h in halves]) == want).all()
    with pytest.raises(SiameseError, match=r"n dividing the batch size 12. Received: \(0, 5\)"):
        ItemBatches(sampler, 8, batch_size=12, shard=(0, 5))
    with pytest.raises(SiameseError, match=r"0 <= i < n .* Received: \(2, 2\)"):
        PairBatches(drawn, 8, batch_size=12, shard=(2, 2))


KILLED = """
import json, os, signal, sys
from siamese.catalog import load_catalog
from siamese.tfdata import image_dataset
labeled, image_dir, out = sys.argv[1:]
next(iter(image_dataset(load_catalog(labeled, image_dir), 8, batch_size=8, workers=2)))
parents = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        pass
family, generation = [], [os.getpid()]
while generation:
    generation = [pid for pid, parent in parents.items() if parent in generation]
    family += generation
with open(out, "w") as f:
    json.dump(family, f)
os.kill(os.getpid(), signal.SIGKILL)
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie no one has reaped yet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_decoding_processes_end_when_their_parent_is_killed(digits, tmp_path):
    out = tmp_path / "family.json"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(  # no pipes: an orphan holding one would keep run() waiting
        [sys.executable, "-c", KILLED, str(digits / "test.json"), str(digits), str(out)], cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, timeout=120)
    assert child.returncode == -signal.SIGKILL
    family = json.loads(out.read_text())
    assert len(family) >= 4  # the forkserver, the resource tracker and the two workers
    deadline = time.monotonic() + 5
    while any(map(running, family)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in family if running(pid)]
    for pid in left:  # a failed run leaves no orphans behind it
        os.kill(pid, signal.SIGKILL)
    assert left == []
