"""The hostile suite: malformed, huge, hostile or missing inputs, tampered index folders, outputs that hold other
people's files, kills at each write, concurrent runs, read-only and full disks, and non-finite numbers.

Every case asserts the exit status, that the CLI said one line (no traceback), and that nothing was lost or left
behind: the files under the working folder are exactly the ones there before (or, for a run that succeeds, the
ones it was asked to write). Full and read-only disks are small tmpfs mounts where the tests run as root; they are
skipped elsewhere (the monkeypatched crash cases cover the same code paths).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from siamese import atomic, cli
from siamese.index import Index
from siamese.models import build_embedding
from tests.conftest import solid_catalog, write_catalog, write_image

ROOT = Path(__file__).resolve().parents[1]
MODEL = "model.keras"
INDEX = ("index", "--keras-model", MODEL, "--labeled-data", "data/labeled.json", "--image-dir", "data",
         "--no-progress")


def snapshot(root: Path) -> dict[str, str]:
    """Every regular file under `root` (relative path: SHA-256); symlinks, FIFOs and the like are not followed."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small job: a 16 px small_cnn checkpoint, a catalog of 3 items (7 images), and its index in `index/`."""
    root = tmp_path_factory.mktemp("world")
    keras.utils.set_random_seed(0)
    build_embedding("small_cnn", 16, 8).save(root / MODEL)
    solid_catalog(root / "data", {"a": (3, []), "b": (2, ["red"]), "c": (2, [])})
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert cli.main([*INDEX, "--output", "index"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def job(world, tmp_path, monkeypatch) -> Path:
    """A fresh copy of `world` as the working folder."""
    shutil.copytree(world, tmp_path / "job")
    monkeypatch.chdir(tmp_path / "job")
    return tmp_path / "job"


@pytest.fixture
def hostile(job, run_cli):
    """Run the CLI in the job folder, expecting it to refuse: returns the one line it printed to stderr.

    Asserts the exit status (2 unless given), no traceback, one error line that matches every pattern of
    `expect`, and that the job folder's files are exactly those before the run.
    """

    def run(*argv, expect: tuple[str, ...] = (), code: int = 2, changes: bool = False) -> str:
        before = snapshot(job)
        status, out, err = run_cli(*argv)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
        assert status == code, (status, out, err)
        assert "Traceback" not in err + out
        assert len(lines) == 1, err
        for pattern in expect:
            assert re.search(pattern, lines[0]), (pattern, lines[0])
        if not changes:
            assert snapshot(job) == before, "a refused run changed, lost or left files"
        return lines[0]

    return run


def ok(*argv) -> None:
    """Run the CLI in-process, expecting success (what it prints stays in capsys for the test to read)."""
    assert cli.main([str(a) for a in argv]) == 0


def _catalog(job: Path, items) -> Path:
    return write_catalog(job / "data", items, "bad.json")


def _one(filename: str) -> dict:
    return {"x": {"images": [{"filename": filename}, {"filename": "images/a/0.png"}]},
            "y": {"images": [{"filename": "images/b/0.png"}, {"filename": "images/b/1.png"}]}}


# --- catalogs -------------------------------------------------------------------------------------------------

CATALOG_TEXT = [
    ("not json", "{not json", r"malformed JSON"),
    ("empty file", "", r"bad\.json"),
    ("a list at the top", "[1, 2]", r"Expected a JSON object of items"),
    ("a 5001-digit integer", '{"x": {"images": [], "n": ' + "9" * 5001 + "}}", r"bad\.json.*digits"),
    ("not UTF-8", b'{"x\xff": 1}', r"not UTF-8"),
    ("an item that is a string", '{"x": "images"}', r"Expected an object with 'images'"),
    ("images that are not a list", '{"x": {"images": "a.png"}}', r"Expected 'images' to be a list"),
    ("labels that are not strings", '{"x": {"images": [{"filename": "images/a/0.png"}], "labels": [1]}}',
     r"Expected 'labels' to be a list of strings"),
    ("a filename that is a number", '{"x": {"images": [{"filename": 5}]}}', r"non-empty string 'filename'"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CATALOG_TEXT], ids=[c[0] for c in CATALOG_TEXT])
def test_a_malformed_catalog_is_one_line(job, hostile, text, message):
    path = job / "data" / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    hostile(*INDEX[:3], "--labeled-data", path, "--image-dir", "data", "--output", "out", expect=(message,))


CATALOG_FILENAMES = [
    ("outside the image folder", "../model.keras", r"x"),
    ("an absolute path", "/etc/passwd", r"x"),
    ("missing", "images/a/nope.png", r"file not found"),
    ("a symlink loop", "loop.png", r"x"),
    ("a 300-character name", "images/" + "n" * 300 + ".png", r"x"),
    ("a 6 KB path", "/".join(["d" * 200] * 30) + ".png", r"x"),
    ("a folder", "images/a", r"x"),
]


@pytest.mark.parametrize("filename", [c[1] for c in CATALOG_FILENAMES], ids=[c[0] for c in CATALOG_FILENAMES])
def test_a_catalog_filename_that_is_not_an_image_file_is_one_line(job, hostile, filename):
    loop = job / "data" / "loop.png"
    with contextlib.suppress(FileExistsError):
        loop.symlink_to(loop)
    hostile("index", "--keras-model", MODEL, "--labeled-data", _catalog(job, _one(filename)), "--image-dir", "data",
            "--output", "out", "--no-progress", expect=(r"bad\.json|x",))


@pytest.mark.parametrize("kind", ["missing", "a folder", "a symlink loop", "a name too long", "/dev/null"])
def test_labeled_data_that_is_not_a_file_is_one_line(job, hostile, kind):
    path = {"missing": job / "nope.json", "a folder": job / "data", "a symlink loop": job / "loop.json",
            "a name too long": job / ("n" * 300 + ".json"), "/dev/null": Path("/dev/null")}[kind]
    if kind == "a symlink loop":
        path.symlink_to(path)
    hostile(*INDEX[:3], "--labeled-data", path, "--image-dir", "data", "--output", "out", expect=(r"error: ",))


def _validate_in_a_child(job: Path, labeled_data: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`validate` in a subprocess that must finish within `timeout` seconds (a hang fails, not blocks, the suite)."""
    return subprocess.run([sys.executable, str(ROOT / "utilities.py"), "validate", "--labeled-data", labeled_data,
                           "--image-dir", "data", "--no-progress"], cwd=job, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("kind", ["a FIFO", "/dev/zero"])
def test_labeled_data_that_would_block_or_never_end_is_refused_at_once(job, kind):
    path = "/dev/zero"
    if kind == "a FIFO":
        os.mkfifo(job / "fifo.json")
        path = "fifo.json"
    result = _validate_in_a_child(job, path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_catalog_of_single_image_items_is_not_called_ready_for_training(job, hostile):
    path = _catalog(job, {k: {"images": [{"filename": f"images/{k}/0.png"}]} for k in "abc"})
    hostile("validate", "--labeled-data", path, "--image-dir", "data", "--no-progress", code=1,
            expect=(r"give no pairs",))


# --- images ---------------------------------------------------------------------------------------------------

def _bad_images(job: Path) -> dict[str, Path]:
    d = job / "data" / "images" / "a"
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "0.png").read_bytes()[:40])
    (d / "text.png").write_text("just some text")
    Image.new("1", (10_000, 10_000)).save(d / "bomb.png")  # 100 M pixels: over Pillow's limit, 12 KB on disk
    Image.new("RGB", (60_000, 1)).save(d / "sliver.png")  # an aspect-ratio bomb
    return {p.stem: p for p in (d / n for n in ("empty.png", "truncated.png", "text.png", "bomb.png", "sliver.png"))}


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "bomb", "sliver"])
def test_an_undecodable_image_in_the_catalog_is_named_and_indexing_stops(job, hostile, name):
    path = _bad_images(job)[name]
    catalog = _catalog(job, _one(str(path.relative_to(job / "data"))))
    hostile("index", "--keras-model", MODEL, "--labeled-data", catalog, "--image-dir", "data", "--output", "out",
            "--no-progress", expect=(path.name,))


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "bomb", "sliver", "missing", "folder", "devzero"])
def test_an_undecodable_query_image_is_named(job, hostile, name):
    images = _bad_images(job)
    path = {**images, "missing": job / "nope.png", "folder": job / "data", "devzero": Path("/dev/zero")}[name]
    hostile("query", "--index", "index", path, expect=(str(path.name),))


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_a_fifo_query_image_is_refused_at_once(job):
    os.mkfifo(job / "fifo.png")
    result = subprocess.run([sys.executable, str(ROOT / "utilities.py"), "query", "--index", "index", "fifo.png"],
                            cwd=job, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fifo.png" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- models ---------------------------------------------------------------------------------------------------

def _model(job: Path, kind: str) -> Path:
    path = job / f"{kind}.keras"
    keras.utils.set_random_seed(0)
    if kind == "nan":
        model = build_embedding("small_cnn", 16, 8)
        kernel = model.get_layer("projection").kernel
        kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    elif kind == "4d":
        inputs = keras.Input((16, 16, 3), dtype="uint8")
        model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    elif kind == "oblong":
        inputs = keras.Input((16, 12, 3), dtype="uint8")
        model = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    elif kind == "float":
        inputs = keras.Input((16, 16, 3), dtype="float32")
        model = keras.Model(inputs, keras.layers.Flatten()(inputs))
    elif kind == "garbage":
        path.write_bytes(os.urandom(2000))
        return path
    elif kind == "truncated":
        path.write_bytes((job / MODEL).read_bytes()[:5000])
        return path
    elif kind == "folder":
        path.mkdir()
        return path
    else:
        return job / "nope.keras"
    model.save(path)
    return path


MODELS = [("nan", r"NaN or infinite.*the model is broken"),
          ("4d", r"one embedding vector per image.*\(None, 14, 14, 4\)"),
          ("oblong", r"square RGB.*\(None, 16, 12, 3\)"), ("float", r"uint8"), ("garbage", r"could not be loaded"),
          ("truncated", r"could not be loaded"), ("folder", r"not found|folder"), ("missing", r"not found")]


@pytest.mark.parametrize(("kind", "message"), MODELS, ids=[m[0] for m in MODELS])
def test_a_broken_or_foreign_model_is_refused_by_export(job, hostile, kind, message):
    path = _model(job, kind)
    hostile("--export", "savedmodel", "--keras-model", path, "--output", "exports", expect=(message,),
            changes=True)
    assert not (job / "exports").exists()


@pytest.mark.parametrize("command", ["index", "similarity"])
def test_a_model_that_gives_nan_is_refused_before_it_writes_anything(job, hostile, command):
    path = _model(job, "nan")
    before = snapshot(job)
    if command == "index":
        hostile(*INDEX[:1], "--keras-model", path, *INDEX[3:], "--output", "out", expect=(r"the model is broken",),
                changes=True)
    else:
        hostile("similarity", "--keras-model", path, "--image-dir", "data/images/a", "--output", "sims",
                "--no-progress", expect=(r"the model is broken",), changes=True)
    assert snapshot(job) == before


# --- index folders --------------------------------------------------------------------------------------------

def _settings(job: Path) -> dict:
    return json.loads((job / "index" / "index.json").read_text())


def _tamper(job: Path, change) -> None:
    settings = _settings(job)
    change(settings)
    (job / "index" / "index.json").write_text(json.dumps(settings))


TAMPERS = [
    ("leaf_size a string", lambda s: s["engine"]["params"].update(leaf_size="forty"), r"leaf_size to be an integer"),
    ("leaf_size negative", lambda s: s["engine"]["params"].update(leaf_size=-1), r"leaf_size to be an integer >= 1"),
    ("an unknown embedder key", lambda s: s["embedder"].update(exec="rm -rf /"), r"embedder with keys among"),
    ("model not an object", lambda s: s.update(model=5), r"model to be an object"),
    ("another format version", lambda s: s.update(version=99), r"version 99"),
    ("rows not a number", lambda s: s.update(rows="seven"), r"malformed"),
    ("files missing", lambda s: s.pop("files"), r"malformed"),
    ("a foreign engine", lambda s: s["engine"].update(name="pickle"), r"expected an engine of .*, found 'pickle'"),
    ("an engine of no name", lambda s: s.update(engine={"params": {}}), r"malformed \(KeyError: 'name'\)"),
]


@pytest.mark.parametrize(("change", "message"), [t[1:] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_a_tampered_index_json_is_one_line(job, hostile, change, message):
    _tamper(job, change)
    hostile("query", "--index", "index", "data/images/a/0.png", expect=(r"index: ", message))


@pytest.mark.parametrize("damage", ["no index.json", "index.json not JSON", "a 5001-digit integer", "rows modified",
                                    "embeddings missing"])
def test_a_damaged_index_folder_is_one_line(job, hostile, damage):
    settings_path = job / "index" / "index.json"
    files = _settings(job)["files"]
    if damage == "no index.json":
        settings_path.unlink()
    elif damage == "index.json not JSON":
        settings_path.write_text("{")
    elif damage == "a 5001-digit integer":
        settings_path.write_text(settings_path.read_text().replace('"rows": 7', '"rows": ' + "7" * 5001))
    elif damage == "rows modified":
        rows = job / "index" / files["rows"]
        data = bytearray(rows.read_bytes())
        data[len(data) // 2] ^= 1
        rows.write_bytes(bytes(data))
    else:
        (job / "index" / files["embeddings"]).unlink()
    hostile("query", "--index", "index", "data/images/a/0.png", expect=(r"index",))


# --- output folders -------------------------------------------------------------------------------------------

def test_index_never_deletes_files_it_did_not_write(job, hostile):
    u = job / "u"
    u.mkdir()
    for name in ("rows-2024-q3.json", "engine-maintenance-log.txt", "embeddings-from-other-tool.npy"):
        (u / name).write_text(name)
    hostile(*INDEX, "--output", u, expect=(r"holds other files \(embeddings-from-other-tool\.npy, engine-main",
                                           r"Fix: write an index to a new folder"))


def test_an_index_with_a_file_of_someone_else_beside_it_is_not_written_over(job, hostile):
    (job / "index" / "notes.txt").write_text("mine")
    hostile(*INDEX, "--output", "index", expect=(r"notes\.txt",))


def test_an_output_that_is_a_file_is_refused(job, hostile):
    hostile(*INDEX, "--output", "data/labeled.json", expect=(r"which is a file",))


def test_rebuilding_an_index_leaves_exactly_one_index(job):
    before = set(os.listdir(job / "index"))
    ok(*INDEX, "--output", "index", "--engine", "brute")
    after = set(os.listdir(job / "index"))
    assert "index.json" in after and len(after) == 3 and after == before  # same rows: the same hashed names
    assert Index.load(job / "index").engine.name == "brute"
    assert not [p for p in job.iterdir() if p.name.startswith(".")], "no lock or partial folder is left"


def _hold_lock(output: Path) -> subprocess.Popen:
    """A child process that holds the output lock of `output` until killed."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from siamese import atomic\n"
        f"with atomic.output_lock({str(output)!r}):\n    print('held', flush=True); time.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.parametrize("command", ["index", "similarity", "train", "make-dataset"])
def test_a_second_run_on_one_output_fails_at_once_naming_the_holder(job, hostile, command):
    output = {"index": "index", "similarity": "sims", "train": "checkpoints/x.keras", "make-dataset": "ds"}[command]
    child = _hold_lock(job / output)
    try:
        argv = {"index": (*INDEX, "--output", output),
                "similarity": ("similarity", "--keras-model", MODEL, "--image-dir", "data/images/a",
                               "--output", output),
                "train": ("train", "--labeled-data", "data/labeled.json", "--image-dir", "data", "--output", output,
                          "--epochs", "1", "--image-size", "16"),
                "make-dataset": ("make-dataset", "--source", "digits", "--output", output)}[command]
        start = time.monotonic()
        hostile(*argv, expect=(rf"being written by another run \(pid {child.pid}\)",))
        assert time.monotonic() - start < 30
    finally:
        child.kill()
        child.wait()


def test_merge_index_refuses_to_write_over_one_of_its_parts(job, hostile):
    for shard in (1, 2):
        ok(*INDEX, "--shard", f"{shard}/2", "--batch-size", "2", "--output", f"part{shard}")
    hostile("merge-index", "part1", "part2", "--output", "part2", expect=(r"one of the parts",))
    hostile("merge-index", "part1", "part2", "--output", "./part1/../part1", expect=(r"one of the parts",))


@pytest.mark.parametrize("call", range(4))
def test_a_crash_at_each_rename_of_index_leaves_the_previous_index_whole(job, monkeypatch, call):
    before = snapshot(job / "index")
    calls = {"n": 0}
    real = {"replace": os.replace, "rename": os.rename}

    def crash(name):
        def move(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > call:
                raise KeyboardInterrupt  # as a kill would stop the run here
            return real[name](*args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", crash("replace"))
    monkeypatch.setattr(os, "rename", crash("rename"))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: crash("rename")(a, a) and False)
    code = cli.main([*INDEX, "--output", "index", "--engine", "brute"])
    monkeypatch.undo()
    assert code == 130
    assert snapshot(job / "index") == before
    assert not [p for p in job.iterdir() if p.name.startswith(".")], "nothing partial is left"


@pytest.mark.slow
def test_a_killed_index_leaves_the_previous_index_whole_and_the_next_run_cleans_up(job):
    make = [sys.executable, str(ROOT / "utilities.py"), "make-dataset", "--source", "digits", "--output", "digits",
            "--no-progress"]
    subprocess.run(make, cwd=job, check=True, capture_output=True, timeout=300)
    before = snapshot(job / "index")
    argv = [sys.executable, str(ROOT / "utilities.py"), "index", "--keras-model", MODEL, "--labeled-data",
            "digits/train.json", "--image-dir", "digits", "--output", "index", "--batch-size", "1", "--no-progress"]
    child = subprocess.Popen(argv, cwd=job, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 120
    while not (job / ".index.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # checking and embedding 1,437 images one at a time: well inside the run
    assert child.poll() is None, "the run ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert snapshot(job / "index") == before
    result = subprocess.run([*argv[:-3], "--no-progress"], cwd=job, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(Index.load(job / "index")) == 1437
    assert not [p for p in job.iterdir() if p.name.startswith(".")], "the rerun removed what the kill left"


# --- similarity -----------------------------------------------------------------------------------------------

def test_similarity_names_are_unique_and_the_count_is_the_files_written(job, capsys):
    d = job / "collide"
    for name in ("a.png", "a.jpg", "a.png.jpg", ".siamese.png", "A.PNG"):
        write_image(d / name, (len(name) * 40 % 256, 0, 0), fmt="PNG" if "png" in name.lower()[-3:] else "JPEG")
    ok("similarity", "--keras-model", MODEL, "--image-dir", d, "--output", "sims", "--no-progress")
    out = capsys.readouterr().out
    written = sorted(p.name for p in (job / "sims").iterdir() if p.name != ".siamese.json")
    assert f"Wrote {len(written)} similarity files" in out and len(written) == 5
    assert len({w.lower() for w in written}) == 5
    run = json.loads((job / "sims" / ".siamese.json").read_text())
    assert sorted(run["files"].values()) == sorted(p.name for p in d.iterdir())
    for name in written:
        entries = json.loads((job / "sims" / name).read_text())
        assert len({e["filename"] for e in entries}) == 5, "every image appears once in every list"


def test_a_similarity_rerun_after_images_were_deleted_leaves_no_old_files(job):
    d = job / "data" / "images" / "a"
    ok("similarity", "--keras-model", MODEL, "--image-dir", d, "--output", "sims", "--no-progress")
    (d / "2.png").unlink()
    ok("similarity", "--keras-model", MODEL, "--image-dir", d, "--output", "sims", "--no-progress")
    assert sorted(os.listdir(job / "sims")) == [".siamese.json", "0.json", "1.json"]


def test_a_crash_while_writing_similarity_leaves_the_previous_run_whole(job, monkeypatch):
    d = job / "data" / "images" / "a"
    ok("similarity", "--keras-model", MODEL, "--image-dir", d, "--output", "sims", "--no-progress")
    before = snapshot(job / "sims")
    real, calls = Path.write_text, {"n": 0}

    def write_text(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert cli.main(["similarity", "--keras-model", MODEL, "--image-dir", str(d), "--output", "sims", "--k", "1",
                     "--no-progress"]) == 130
    monkeypatch.undo()
    assert snapshot(job / "sims") == before
    assert not [p for p in job.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("out", ["foreign", "a file", "the image folder"])
def test_similarity_does_not_write_over_what_it_did_not_write(job, hostile, out):
    target = {"foreign": job / "mine", "a file": job / "data" / "labeled.json", "the image folder": job / "data"}[out]
    if out == "foreign":
        target.mkdir()
        (target / "thesis.json").write_text("{}")
    hostile("similarity", "--keras-model", MODEL, "--image-dir", "data/images/a", "--output", target, "--no-progress",
            expect=(r"which is a file|holds other files",))


# --- settings and non-finite numbers --------------------------------------------------------------------------

SETTINGS = [
    ("train", "--learning-rate", "nan", r"finite --learning-rate"),
    ("train", "--margin", "inf", r"finite --margin"),
    ("train", "--temperature", "nan", r"finite --temperature"),
    ("train", "--val-fraction", "nan", r"finite --val-fraction"),
    ("train", "--weight-decay", "-inf", r"finite --weight-decay"),
    ("train", "--image-size", "-5", r"--image-size >= 8"),
    ("train", "--epochs", "0", r"--epochs >= 1"),
    ("index", "--batch-size", "0", r"--batch-size >= 1"),
    ("index", "--image-size", "-5", r"image-size >= 8"),
    ("similarity", "--k", "0", r"--k >= 1"),
    ("query", "--k", "0", r"k"),
    ("make-dataset", "--limit", "1", r"--limit >= 2"),
    ("make-dataset", "--image-size", "-5", r"--image-size >= 8"),
]


@pytest.mark.parametrize(("command", "flag", "value", "message"), SETTINGS,
                         ids=[f"{c} {f} {v}" for c, f, v, _ in SETTINGS])
def test_a_bad_setting_is_one_line(job, hostile, command, flag, value, message):
    argv = {"train": ("train", "--labeled-data", "data/labeled.json", "--image-dir", "data", "--output",
                      "checkpoints/x.keras"),
            "index": ("index", "--backbone", "mobilenet_v2", "--weights", "none", "--labeled-data", "data/labeled.json",
                      "--image-dir", "data", "--output", "out", "--no-progress"),
            "similarity": ("similarity", "--keras-model", MODEL, "--image-dir", "data/images/a", "--output", "sims"),
            "query": ("query", "--index", "index", "data/images/a/0.png"),
            "make-dataset": ("make-dataset", "--source", "glyphs" if flag == "--image-size" else "digits", "--output",
                             "ds")}[command]
    hostile(*argv, f"{flag}={value}", expect=(message,))


def test_train_out_that_is_a_folder_is_refused(job, hostile):
    (job / "checkpoints").mkdir()
    hostile("train", "--labeled-data", "data/labeled.json", "--image-dir", "data", "--output", "checkpoints",
            expect=(r"--output to end in",))
    (job / "checkpoints" / "x.keras").mkdir()
    hostile("train", "--labeled-data", "data/labeled.json", "--image-dir", "data", "--output", "checkpoints/x.keras",
            "--image-size", "16", expect=(r"which is a folder",))


def test_a_similarity_file_never_holds_nan(job):
    ok("similarity", "--keras-model", MODEL, "--image-dir", "data/images/a", "--output", "sims", "--no-progress")
    def refuse(constant: str):
        pytest.fail(f"a similarity file holds {constant}")

    for path in (job / "sims").iterdir():
        json.loads(path.read_text(), parse_constant=refuse)


def test_json_writes_refuse_nan(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        atomic.write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())


# --- read-only and full disks ---------------------------------------------------------------------------------

def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the crash cases cover this")


@pytest.fixture
def disk(job):
    """A 1 MiB tmpfs at job/disk: yields (path, fill, read_only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root")
    path = job / "disk"
    _mount(path, "1m")

    def fill() -> None:
        with open(path / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    try:
        yield path, fill, read_only
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


OUTPUTS = {
    "index": lambda out: (*INDEX, "--output", out / "index"),
    "export": lambda out: ("--export", "savedmodel", "--keras-model", MODEL, "--output", out / "exports"),
    "similarity": lambda out: ("similarity", "--keras-model", MODEL, "--image-dir", "data/images/a", "--output",
                               out / "sims", "--no-progress"),
    "train": lambda out: ("train", "--labeled-data", "data/labeled.json", "--image-dir", "data", "--output",
                          out / "m.keras", "--epochs", "1", "--images-per-epoch", "16", "--batch-size", "8",
                          "--images-per-item", "2", "--image-size", "16", "--val-fraction", "0", "--no-progress"),
    "make-dataset": lambda out: ("make-dataset", "--source", "digits", "--output", out / "digits", "--no-progress"),
}


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_a_read_only_disk_is_one_line_before_any_long_work(job, disk, hostile, command, monkeypatch):
    path, _, read_only = disk
    read_only()
    from siamese import embed, training

    monkeypatch.setattr(embed, "embed_catalog", lambda *a, **k: pytest.fail("embedded before checking the output"))
    monkeypatch.setattr(training, "_train", lambda *a, **k: pytest.fail("trained before checking the output"))
    hostile(*OUTPUTS[command](path), expect=(r"read-only\. Fix: write to a folder on a writable disk",))


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(job, disk, hostile, command):
    path, fill, _ = disk
    fill()
    line = hostile(*OUTPUTS[command](path), expect=(r"error: ",), changes=True)
    assert "disk is full" in line or "No space" in line, line
    assert sorted(os.listdir(path)) == ["filler"], "a failed run left files on the full disk"


def test_a_full_disk_leaves_the_previous_index_whole(job, disk, hostile):
    path, fill, _ = disk
    ok(*INDEX, "--output", path / "index")
    before = snapshot(path / "index")
    fill()
    hostile(*INDEX, "--output", path / "index", "--engine", "brute", expect=(r"disk is full",), changes=True)
    assert snapshot(path / "index") == before
    assert len(Index.load(path / "index")) == 7
