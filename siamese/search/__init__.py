"""Nearest-neighbour search of a collection: `Index` (rows, metadata and an `Engine`), the engines by name
(`ENGINES`: balltree and brute are exact, hnsw and faiss approximate), the exact-kNN kernel, the index's folder
and shard merging. Imports numpy only; each engine imports its library when built or read.

A new engine: subclass `Engine` and decorate it with `@register_engine("name")` (see `siamese.search.engine`).
An engine of this package is registered when its module is imported: add its one import line below.
"""

# registration order is the order of `--engine`'s choices, the first the default: the original's, exact, approximate
from siamese.search.balltree import BallTree  # noqa: I001
from siamese.search.brute import Brute
from siamese.search.hnsw import Hnsw
from siamese.search.faiss import Faiss
from siamese.search.engine import ALIASES, ENGINES, Engine, Knob, Setting, engine_class, make_engine, register_engine
from siamese.search.index import Index, Match
from siamese.search.merge import merge_parts
from siamese.search.folder import claim_output, index_files, refuse_part_output

__all__ = ["ALIASES", "ENGINES", "BallTree", "Brute", "Engine", "Faiss", "Hnsw", "Index", "Knob", "Match", "Setting",
           "claim_output", "engine_class", "index_files", "make_engine", "merge_parts", "refuse_part_output",
           "register_engine"]
