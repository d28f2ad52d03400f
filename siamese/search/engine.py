"""The `Engine` every search engine of `siamese.search.Index` is, and the registry of them by name.

An engine is made with its build settings (`Hnsw(m=16)`), then built by the index from the (possibly
memory-mapped) embeddings. Register a new one with `@register_engine`: `Index`, its folder format and the
`index` / `merge-index` / `query` commands (its `--engine` choice and its `settings` as flags) then know it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from siamese.config import Setting
from siamese.errors import SiameseError
from siamese.search.kernel import squared_norms


@dataclass(frozen=True)
class Knob:
    """The query-time setting of an approximate engine, which trades speed for recall: `name` (its flag, e.g.
    "ef"), `takes` (the indexes that take it, for errors, e.g. "an hnsw index"), `help` (its flag's help) and
    `tune_from` (the first value tried when tuning it for recall; default 1)."""

    name: str
    takes: str
    help: str
    tune_from: int = 1


class Engine(ABC):
    """Nearest-neighbour search over unit vectors answering Euclidean distances.

    Class attributes: `name` (set by `register_engine`); `summary`, a few words for `--engine`'s help;
    `settings`, the build settings the command line shows;
    `suffix`, the file of an engine that is read back rather than rebuilt (None: rebuilt from the embeddings);
    `knob`, the query-time setting of an approximate engine (a `Knob`; None for exact engines).
    Instances hold `params`, what index.json records of the engine, and `description`, the engine in words.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()
    suffix: ClassVar[str | None] = None
    knob: ClassVar[Knob | None] = None
    target_recall: float = 0.99
    knob_default: int | None = None
    """The query-time `knob` given at build time (None: tuned for `target_recall`, see `siamese.search.tuning`)."""

    def __init__(self) -> None:
        self.params: dict = {}

    @abstractmethod
    def build(self, embeddings: np.ndarray, held: np.ndarray, half_norms: np.ndarray) -> None:
        """Build from `embeddings` (unit rows, maybe memory-mapped; `half_norms` their |row|^2 / 2). An engine
        with a `knob` leaves out the sorted rows `held` if it is approximate once built (`knob_range` not None;
        they are `add`ed after tuning); one exact after all (faiss below its IVF size) holds every row."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, knob: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(distances float32, indices int64), each (queries, k), nearest first; -1 where fewer than k are found.
        `knob`: the value of the query-time setting (None for exact engines)."""

    @property
    def knob_range(self) -> tuple[int, int] | None:
        """The values `knob` may take once built; None for an exact engine (nothing held out, nothing tuned)."""
        return None

    def check_fits(self, rows: int, dim: int) -> None:
        """Refuse, before any embedding is computed or read, settings that cannot hold `rows` rows of `dim`
        dimensions (faiss's `max_memory`). Default: anything fits."""
        return None

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        """Add the sorted `rows` of `embeddings` (the held-out ones, after tuning)."""
        raise NotImplementedError(f"{self.name} holds every row once built")

    def write(self, path: Path) -> None:
        """Write the engine's own file (engines with a `suffix`)."""
        raise NotImplementedError(f"{self.name} is rebuilt from the embeddings, not written")

    @classmethod
    def read(cls, path: Path | None, embeddings: np.ndarray, params: dict) -> Engine:
        """The engine index.json's `params` describe over `embeddings`: read from `path` (engines with a
        `suffix`; ValueError, RuntimeError, KeyError or TypeError when it disagrees) or rebuilt (`path` None;
        ValueError naming a bad setting). Default: rebuilt with those of its `settings` that `params` records."""
        engine = cls(**{s.name: params[s.name] for s in cls.settings if s.name in params})
        engine.build(embeddings, np.empty(0, np.int64), (0.5 * squared_norms(embeddings)).astype(np.float32))
        return engine

    @property
    def description(self) -> str:
        """The engine in words, e.g. "hnsw (M 16, ef_construction 200, ef 64)"."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} engine: {self.description}>"

    def build_settings(self) -> dict:
        """The values of `settings`: what a rebuild of this engine (e.g. a merge of shard parts) keeps."""
        return {s.name: getattr(self, s.name) for s in self.settings}

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> Engine:
        """An engine of the entries of `settings` that are among its `settings` (the command line gives all)."""
        return cls(**{s.name: settings[s.name] for s in cls.settings if settings.get(s.name) is not None})

    def check_knob(self, name: str, value: int) -> None:
        """Refuse the query-time setting `name` (e.g. "ef") if this engine does not take it, or `value` out of range."""
        if self.knob is None or name != self.knob.name or self.knob_range is None:
            owners = [e.knob.takes for e in ENGINES.values() if e.knob and e.knob.name == name]
            if not owners:
                raise SiameseError(f"Expected a query-time setting among {', '.join(knobs())}. Received: {name}")
            raise SiameseError(f"Expected `{name}` only with {' or '.join(owners)}. Received: `{name}={value}` "
                               f"for a {self.description} index. Fix: leave out `{name}`.")
        low, high = self.knob_range
        if not low <= value <= high:
            raise SiameseError(f"Expected {low} <= `{name}` <= {high} for this {self.description} index. "
                               f"Received: {value}")


def check_at_least(name: str, value: int, least: int = 1) -> None:
    """Refuse a setting `name` below `least` (an engine's constructor)."""
    if not isinstance(value, int) or value < least:
        raise SiameseError(f"Expected `{name}` >= {least}. Received: {value!r}")


def check_target_recall(value: float) -> None:
    if not 0 < value <= 1:
        raise SiameseError(f"Expected 0 < `target_recall` <= 1. Received: {value}")


ENGINES: dict[str, type[Engine]] = {}
"""Every engine by name, in registration order (the first is the default of `Index`)."""
ALIASES: dict[str, str] = {}
"""Other names of engines (e.g. "ball_tree"), accepted by `engine_class`."""


def register_engine(name: str, *aliases: str):
    """Class decorator: register an `Engine` subclass as `name` (and `aliases`), setting its `name`."""

    def register(cls: type[Engine]) -> type[Engine]:
        cls.name = name
        ENGINES[name] = cls
        ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return register


def engine_class(name: str) -> type[Engine]:
    """The registered engine `name` (or alias)."""
    cls = ENGINES.get(ALIASES.get(name, name))
    if cls is None:
        raise SiameseError(f"Expected `engine` to be one of {', '.join(ENGINES)}. Received: {name!r}. Fix: pass a "
                           "registered name or an Engine (see siamese.search.register_engine).")
    return cls


def make_engine(engine: str | Engine, **settings) -> Engine:
    """`engine` itself, or a new engine of the registered name `engine` made with `settings` (its keyword
    arguments; default: its defaults)."""
    if isinstance(engine, Engine):
        if settings:
            raise SiameseError(f"Expected settings with an engine name, not with an engine. Received: {engine.name} "
                               f"and {', '.join(settings)}. Fix: pass them to the engine's class.")
        return engine
    return engine_class(engine)(**settings)


def knobs() -> list[str]:
    """The query-time settings of the registered engines (e.g. ef, nprobe), once each."""
    return list(dict.fromkeys(e.knob.name for e in ENGINES.values() if e.knob))
