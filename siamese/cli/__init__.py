"""The command line: `python utilities.py COMMAND ...` or `python -m siamese COMMAND ...`.

One module per command, in `COMMANDS`: each has a `NAME`, `TENSORFLOW` (whether it needs TensorFlow, which is
then imported quietly before it runs), `register(commands)` that adds its parser, and `run(args)`. Errors the
user can fix print one line to stderr (a list, one per line, where there are several) and exit 2, with the
library's parameter names (`leaf_size`) given as the command's flags (--leaf-size); `validate` exits 1 when the
catalog has problems.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from siamese import __version__
from siamese.cli.common import Parser, translate
from siamese.config import BACKENDS
from siamese.errors import SiameseError, os_error_message

COMMANDS = ("validate", "train", "export", "embed", "index", "merge_index", "query", "serve", "similarity", "evaluate",
            "make_dataset", "demo")
"""The command modules of `siamese.cli`, in the order of the job (and of --help)."""

ORIGINAL_EXPORTS = {"savedmodel": "export", "balltree": "index"}
"""The original toolkit's `--export WHAT` spelling, and the command each one is."""


def _modules() -> dict:
    """{command name: its module}."""
    modules = [importlib.import_module(f"siamese.cli.{name}") for name in COMMANDS]
    return {m.NAME: m for m in modules}


def _original_syntax(argv: list[str], parser: Parser) -> list[str]:
    """Rewrite the original's `--export savedmodel ...` / `--export balltree ...` as `export ...` / `index ...`."""
    if argv and argv[0] in parser.commands:
        return argv
    for n, arg in enumerate(argv):
        if arg == "--export" or arg.startswith("--export="):
            what = arg.partition("=")[2] if "=" in arg else (argv[n + 1] if n + 1 < len(argv) else "")
            rest = argv[:n] + argv[n + (1 if "=" in arg else 2) :]
            if what not in ORIGINAL_EXPORTS:
                parser.error(f"Expected --export {' or '.join(ORIGINAL_EXPORTS)}. Received: --export {what!r}")
            return [ORIGINAL_EXPORTS[what], *rest]
    return argv


def build_parser(prog: str = "utilities.py") -> argparse.ArgumentParser:
    """The whole command line, called `prog` in its messages; its sub-parsers are in `parser.commands` by name."""
    parser = Parser(
        prog=prog,
        description="siamese: train siamese CNNs for image similarity, export them, index and query a catalog.",
        epilog="The original toolkit's spellings work too: `--export savedmodel ...` is `export ...`, "
        "`--export balltree ...` is `index ...`.",
    )
    parser.add_argument("--version", action="version", version=f"siamese {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.commands = {}
    for name, module in _modules().items():
        sub = module.register(commands)
        sub.set_defaults(tensorflow=module.TENSORFLOW)
        parser.commands[name] = sub
    return parser


def _choose_backend(args: argparse.Namespace) -> str:
    """The Keras backend of the command, set in KERAS_BACKEND (read once, when keras is first imported) and in
    `args.backend`: train's --backend, else $KERAS_BACKEND, else tensorflow; TensorFlow for every other command,
    which loads checkpoints of either backend."""
    backend = "tensorflow"
    if hasattr(args, "backend"):
        args.backend = backend = args.backend or os.environ.get("KERAS_BACKEND") or backend
        if backend not in BACKENDS:
            raise SiameseError(f"Expected KERAS_BACKEND to be one of {', '.join(BACKENDS)}. Received: {backend!r}. "
                               "Fix: pass --backend, or unset KERAS_BACKEND.")
    os.environ["KERAS_BACKEND"] = backend
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise SiameseError(f"Expected Keras to run on {backend}. Received: keras is imported already, running on "
                               f"{keras.backend.backend()}. Fix: call the command in a fresh Python process.")
    return backend


def _import_tensorflow_quietly(backend: str) -> None:
    """Import Keras and TensorFlow with TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hidden.

    TF 2.21 logs it through absl before logging is set up, which TF_CPP_MIN_LOG_LEVEL no longer silences, so
    stderr is pointed at /dev/null for the import only. Python errors still surface; set TF_CPP_MIN_LOG_LEVEL=0
    to see everything (any other value is no request to see it: importing jax, which TensorFlow does when it is
    installed, sets 1 for child processes too). On the jax `backend` TensorFlow only writes the TensorBoard
    logs: it may be missing (`siamese.distribute` keeps it off JAX's GPUs).
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        import keras  # noqa: F401

        try:
            import tensorflow as tf
        except ImportError:
            if backend == "tensorflow":
                raise
            return
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")  # e.g. "triggered tf.function retracing": advice for TF developers


def main(argv: Sequence[str] | None = None, prog: str = "utilities.py") -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`), called `prog` in its messages (default
    utilities.py, the original's name); return the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(_original_syntax(list(sys.argv[1:] if argv is None else argv), parser))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.command_parser = command = parser.commands[args.command]
    if hasattr(args, "no_progress") and not (sys.stdout.isatty() and sys.stderr.isatty()):
        args.no_progress = True  # a log file, not a terminal: no redrawn bars (train prints one line an epoch)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {translate(str(message), command)}",
                                                               file=sys.stderr)
        try:
            if args.tensorflow:
                _import_tensorflow_quietly(_choose_backend(args))
            return args.run(args)
        except SiameseError as e:
            print(f"{parser.prog}: error: {translate(str(e), command)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # e.g. `... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as e:  # a full disk, a read-only folder, a name too long: one line, not a traceback
            print(f"{parser.prog}: error: {os_error_message(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130


def console() -> int:
    """The `siamese` command that `pip install` puts on the PATH: the same command line, called siamese."""
    return main(prog="siamese")
