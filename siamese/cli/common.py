"""What several commands share: the parser class, argument groups, deprecated spellings, translation of library
messages into flags, and the embedder and engine a command's flags name."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from siamese.config import BACKBONES, PRETRAINED_BACKBONE
from siamese.util import plural

NO_PROGRESS = "hide progress bars (hidden anyway when the output is not a terminal)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and old spellings of options (`deprecated`) that still work, hidden."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed: dict[str, str] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.renamed and args is not None:
            args = [self._respell(arg) for arg in args]
        return super().parse_known_args(args, namespace)

    def _respell(self, arg: str) -> str:
        old, eq, value = arg.partition("=")
        if old not in self.renamed:
            return arg
        print(f"{self.prog}: warning: {old} is deprecated; use {self.renamed[old]}", file=sys.stderr)
        return f"{self.renamed[old]}{eq}{value}"


def deprecated(parser: Parser, action: argparse.Action, *old: str) -> None:
    """Accept the `old` spellings of the option `action` too, hidden from --help, with a deprecation note."""
    parser.renamed.update(dict.fromkeys(old, action.option_strings[0]))


def flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{Python parameter: its flag} of a command's parser, e.g. {"leaf_size": "--leaf-size"}; engine settings and
    query knobs (dests `engine_NAME`, `knob_NAME`) by NAME."""
    table = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
            for name in (action.dest, action.dest.removeprefix("engine_").removeprefix("knob_")):
                table.setdefault(name, flag)
    return table


_PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def translate(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message in the command line's words: `` `leaf_size` `` becomes --leaf-size,
    `` `weights='none'` `` becomes --weights none and `` `replace=True` `` --replace, for the parameters `parser`
    has a flag for."""
    table = flags(parser)

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in table:
            return match[0]
        return table[name] if value in (None, "True") else f"{table[name]} {value.strip(chr(39) + chr(34))}"

    return _PARAMETER.sub(flag, message)


def add_catalog_args(p: argparse.ArgumentParser, required: bool = True) -> argparse._ArgumentGroup:
    """The catalog group: --labeled-data, --image-dir (`required`, default True), --on-bad-image, --no-progress."""
    g = p.add_argument_group("catalog")
    g.add_argument("--labeled-data", required=required, metavar="F",
                   help="labeled JSON catalog: {item_id: {images: [{filename}], labels: [...]}}")
    g.add_argument("--image-dir", required=required, metavar="D",
                   help="folder the catalog's filenames are relative to")
    g.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="images that cannot be decoded: fail listing them all (default), or skip them")
    g.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    return g


def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model group: --keras-model, or --backbone, --weights and --image-size of a pretrained one."""
    g = p.add_argument_group("model", "the embedding network: a trained one, or a pretrained ImageNet backbone")
    g.add_argument("--keras-model", metavar="M",
                   help="embedding network written by train (.keras, .h5 or .hdf5); without it, a pretrained "
                   "--backbone embeds the images")
    g.add_argument("--backbone", default=PRETRAINED_BACKBONE, choices=[b for b in BACKBONES if b != "small_cnn"],
                   help=f"without --keras-model: the ImageNet backbone whose pooled features are the embedding "
                   f"(default {PRETRAINED_BACKBONE})")
    g.add_argument("--weights", default="imagenet",
                   help="without --keras-model: imagenet (downloaded once by Keras), none, or a weights file")
    g.add_argument("--image-size", type=int, default=None, help="without --keras-model: input pixels "
                   "(default: the backbone's own)")
    return g


def embedder(args: argparse.Namespace):
    """The `siamese.embed.Embedder` of --keras-model, or of --backbone, --weights and --image-size without one."""
    from siamese.embed import Embedder

    return Embedder.load(args.keras_model, args.backbone, args.weights, args.image_size)


def add_engine_args(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The engine group: `--engine` (one of `siamese.search.ENGINES`) and the build settings every engine declares
    (`Engine.settings`, one flag each); with `inherit` (merge-index) they default to the parts' own."""
    from siamese.search import ENGINES

    g = p.add_argument_group("search engine", "how the index finds neighbours, and its build settings")
    first = next(iter(ENGINES))
    names = "; ".join(f"{name} ({engine.summary})" for name, engine in ENGINES.items())
    g.add_argument("--engine", default=None if inherit else first, choices=list(ENGINES),
                   help=f"{names} (default: {'the parts' if inherit else first})")
    added = set()
    for engine in ENGINES.values():
        for s in engine.settings:
            if s.name in added:
                continue
            added.add(s.name)
            inherited = inherit and s.default is not None  # a default of None is chosen at build time, not inherited
            note = "default: the parts'" if inherited else s.default_text or f"default {s.default}"
            g.add_argument(s.cli_flag, dest=f"engine_{s.name}", type=s.type, metavar=s.metavar or s.name.upper(),
                           default=None if inherit else s.default, help=f"{s.help} ({note})")


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line by `add_engine_args`, by name (e.g. leaf_size)."""
    return {k.removeprefix("engine_"): v for k, v in vars(args).items() if k.startswith("engine_") and v is not None}


def add_knob_args(p: argparse.ArgumentParser) -> None:
    """The query-time setting of each approximate engine (`Engine.knob`, e.g. --ef), once each."""
    from siamese.search import ENGINES

    g = p.add_argument_group("approximate engines", "the query-time trade of speed for recall")
    added = set()
    for engine in ENGINES.values():
        if engine.knob and engine.knob.name not in added:
            added.add(engine.knob.name)
            g.add_argument(f"--{engine.knob.name}", dest=f"knob_{engine.knob.name}", type=int, metavar="N",
                           help=engine.knob.help)


def knobs(args: argparse.Namespace) -> dict:
    """The query-time settings given by `add_knob_args`, by name (e.g. ef)."""
    return {k.removeprefix("knob_"): v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}


def print_index(index, done: str, out: Path) -> None:
    """Print what an index holds, its engine, where it went and, for approximate engines, their recall."""
    from siamese.embed import shown

    source = shown(str(index.model.get("source")))
    print(f"{done} ({index.dim}-d, {index.engine.description}) embedded by {source}: {out}")
    if index.recall:
        knob = f"--{index.engine.knob.name}"
        print(f"Recall@10 {index.recall_at_10:.4f} on {plural(index.recall['queries'], 'held-out image')} "
              f"(target {index.recall['target']}); query with {knob} N to trade speed for recall")
        codes = index.engine.name == "faiss" and index.engine.params.get("family") in ("sq8", "pq")
        if codes and index.recall_at_10 < index.recall["target"] and not index.engine.rerank:
            print(f"Short of the target at any {knob}: the codes alone cannot tell the neighbours apart. Fix: index "
                  "again with --rerank 100 (exact distances of 100 candidates) or a larger --max-memory")
