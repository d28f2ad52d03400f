"""Write docs/cli.md from the command line's argparse parsers, or check that it is up to date.

    python docs/cli_reference.py            # writes docs/cli.md
    python docs/cli_reference.py --check    # exits 1 with one line if docs/cli.md is out of date

It reads `siamese.cli.build_parser()` and walks its subcommands through argparse's structure
(`_subparsers._group_actions`, `_action_groups`, `_actions`), so argument groups, when a command has them,
become sub-headings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"

HEADER = """# Command line reference

Every command of `python utilities.py` (the same as `python -m siamese`), generated from the argparse
parsers by `python docs/cli_reference.py`; do not edit by hand. Back to the [README](../README.md).
"""


def _parser() -> argparse.ArgumentParser:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from siamese.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> tuple[argparse.Action | None, dict]:
    """The subparsers action and its {name: parser}, in the order they were added."""
    subparsers = getattr(parser, "_subparsers", None)
    if subparsers is None:
        return None, {}
    for action in subparsers._group_actions:
        if isinstance(action, argparse._SubParsersAction):
            return action, dict(action.choices)
    return None, {}


def _help(action: argparse.Action, prog: str) -> str:
    """The action's help with %(default)s and the like filled in, as --help prints it."""
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        for key in ("choices",):
            if params.get(key) is not None:
                params[key] = ", ".join(map(str, params[key]))
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text = text % params
    return " ".join(text.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"``{text}``"


def _flags(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    """The option as --help shows it (e.g. `--on-bad-image {fail,skip}`)."""
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        return _code(parser._get_formatter()._format_action_invocation(action))
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            if isinstance(metavar, tuple):
                metavar = " ".join(metavar)
            if action.nargs in ("*", "+"):
                metavar += " ..."
            names += f" {metavar}"
        return _code(names)
    metavar = action.metavar or action.dest
    return _code(f"{metavar} ..." if action.nargs in ("*", "+") else str(metavar))


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return ""
    value = action.default
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return _code(str(value))


def _row(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    choices = ", ".join(map(str, action.choices)) if action.choices and not isinstance(action.choices, dict) else ""
    required = "yes" if action.required else ""
    cells = [_flags(action, parser), _cell(_help(action, parser.prog)), _default(action), _cell(choices), required]
    return "| " + " | ".join(cells) + " |"


def _table(actions: list[argparse.Action], parser: argparse.ArgumentParser) -> list[str]:
    lines = ["| argument | help | default | choices | required |", "|---|---|---|---|---|"]
    lines += [_row(a, parser) for a in actions]
    return lines


def _shown(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(
        action, (argparse._HelpAction, argparse._SubParsersAction)
    )


def _arguments(parser: argparse.ArgumentParser, level: str) -> list[str]:
    """The parser's arguments: one table per argument group that has any."""
    lines: list[str] = []
    groups = [g for g in getattr(parser, "_action_groups", []) if any(_shown(a) for a in g._group_actions)]
    seen: set[int] = set()
    default_titles = {"positional arguments", "options", "optional arguments"}
    for group in groups:
        actions = [a for a in group._group_actions if _shown(a)]
        seen.update(id(a) for a in actions)
        if group.title and group.title not in default_titles:
            lines += ["", f"{level} {group.title}"]
            if group.description:
                lines += ["", " ".join(group.description.split())]
        lines += ["", *_table(actions, parser)]
    rest = [a for a in parser._actions if _shown(a) and id(a) not in seen]
    if rest:
        lines += ["", *_table(rest, parser)]
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/cli.md's text for `parser` (default: `siamese.cli.build_parser()`)."""
    # argparse wraps usage lines at the terminal's width: fix it, so the file is the same everywhere
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _render(parser or _parser())
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def _render(parser: argparse.ArgumentParser) -> str:
    lines = [HEADER.rstrip("\n"), ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    if parser.epilog:
        lines += [" ".join(parser.epilog.split()), ""]
    action, commands = _subcommands(parser)
    helps = {a.dest: a.help for a in action._choices_actions} if action else {}
    if commands:
        lines += ["| command | what it does |", "|---|---|"]
        lines += [f"| [`{name}`](#{name}) | {_cell(helps.get(name) or '')} |" for name in commands]
        lines += [""]
    lines += ["## Options of every command", *_arguments(parser, "###"), ""]
    for name, sub in commands.items():
        lines += [f"## {name}", "", f"```\n{sub.format_usage().strip()}\n```"]
        if sub.description:
            lines += ["", " ".join(sub.description.split())]
        lines += [*_arguments(sub, "###"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def check(path: Path = CLI_MD) -> str | None:
    """None when `path` matches the parsers, else a one-line message saying how to fix it."""
    expected = render()
    actual = path.read_text(encoding="utf-8") if path.exists() else None
    if actual == expected:
        return None
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{name} is out of date with siamese/cli.py: run `python docs/cli_reference.py`"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    options = args.parse_args(argv)
    if options.check:
        problem = check()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(render(), encoding="utf-8")
    print(f"Wrote {CLI_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
