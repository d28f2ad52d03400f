"""The catalog: every problem the issue names is built for real and its message pinned."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal

import pytest
from conftest import solid_catalog, write_catalog, write_image

import siamese.catalog
from siamese.catalog import MAX_NAME_CHARS, CatalogError, load_catalog, split_by_item, validate_catalog
from siamese.errors import SiameseError


def errors_of(path, image_dir) -> list[str]:
    return [str(p) for p in validate_catalog(path, image_dir).errors]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging, when the block takes longer than `seconds` (a blocked open() is interrupted)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def root(tmp_path):
    for item, k in [("a", 0), ("a", 1), ("b", 0), ("b", 1)]:
        write_image(tmp_path / f"{item}{k}.png", color=(10 * k, 0, 0))
    return tmp_path


def test_good_catalog_loads_typed_items(root):
    path = write_catalog(root, {
        "a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}], "labels": ["red", "pink"]},
        "b": {"images": [{"filename": "b0.png"}, {"filename": "b1.png"}]},
    })
    catalog = load_catalog(path, root)
    assert [i.id for i in catalog.items] == ["a", "b"]
    assert catalog.items[0].labels == ("pink", "red")
    assert catalog.items[1].labels == ()
    assert catalog.filenames == ("a0.png", "a1.png", "b0.png", "b1.png")
    assert catalog.image_item.tolist() == [0, 0, 1, 1]
    assert catalog.summary() == "2 items, 4 images, 2 labels, 0 items with one image"


def test_malformed_json_names_line_and_column(root):
    path = root / "labeled.json"
    path.write_text('{\n  "a": {"images": [\n    {"filename": "a0.png"},,\n  ]}\n}\n')
    with pytest.raises(SiameseError, match=r"labeled.json: malformed JSON at line 3, column 28"):
        validate_catalog(path, root)


def test_not_utf8_and_missing_file_and_missing_folder(root):
    path = root / "latin1.json"
    path.write_bytes('{"caf\xe9": {}}'.encode("latin-1"))
    with pytest.raises(SiameseError, match="is not UTF-8 text .* save the labeled data as UTF-8"):
        validate_catalog(path, root)
    with pytest.raises(SiameseError, match="Labeled data file not found: .*nope.json"):
        validate_catalog(root / "nope.json", root)
    with pytest.raises(SiameseError, match="Image folder not found: .*nowhere. Fix: pass the folder"):
        validate_catalog(path, root / "nowhere")
    with pytest.raises(SiameseError, match="Expected a JSON file for `labeled_data`. Received: a directory: "):
        validate_catalog(root, root)


def test_duplicate_item_ids_are_detected(root):
    path = root / "labeled.json"
    path.write_text('{"a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},'
                    ' "a": {"images": [{"filename": "b0.png"}, {"filename": "b1.png"}]}}')
    assert errors_of(path, root) == [
        f"{path}: item 'a': item id appears more than once (JSON keeps only the last). "
        "Fix: give each item a unique id, or merge the entries"
    ]


def test_top_level_must_be_an_object(root):
    path = write_catalog(root, [{"images": []}])
    assert errors_of(path, root) == [
        f'{path}: $: Expected a JSON object of items at the top level. Received: a list. '
        'Fix: write {"item_id": {"images": [{"filename": ...}]}, ...}'
    ]
    path = write_catalog(root, {})
    assert errors_of(path, root) == [f"{path}: $: the catalog has no items. Fix: add items to the labeled data"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"labels": []}, r"item 'x' at \$\[\"x\"\]: 'images' is missing"),
        ({"images": "a0.png"}, r"at \$\[\"x\"\].images: Expected 'images' to be a list. Received: a string"),
        ({"images": []}, r"at \$\[\"x\"\].images: 'images' is empty. Fix: list at least one image"),
        ({"images": [{"file": "a0.png"}]}, r"images\[0\]: Expected an object with a non-empty string 'filename'. "
                                           r"Received: no 'filename'"),
        ({"images": [{"filename": 7}]}, r"Received: a number"),
        ({"images": ["a0.png"]}, r"images\[0\]: Expected an object .* Received: a string"),
        ({"images": [{"filename": ""}]}, r"Received: a string"),
        ([1, 2], r"Expected an object with 'images'. Received: a list"),
        ({"images": [{"filename": "a0.png"}], "labels": "red"},
         r"\.labels: Expected 'labels' to be a list of strings. Received: a string \"red\""),
        ({"images": [{"filename": "a0.png"}], "labels": ["red", 3]},
         r"Expected 'labels' to be a list of strings. Received: a list \[\"red\", 3\]"),
    ],
)
def test_item_shape_problems(root, entry, message):
    path = write_catalog(root, {"x": entry})
    errors = errors_of(path, root)
    assert len(errors) == 1
    assert errors[0].startswith(str(path))
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize(
    ("filename", "message"),
    [
        ("/etc/passwd", "filename '/etc/passwd' is an absolute path"),
        ("C:\\images\\a.png", "is an absolute path"),
        ("../outside.png", "filename '../outside.png' contains '..'"),
        ("sub/../../outside.png", "contains '..'"),
        ("a0.png\x00.jpg", "contains a NUL byte"),
    ],
)
def test_unsafe_paths_are_refused(root, filename, message):
    path = write_catalog(root, {"x": {"images": [{"filename": filename}]}})
    (error,) = errors_of(path, root)
    assert message in error
    assert "Fix: give the path relative to `image_dir`" in error


def test_symlink_leading_outside_is_refused_and_inside_is_allowed(tmp_path):
    outside = write_image(tmp_path / "secret" / "s.png")
    images = tmp_path / "images"
    write_image(images / "real.png")
    os.symlink(outside, images / "escape.png")
    os.symlink(tmp_path / "secret", images / "escape_dir")
    os.symlink(images / "real.png", images / "alias_inside.png")
    path = write_catalog(tmp_path, {
        "x": {"images": [{"filename": "escape.png"}, {"filename": "escape_dir/s.png"}]},
        "y": {"images": [{"filename": "alias_inside.png"}]},
    })
    errors = errors_of(path, images)
    assert len(errors) == 2
    assert all("is a link that leads outside the image folder" in e for e in errors)
    assert "Fix: copy the file into" in errors[0]
    assert validate_catalog(path, images).catalog.filenames == ("alias_inside.png",)


def test_missing_file_and_directory(root):
    (root / "sub").mkdir()
    path = write_catalog(root, {"x": {"images": [{"filename": "gone.png"}, {"filename": "sub"}]}})
    errors = errors_of(path, root)
    assert f"file not found: {root / 'gone.png'}. Fix: correct the filename or add the file" in errors[0]
    assert f"not a regular file: {root / 'sub'}" in errors[1]


def test_same_file_under_two_items_even_spelled_differently(root):
    path = write_catalog(root, {
        "a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "b": {"images": [{"filename": "./a0.png"}, {"filename": "b1.png"}]},
    })
    (error,) = errors_of(path, root)
    assert "item 'b' at $[\"b\"].images[0].filename: './a0.png' is the same file as item 'a' at " in error
    assert "Fix: list each file under one item only" in error


def test_single_image_items_are_allowed_but_reported(root):
    path = write_catalog(root, {
        "a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "b": {"images": [{"filename": "b0.png"}]},
    })
    report = validate_catalog(path, root)
    assert report.ok
    assert [str(w) for w in report.warnings] == [
        f"{path}: item 'b' at $[\"b\"].images: only one image: it gives no positive pair. "
        "Fix: add more images of it to use it in training"
    ]
    assert report.catalog.summary() == "2 items, 3 images, 0 labels, 1 item with one image"


def test_every_problem_is_reported_at_once_and_load_raises(root):
    path = write_catalog(root, {
        "ok": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "abs": {"images": [{"filename": "/etc/passwd"}]},
        "gone": {"images": [{"filename": "missing.png"}]},
        "lab": {"images": [{"filename": "b0.png"}], "labels": [1]},
    })
    report = validate_catalog(path, root)
    assert [p.item_id for p in report.errors] == ["abs", "gone", "lab"]
    assert [i.id for i in report.catalog.items] == ["ok"]
    with pytest.raises(CatalogError, match=r"3 problems in the labeled data; the first: .*abs.*Run `validate` to "
                                           r"list all 3\.") as info:
        load_catalog(path, root)
    assert info.value.report.errors == report.errors


def test_split_is_by_item_seeded_and_validated(tmp_path):
    path = solid_catalog(tmp_path, {f"item{i}": (2, []) for i in range(20)})
    catalog = load_catalog(path, tmp_path)
    train, val = split_by_item(catalog, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert not {i.id for i in train.items} & {i.id for i in val.items}
    assert not set(train.filenames) & set(val.filenames)
    assert split_by_item(catalog, 0.25, seed=3) == (train, val)
    assert split_by_item(catalog, 0.25, seed=4)[1] != val
    assert len(split_by_item(catalog, 0.0)[1]) == 0
    with pytest.raises(SiameseError, match=r"Expected `val_fraction` in \[0, 1\). Received: 1.5"):
        split_by_item(catalog, 1.5)
    few = catalog.subset({f"item{i}" for i in range(7)})  # 7 x 0.25 rounds to 2; 7 x 0.1 to 1, but 2 are held out
    assert len(split_by_item(few, 0.1)[1]) == 2 and len(split_by_item(few.subset({"item0", "item1", "item2"}),
                                                                      0.1)[1]) == 1
    one = catalog.subset({"item0"})
    with pytest.raises(SiameseError, match="A validation split needs at least 2 items; the catalog has 1"):
        split_by_item(one, 0.2)


def test_digest_ignores_key_order(root):
    a = {"a": {"images": [{"filename": "a0.png"}]}, "b": {"images": [{"filename": "b0.png"}]}}
    first = load_catalog(write_catalog(root, a, "one.json"), root)
    second = load_catalog(write_catalog(root, dict(reversed(a.items())), "two.json"), root)
    assert first.digest() == second.digest()
    changed = json.loads(json.dumps(a))
    changed["b"]["labels"] = ["x"]
    assert load_catalog(write_catalog(root, changed, "three.json"), root).digest() != first.digest()


def test_labeled_data_that_is_not_a_regular_file_is_refused_without_blocking(root):
    fifo = root / "pipe.json"
    os.mkfifo(fifo)
    cases = [(fifo, "a named pipe \\(FIFO\\)"), (root, "a directory")]
    if os.path.exists("/dev/zero"):
        cases.append(("/dev/zero", "a character device"))
    for path, kind in cases:
        with deadline(10), pytest.raises(SiameseError, match=rf"Expected a JSON file for `labeled_data`. "
                                                             rf"Received: {kind}: .*Fix: pass the catalog's JSON file"):
            validate_catalog(path, root)


def test_labeled_data_symlink_loop_and_too_long_path(root):
    os.symlink("loop.json", root / "loop.json")
    with pytest.raises(SiameseError, match=r"Labeled data path is a symlink loop: .*loop.json. Fix: point "):
        validate_catalog(root / "loop.json", root)
    with pytest.raises(SiameseError, match=r"Labeled data path is too long for the file system: .*xxx\.\.\. "
                                           r"\(\d{3},?\d* characters\). Fix: check the `labeled_data` path"):
        validate_catalog(root / ("x" * 300 + ".json"), root)
    with pytest.raises(SiameseError, match=r"too long for the file system: .*\(6,\d{3} characters\)"):
        validate_catalog(root / ("d/" * 3000 + "c.json"), root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_labeled_data(root):
    path = write_catalog(root, {"a": {"images": [{"filename": "a0.png"}]}})
    path.chmod(0)
    with pytest.raises(SiameseError, match=r"Labeled data file is not readable \(permission denied\): .*Fix: make"):
        validate_catalog(path, root)


def test_labeled_data_over_the_size_limit_even_when_stat_says_less(root, monkeypatch):
    monkeypatch.setattr(siamese.catalog, "MAX_CATALOG_BYTES", 10)
    path = write_catalog(root, {"a": {"images": [{"filename": "a0.png"}]}})
    with pytest.raises(SiameseError, match=r"labeled.json holds more than 10 bytes, the limit for labeled data. "
                                           r"Fix: check that `labeled_data` names the catalog JSON"):
        validate_catalog(path, root)
    if os.path.exists("/proc/self/maps"):  # a regular file of size 0 with content: only the read sees it
        with pytest.raises(SiameseError, match=r"/proc/self/maps holds more than 10 bytes"):
            validate_catalog("/proc/self/maps", root)


def test_integer_too_long_is_malformed_json_at_its_position(root):
    digits = "7" * 5001
    text = ('{"a": {"images": [{"filename": "a0.png"}], "note": "' + digits + '", "f": 1' + digits + '.5, '
            '"e": 1e' + digits + ',\n  "n": -' + digits + "}}")
    path = root / "labeled.json"
    path.write_text(text)
    column = len(text.split("\n")[1].split("-")[0]) + 1
    with pytest.raises(SiameseError, match=rf"labeled.json: malformed JSON at line 2, column {column}: an integer "
                                           rf"of 5,001 digits, more than the 4,300 Python reads. Fix: write it as a "
                                           rf"string, or remove it"):
        validate_catalog(path, root)


def test_nan_infinity_and_overflowing_floats_are_numbers_the_schema_refuses(root):
    path = root / "labeled.json"
    path.write_text('{"a": {"images": [{"filename": NaN}, {"filename": 1e999}], "labels": [-Infinity],'
                    ' "ignored": NaN}}')
    assert [e.split(": ", 2)[2] for e in errors_of(path, root)] == [
        "Expected an object with a non-empty string 'filename'. Received: a number. "
        'Fix: write {"filename": "relative/path.jpg"}',
        "Expected an object with a non-empty string 'filename'. Received: a number. "
        'Fix: write {"filename": "relative/path.jpg"}',
        "Expected 'labels' to be a list of strings. Received: a list [-Infinity]. "
        'Fix: write "labels": ["red", "pink"], or leave it out',
    ]


def test_filenames_the_file_system_refuses_are_problems(root):
    os.symlink("loop.png", root / "loop.png")
    (root / "sub").mkdir()
    os.symlink("../sub/cycle", root / "sub" / "cycle")
    path = write_catalog(root, {
        "loop": {"images": [{"filename": "loop.png"}, {"filename": "sub/cycle/a.png"}]},
        "long": {"images": [{"filename": "n" * 300 + ".png"}, {"filename": "d/" * 3000 + "a.png"}]},
        "under_file": {"images": [{"filename": "a0.png/a.png"}]},
    })
    errors = errors_of(path, root)
    assert errors[0] == (f"{path}: item 'loop' at $[\"loop\"].images[0].filename: 'loop.png' is a symlink loop. "
                         "Fix: point the link at an image file, or put the file there instead")
    assert "images[1].filename: 'sub/cycle/a.png' is a symlink loop" in errors[1]
    assert re.search(r"item 'long' at .*images\[0\].filename: filename of 304 characters is too long for the file "
                     r"system: .*nnn\.\.\. \(\d+ characters\)\. Fix: rename the file and its folders shorter",
                     errors[2]), errors[2]
    assert "images[1].filename: filename of 6,005 characters is too long for the file system" in errors[3]
    assert f"item 'under_file' at $[\"under_file\"].images[0].filename: file not found: {root / 'a0.png/a.png'}" \
        in errors[4]
    assert len(errors) == 5 and all(len(e) < 500 for e in errors)


def test_huge_ids_and_labels_are_problems_shown_clipped(root):
    huge = "i" * 1_000_000
    write_image(root / "c0.png")
    path = write_catalog(root, {
        huge: {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]},
        "ok": {"images": [{"filename": "b0.png"}, {"filename": "b1.png"}],
               "labels": ["red", "l" * (MAX_NAME_CHARS + 1)]},
        "i" * MAX_NAME_CHARS: {"images": [{"filename": "c0.png"}]},
    })
    report = validate_catalog(path, root)
    first, second = (str(p) for p in report.errors)
    assert first == (f"{path}: item '{'i' * 79}... (1,000,002 characters) at $[\"{'i' * 79}... (1,000,002 "
                     "characters)]: item id of 1,000,000 characters, over the 1,000-character limit. "
                     "Fix: give the item a shorter id")
    assert second == (f"{path}: item 'ok' at $[\"ok\"].labels[1]: label of 1,001 characters, over the "
                      "1,000-character limit. Fix: shorten the label")
    assert report.errors[0].item_id == huge
    assert [i.id for i in report.catalog.items] == ["i" * MAX_NAME_CHARS]


def test_unpaired_surrogates_are_problems_and_messages_stay_printable(root):
    path = root / "labeled.json"
    path.write_text('{"\\ud800": {"images": [{"filename": "a0.png"}]},'
                    ' "b": {"images": [{"filename": "\\udc80.png"}], "labels": ["\\udfff"]},'
                    ' "c": {"images": [{"filename": "a1.png"}], "labels": ["\\udfff", 3]}}')
    errors = errors_of(path, root)
    assert errors == [
        f"{path}: item '\\ud800' at $[\"\\ud800\"]: item id contains an unpaired surrogate (half of a \\u escape "
        "pair). Fix: write the id as plain UTF-8 text",
        f"{path}: item 'b' at $[\"b\"].images[0].filename: filename '\\udc80.png' contains an unpaired surrogate "
        f"(half of a \\u escape pair), which no file name holds. Fix: give the path relative to `image_dir` {root}, "
        "inside it",
        f"{path}: item 'b' at $[\"b\"].labels[0]: label contains an unpaired surrogate (half of a \\u escape pair). "
        "Fix: write the label as plain UTF-8 text",
        f"{path}: item 'c' at $[\"c\"].labels: Expected 'labels' to be a list of strings. Received: a list "
        '["\\udfff", 3]. Fix: write "labels": ["red", "pink"], or leave it out',
    ]
    for error in errors:
        error.encode()


def test_keys_repeated_inside_an_item_are_reported_once(root):
    path = root / "labeled.json"
    path.write_text('{"a": {"images": [], "labels": [], "images": [], "labels": [], '
                    '"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]}}')
    assert [e.split(": ", 2)[2] for e in errors_of(path, root)] == [
        "key 'images' appears more than once. Fix: keep one of them",
        "key 'labels' appears more than once. Fix: keep one of them",
    ]


def test_progress_bar_over_items_only_when_asked(root, capsys):
    path = write_catalog(root, {"a": {"images": [{"filename": "a0.png"}, {"filename": "a1.png"}]}})
    validate_catalog(path, root)
    load_catalog(path, root)
    assert "checking items" not in capsys.readouterr().err
    assert validate_catalog(path, root, progress=True).ok
    assert "checking items" in capsys.readouterr().err
    assert len(load_catalog(path, root, progress=True)) == 1
    assert "checking items" in capsys.readouterr().err
