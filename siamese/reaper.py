"""Kill a local Ray's processes once the run that started them ends, however it ends (Linux).

Run as a script, `python reaper.py MARK RUN_PID`, with a pipe from the run on stdin; the run's end (even a
SIGKILL) closes the pipe. While the run lives, the reaper notes each process that carries `SIAMESE_RAY_OWNER=MARK`
in its environment, and each process below a noted one: raylet starts Ray's agents without the run's environment,
and once raylet dies with the run they outlive it by minutes, retrying a dead GCS. When the pipe closes, it kills
every noted process until none is left (at most 10 s), as raylet may start its agents again while it dies. It
imports nothing from siamese, so it starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

OWNER = "SIAMESE_RAY_OWNER"
"""The environment variable that marks the processes of a local Ray a run started (they inherit it)."""


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every process that has not ended (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(name)] = int(fields[1]), fields[19]
    return table


def carries(pid: int, mark: bytes) -> bool:
    """Whether process `pid` started with `mark` (b"NAME=VALUE") in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:
        return False


def note(known: dict[int, str], mark: bytes, run: int) -> dict[int, tuple[int, str]]:
    """Add to `known` ({pid: start time}) the marked processes and those below a known one; returns the table."""
    table = processes()
    for pid, start in list(known.items()):
        if table.get(pid, (0, ""))[1] != start:
            del known[pid]  # it ended; its pid may be another process's now
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = [*known, *(pid for pid in table if pid not in known and pid != run and carries(pid, mark))]
    while todo:  # the marked and the known, then everything below them
        pid = todo.pop()
        known.setdefault(pid, table[pid][1])
        todo += [child for child in children.get(pid, ()) if child not in known and child != run]
    return table


def reap(mark: bytes, run: int, stdin: int = 0, sweep: float = 0.5, after: float = 10.0) -> None:
    """Note Ray's processes every `sweep` seconds until `stdin` closes, then kill them until none is left, for at
    most `after` seconds."""
    known: dict[int, str] = {}
    while True:
        note(known, mark, run)
        if select.select([stdin], [], [], sweep)[0] and not os.read(stdin, 4096):
            break
    deadline = time.monotonic() + after
    while time.monotonic() < deadline:
        note(known, mark, run)
        if not known:
            return
        for pid in known:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(sweep)


if __name__ == "__main__":
    reap(f"{OWNER}={sys.argv[1]}".encode(), int(sys.argv[2]))
