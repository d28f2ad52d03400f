"""Which large files of an index folder this user has checked in full on this machine, so that loading an index of
a hundred million rows does not hash its 50 GB each time.

Loading checks every file of an index against the SHA-256 that index.json records (see `siamese.search.folder`),
which reads every byte: about 1.8 GB/s on one core, so 3 s for ten million 128-d rows and 30 s for a hundred
million. A file of at least VERIFY_BYTES is read in full the first time; the check's result is recorded in this
user's cache (`siamese.util.cache_dir()/verified`) with the file's stamp: size, modification and status-change
times in ns, inode and device. A later load reads the file again unless the stamp and the SHA-256 index.json
records are those of the check. Any write to a file, or a file put in its place, changes its status-change time
(ctime), which no program can set back (`touch` and `os.utime` set it to now); so a tampered file is still
refused, by a full check. A copied or moved folder is checked again in full.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from siamese import atomic
from siamese.util import cache_dir

VERIFY_BYTES = 1 << 26
"""Files of at least this size (64 MiB) are read in full only when their stamp changed; smaller ones every time."""


def stamp(path: Path) -> list[int]:
    """What any write to `path` changes: [size, mtime in ns, ctime in ns, inode, device]."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class Verified:
    """The record of the full checks of the index folder `directory`'s large files (see the module docstring):
    `current(path, sha256)` says whether one may skip reading `path` again; `passed(path, sha256, stamp)` records
    a full check that found `sha256` (the stamp taken before reading); `save()` writes the record of this load,
    forgetting files no longer checked, and costs only a full check next time when it cannot write."""

    def __init__(self, directory: Path):
        key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:24]
        self.path = cache_dir() / "verified" / f"{key}.json"
        self.directory = str(directory.resolve())
        self.seen: dict[str, dict] = {}
        self.now: dict[str, dict] = {}
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            if record.get("version") == 1 and record.get("directory") == self.directory:
                self.seen = {k: v for k, v in record["files"].items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no record, or an unreadable one: check in full

    def current(self, path: Path, sha256: str | None) -> bool:
        """Whether `path` is large and was checked in full with its stamp as it is now and `sha256` as found."""
        try:
            now = stamp(path)
        except OSError:
            return False
        entry = self.seen.get(path.name)
        if now[0] < VERIFY_BYTES or entry is None or sha256 is None or entry != {"sha256": sha256, "stamp": now}:
            return False
        self.now[path.name] = entry
        return True

    def passed(self, path: Path, sha256: str, before: list[int]) -> None:
        """Record that a full check of `path`, whose stamp was `before` when the check began, found `sha256`."""
        if before[0] >= VERIFY_BYTES:
            self.now[path.name] = {"sha256": sha256, "stamp": before}

    def save(self) -> None:
        if self.now == self.seen:
            return
        with contextlib.suppress(OSError):  # a read-only cache only costs a full check next time
            atomic.write_json(self.path, {"version": 1, "directory": self.directory, "files": self.now})
