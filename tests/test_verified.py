"""Loading a large index reads its files in full only where they changed since this user's last full check of them
(`siamese.search.verified`): a tampered file is still refused, even with its modification time set back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import siamese.search.folder as folder
import siamese.search.verified
from siamese.errors import SiameseError
from siamese.search import Index
from tests.test_index import random_index


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files loading reads in full (any size counts as large), by name."""
    monkeypatch.setattr(siamese.search.verified, "VERIFY_BYTES", 1)
    names: list[str] = []
    sha256_of, norms = folder.sha256_of, folder.squared_norms
    monkeypatch.setattr(folder, "sha256_of", lambda path: names.append(path.name) or sha256_of(path))
    monkeypatch.setattr(folder, "squared_norms", lambda x: names.append("embeddings pass") or norms(x))
    return names


def saved(tmp_path: Path, reads: list[str]) -> Path:
    random_index(n=2000, engine="faiss").save(tmp_path / "index")
    reads.clear()  # saving hashes what it writes
    return tmp_path / "index"


def test_a_load_reads_no_large_file_that_did_not_change_since_it_was_written_or_checked(tmp_path, reads, cache_dir):
    directory = saved(tmp_path, reads)
    want = Index.load(directory).kneighbors(np.eye(16, dtype=np.float32)[:3], 5)
    assert reads == []  # saving hashed what it wrote: that is the full check
    shutil.rmtree(cache_dir / "verified")  # another user, or a cleared cache: every file read
    Index.load(directory)
    assert {n.split("-")[0] for n in reads} == {"rows", "engine", "embeddings pass"}
    reads.clear()
    got = Index.load(directory).kneighbors(np.eye(16, dtype=np.float32)[:3], 5)
    assert reads == []
    np.testing.assert_array_equal(got[1], want[1])
    os.utime(next(directory.glob("rows-*")))  # touched: read again, the others not
    Index.load(directory)
    assert [n.split("-")[0] for n in reads] == ["rows"]


def test_a_copied_folder_is_read_in_full(tmp_path, reads):
    directory = saved(tmp_path, reads)
    Index.load(directory)
    shutil.copytree(directory, tmp_path / "copy")
    reads.clear()
    Index.load(tmp_path / "copy")
    assert {n.split("-")[0] for n in reads} == {"rows", "engine", "embeddings pass"}


@pytest.mark.parametrize("stem", ["embeddings", "rows", "engine"])
def test_a_file_tampered_after_its_check_is_refused_even_with_its_times_set_back(tmp_path, reads, stem):
    directory = saved(tmp_path, reads)
    Index.load(directory)  # checked in full, and recorded
    path = next(directory.glob(f"{stem}-*"))
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # in place: the same size and inode
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # its modification time as it was
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_ino == before.st_ino
    with pytest.raises(SiameseError, match=rf"{path.name} .*(SHA-256 mismatch|not L2-normalised)"):
        Index.load(directory)
