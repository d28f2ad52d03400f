"""Small helpers every layer uses: counts in words, CPUs, a parallel map with a progress bar, the cache folder, the
time stamps written into records. It imports nothing of siamese, so any module may import it."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def plural(n: int, noun: str) -> str:
    """`plural(1, "image")` is "1 image", `plural(3, "image")` is "3 images" (for messages)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def usable_cpus() -> int:
    """CPUs this process may run on (respects `taskset` and container CPU sets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(
    fn: Callable, args: list, *, workers: int | None = None, progress: bool = True, desc: str = ""
) -> Iterator:
    """Yield `fn(a)` for each of `args` in order, computed on threads (Pillow releases the GIL while
    decoding), with a progress bar. `workers` defaults to `usable_cpus()`."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers or usable_cpus()) as pool:
        yield from tqdm(pool.map(fn, args), total=len(args), desc=desc, unit="img", disable=not progress,
                        leave=False)


def cache_dir() -> Path:
    """Where siamese keeps caches: $SIAMESE_CACHE_DIR, else $XDG_CACHE_HOME/siamese, else ~/.cache/siamese."""
    if os.environ.get("SIAMESE_CACHE_DIR"):
        return Path(os.environ["SIAMESE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siamese"


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (e.g. "2026-12-01T19:55:46+00:00"), as records write it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
