"""The command line: same CLI from utilities.py and python -m siamese, --help everywhere, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_catalog, write_image

from siamese import cli
from siamese.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def run(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("entry", "name"), [(["utilities.py"], "utilities.py"),
                                             (["-m", "siamese"], "python -m siamese")])
def test_both_entry_points_give_the_same_help_under_their_own_name(entry, name):
    result = run(*entry, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {name} [-h]")
    for command in COMMANDS:
        assert command in result.stdout
    body = result.stdout.split("\n\n", 1)[1]  # after the usage lines, which wrap by the name's length
    assert body == run("utilities.py", "--help").stdout.split("\n\n", 1)[1]


def test_the_installed_command_calls_itself_siamese(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["siamese", "train", "--epochs", "x"])
    with pytest.raises(SystemExit):
        cli.console()
    assert capsys.readouterr().err.splitlines()[-1].startswith("siamese train: error: argument --epochs")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(run_cli, command):
    with pytest.raises(SystemExit) as info:
        run_cli(command, "--help")
    assert info.value.code == 0


def test_usage_errors_are_one_line_exit_2():
    result = run("utilities.py", "validate", "--labeled-data", "x.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "utilities.py validate: error: the following arguments are required: --image-dir "
        "(see utilities.py validate --help)"
    ]


def test_user_errors_print_one_line_and_no_traceback(tmp_path):
    result = run("utilities.py", "validate", "--labeled-data", tmp_path / "missing.json", "--image-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"utilities.py: error: Labeled data file not found: {tmp_path / 'missing.json'}. "
        "Fix: check the --labeled-data path."
    ]
    assert "Traceback" not in result.stderr


def test_validate_lists_every_problem_and_exits_1(tmp_path, run_cli):
    write_image(tmp_path / "a0.png")
    write_image(tmp_path / "a1.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    path = write_catalog(tmp_path, {
        "a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "b": {"images": [{"filename": "../escape.png"}]},
        "c": {"images": [{"filename": "broken.png"}]},
        "d": {"images": [{"filename": "a0.png"}]},
    })
    code, out, err = run_cli("validate", "--labeled-data", path, "--image-dir", tmp_path, "--no-progress")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"error: {path}: item 'b' at $[\"b\"].images[0].filename: filename '../escape.png'")
    assert lines[1].startswith(f"error: {path}: item 'd' at $[\"d\"].images[0].filename: 'a0.png' is the same file")
    assert lines[2].startswith(f"error: {tmp_path}: item 'c': broken.png: ")
    assert lines[3].startswith(f"warning: {path}: item 'c' at $[\"c\"].images: only one image")
    assert lines[4] == "Summary: 1 item, 2 images, 0 labels, 0 items with one image"
    assert err == f"{path}: 3 problems; fix them and run validate again.\n"

    code, out, _ = run_cli("validate", "--labeled-data", path, "--image-dir", tmp_path, "--on-bad-image", "skip",
                           "--no-progress")
    assert code == 1  # the unsafe path and the duplicate are still unusable
    assert out.splitlines()[2].startswith(f"warning: {tmp_path}: item 'c': broken.png")


def test_validate_ok_with_skipped_bad_image(tmp_path, run_cli):
    for name in ("a0.png", "a1.png", "b0.png", "b1.png"):
        write_image(tmp_path / name)
    (tmp_path / "b2.png").write_bytes(b"")
    path = write_catalog(tmp_path, {
        "a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "b": {"images": [{"filename": "b0.png"}, {"filename": "b1.png"}, {"filename": "b2.png"}]},
    })
    code, out, _ = run_cli("validate", "--labeled-data", path, "--image-dir", tmp_path, "--on-bad-image", "skip",
                           "--val-fraction", "0", "--no-progress")  # 2 items: holding one out leaves no negatives
    assert code == 0
    assert "Summary: 2 items, 4 images, 0 labels, 0 items with one image" in out
    assert "Skipping 1 image that cannot be decoded (--on-bad-image skip)." in out
    assert out.rstrip().endswith("OK: the catalog is ready for training.")


def test_validate_does_not_promise_what_train_refuses(tmp_path, run_cli):
    for name in ("a0.png", "b0.png", "c0.png"):
        write_image(tmp_path / name)
    path = write_catalog(tmp_path, {i: {"images": [{"filename": f"{i}0.png"}]} for i in "abc"})
    code, out, err = run_cli("validate", "--labeled-data", path, "--image-dir", tmp_path, "--val-fraction", "0",
                             "--no-progress")
    assert code == 1 and "OK" not in out
    assert "error: the training items: No positive pairs: none of the 3 items has two or more images. Fix:" in out
    assert err == f"{path}: the training items give no pairs to learn from; fix them and run validate again.\n"


@pytest.mark.parametrize(("argv", "dest", "value"), [
    (["train", "--labeled-data", "c.json", "--image-dir", "d", "--out", "m.keras"], "out", "m.keras"),
    (["train", "--labeled-data", "c.json", "--image-dir", "d", "--pairs-per-epoch", "100"], "images_per_epoch", 100),
    (["train", "--labeled-data", "c.json", "--image-dir", "d", "--mining", "batch-all"], "batches", "pk"),
    (["train", "--labeled-data", "c.json", "--image-dir", "d", "--mining", "pairs"], "batches", "pairs"),
    (["similarity", "--image-dir", "d", "--out", "sims"], "out", "sims"),
    (["similarity", "--image-dir", "d", "--output", "sims", "--top-k", "3"], "top_k", 3),
    (["make-dataset", "--source", "digits", "--out", "data"], "out", "data"),
    (["demo", "--out", "d", "--pairs-per-epoch", "64"], "images_per_epoch", 64),
])
def test_old_spellings_still_work_with_a_deprecation_note(capsys, argv, dest, value):
    parser = build_parser()
    new = {"--out": "--output", "--pairs-per-epoch": "--images-per-epoch", "--top-k": "--k", "--mining": "--batches"}
    old = [a for a in argv if a in new]
    assert getattr(parser.parse_args(argv), dest) == value
    assert capsys.readouterr().err == "".join(f"utilities.py {argv[0]}: warning: {o} is deprecated; use {new[o]}\n"
                                              for o in old)
    for o in old:
        assert f"{o} " not in parser.commands[argv[0]].format_help()  # hidden from --help


def test_index_means_the_index_folder_and_nothing_else():
    args = build_parser().parse_args(["query", "--index", "exports/index", "q.png", "--k", "3"])
    assert (args.index, args.k, args.images) == ("exports/index", 3, ["q.png"])
    for argv in (["index", "--labeled-data", "c.json", "--image-dir", "d", "--index", "hnsw"],
                 ["merge-index", "p1", "--output", "o", "--index", "brute"]):
        with pytest.raises(SystemExit, match="2"):
            build_parser().parse_args(argv)


@pytest.mark.parametrize(("command", "message", "expected"), [
    ("index", "Expected `leaf_size` >= 1. Received: 0", "Expected --leaf-size >= 1. Received: 0"),
    ("index", "Expected `engine` to be one of balltree. Received: 'x'", "Expected --engine to be one of balltree. "
     "Received: 'x'"),
    ("train", "Expected `out` to end in .keras. Fix: pass `weights='none'`", "Expected --output to end in .keras. "
     "Fix: pass --weights none"),
    ("similarity", "Expected `top_k` >= 1", "Expected --k >= 1"),
    ("query", "Expected 1 <= `ef` <= 10", "Expected 1 <= --ef <= 10"),
    ("validate", "Fix: pass `on_bad_image='skip'` or check `labeled_data`", "Fix: pass --on-bad-image skip or check "
     "--labeled-data"),
    ("validate", "`leaf_size` and `python utilities.py index`", "`leaf_size` and `python utilities.py index`"),
])
def test_library_parameters_become_the_commands_flags(command, message, expected):
    from siamese.cli.common import translate

    assert translate(message, build_parser().commands[command]) == expected


@pytest.mark.parametrize("command", ["validate", "make-dataset", "merge-index"])
def test_commands_that_need_no_tensorflow_do_not_import_it(tmp_path, command):
    argv = {"validate": ["validate", "--labeled-data", "missing.json", "--image-dir", "."],
            "make-dataset": ["make-dataset", "--source", "digits", "--output", "digits", "--limit", "10"],
            "merge-index": ["merge-index", "missing", "--output", "merged"]}[command]
    code = (f"import sys; from siamese.cli import main; main({argv!r}); "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_train_flags_are_declared_once_by_the_train_config_fields():
    import dataclasses

    from siamese.config import TrainConfig

    actions = {a.dest: a for a in build_parser().commands["train"]._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("loss_settings", "mining"):  # filled by the loss settings' flags; the old --mining
            assert field.name not in actions
            continue
        assert field.name in actions, f"TrainConfig.{field.name} has no train flag"
        if field.default is not dataclasses.MISSING:
            assert actions[field.name].default == field.default, field.name
        if "help" in field.metadata:
            assert field.metadata["help"] in actions[field.name].help
