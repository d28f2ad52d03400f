"""Errors a user can fix: the CLI prints their message on one line and exits 2."""

from __future__ import annotations

import errno


class SiameseError(ValueError):
    """A problem with the user's input, settings or files; the message names the file and the fix."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full. Fix: free some space there, or write to another disk",
    errno.EDQUOT: "the disk quota is used up. Fix: free some space there, or write to another disk",
    errno.EROFS: "the file system is read-only. Fix: write to a folder on a writable disk",
    errno.EACCES: "permission denied. Fix: use a folder you may write to, or change its permissions",
    errno.EPERM: "operation not permitted. Fix: use a folder you may write to, or change its permissions",
    errno.ENAMETOOLONG: "the name is too long for the file system. Fix: use a shorter path",
    errno.ELOOP: "a symlink loop. Fix: point the link at a real file or folder",
    errno.ENOENT: "no such file or folder. Fix: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder. Fix: check the path",
    errno.EISDIR: "a folder, where a file was expected. Fix: name a file",
    errno.EEXIST: "it already exists. Fix: choose another path, or remove it",
    errno.EXDEV: "not on the same disk as its destination. Fix: write beside it",
}


def os_error_message(e: OSError) -> str:
    """One line for an everyday I/O error: the path, what went wrong, and the fix (see _OS_FIXES)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = _OS_FIXES.get(e.errno) or f"{e.strerror or e}".strip()
    return f"{paths}: {what}" if paths else f"{type(e).__name__}: {what}"
