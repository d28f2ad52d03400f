"""Atomic file and folder writes, and output-folder locks: a crash or a second run leaves the old output whole,
never a half-written or mixed one."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    `suffix` keeps an extension on the temporary name for writers that look at it (e.g. `.npy`).
    On any error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON to `path` atomically, indented by `indent` (default 2; None: on one line, several
    times faster for a large record). NaN and infinities are refused (ValueError): they are not JSON, and most
    readers reject them."""
    compact = None if indent else (",", ":")
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False, separators=compact)
    write_bytes(path, (text + "\n").encode("utf-8"))


_held: dict[Path, int] = {}
"""Lock files this process holds, with how many times: a run that holds one may take it again."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output file or folder: beside it (`.NAME.lock`), so swapping a folder keeps the lock."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.lock"


@contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of `output`, a file or folder a run writes (see `lock_path`), while the block runs.

    A second run on the same output fails at once with a `SiameseError` naming it and the pid that holds
    it. Creating the lock file also shows, before any long work, that the output's folder can be written. The
    lock is an `flock`, which dies with its process however it dies; the lock file is removed on release.
    The same process may take a lock it holds again. Folders made for the lock file are removed when left empty.
    """
    path = lock_path(output)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(path, output)
    except BaseException:
        _remove_empty(created)
        raise
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        path.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _lock(path: Path, output: str | os.PathLike) -> int:
    """Open and flock the lock file `path` of `output`, write this pid into it, and return its descriptor."""
    from siamese.errors import SiameseError

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SiameseError(
                f"{Path(output)} is being written by another run (pid {holder}). Expected one run at a time on "
                "an output. Fix: wait for that run to finish, or write somewhere else."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:  # e.g. a full disk: ours to remove, as we hold it
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return fd


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created (innermost first) that are still empty: a failed run leaves none."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def claim_folder(folder: str | os.PathLike, owned: Callable[[Path], set[str] | None], kind: str) -> Iterator[Path]:
    """Hold the lock of the output `folder` (`output_lock`) and check that it is new, empty, or holds only the
    names `owned(folder)` returns (None: nothing a run of ours wrote), so that writing it over whole (e.g. with
    `replace_folder`) deletes no one's files. `kind` says what goes there in messages (e.g. "an index"). Take it
    before long work, so a folder that cannot be written is refused first."""
    from siamese.errors import SiameseError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SiameseError(f"Expected a folder to write {kind} to. Received: {folder}, which is a file. Fix: choose "
                           "a new folder.")
    with output_lock(folder):
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        ours = owned(folder) if entries else set()
        foreign = [name for name in entries if ours is None or name not in ours]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3:,} more" if len(foreign) > 3 else "")
            raise SiameseError(f"Expected a new or empty folder, or one that holds only {kind} siamese wrote. "
                               f"Received: {folder}, which holds other files ({shown}). Fix: write {kind} to a new "
                               "folder; it is written over whole, which would delete them.")
        yield folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


@contextmanager
def replace_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh, empty folder beside `folder`; when the block succeeds it takes `folder`'s place whole.

    The swap is one atomic rename where the system has one (Linux), so readers see the old folder or the new one,
    never a mix; the old one is then deleted. On any error the new folder is deleted and `folder` is untouched.
    Folders left beside `folder` by a killed run (`.NAME.partial-*`) are removed first. Hold `output_lock`.
    """
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    os.chmod(new, folder.stat().st_mode & 0o7777 if folder.is_dir() else 0o777 & ~_umask())
    try:
        yield new
        _fsync_folder(new)
        if not folder.exists():
            os.rename(new, folder)
        elif not _exchange(new, folder):
            old = new.with_name(f"{new.name}-old")
            os.rename(folder, old)
            os.rename(new, folder)
            new = old
        _fsync_folder(folder.parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """fsync a folder's entry list, so the renames into it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
