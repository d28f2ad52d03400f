"""The one decoder: every odd kind of image file, written by Pillow, decoded to upright 8-bit RGB."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_catalog, write_image
from PIL import Image

import siamese.images as images_module
from siamese.catalog import load_catalog
from siamese.images import (
    MAX_ASPECT_RATIO,
    BadImagesError,
    ImageDecodeError,
    check_images,
    decode_image,
    decode_images,
    file_stamp,
    find_bad_images,
    open_rgb,
)

ROOT = Path(__file__).resolve().parents[1]

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def halves(width=20, height=10, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another."""
    im = Image.new("RGB", (width, height), left)
    im.paste(Image.new("RGB", (width // 2, height), right), (width // 2, 0))
    return im


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer must rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    halves().save(path, exif=exif, quality=95)
    upright = np.asarray(open_rgb(path)).astype(int)
    assert upright.shape == (20, 10, 3)  # width and height swapped
    # rotated clockwise, the left (red) half is now on top and the right (blue) half at the bottom
    assert np.abs(upright[2, 5] - RED).max() < 30
    assert np.abs(upright[17, 5] - BLUE).max() < 30


def test_grayscale_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "gray.png", color=77, mode="L")
    assert (decode_image(path, 8) == 77).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(open_rgb(path))
    assert rgb[0, :, 0].tolist() == [0, 4, 128, 255]  # Pillow's own convert would clip 1000 to 255
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_transparency_goes_onto_white(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    im.save(path, transparency=0)
    rgb = np.asarray(open_rgb(path))
    assert tuple(rgb[0, 0]) == BLUE
    assert tuple(rgb[3, 3]) == WHITE  # transparent red


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    path = tmp_path / "alpha.png"
    im.save(path)
    rgb = np.asarray(open_rgb(path)).astype(int)
    assert tuple(rgb[0, 0]) == WHITE
    assert tuple(rgb[0, 1]) == BLUE
    assert np.abs(rgb[0, 2] - (255, 127, 127)).max() <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK", quality=100)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    rgb = np.asarray(open_rgb(path)).astype(int)
    assert np.abs(rgb[4, 4] - RED).max() < 10


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
    assert tuple(np.asarray(open_rgb(path))[4, 4]) == RED


def test_padded_to_square_on_white_then_resized(tmp_path):
    path = write_image(tmp_path / "wide.png", color=RED, size=(40, 20))
    out = decode_image(path, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:4] == WHITE).all() and (out[-4:] == WHITE).all()  # bands above and below
    assert (out[7:13] == RED).all()


def test_resize_is_antialiased(tmp_path):
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = tmp_path / "checker.png"
    Image.fromarray(checker).save(path)
    small = decode_image(path, 8).astype(int)
    assert np.abs(small - 127.5).max() < 3  # an aliased resize would give 0s and 255s


def test_bytes_and_path_decode_the_same_and_lying_extension_is_read_by_content(tmp_path):
    png = write_image(tmp_path / "a.png", color=(12, 34, 56), size=(30, 10))
    lying = tmp_path / "really_a_png.jpg"
    lying.write_bytes(png.read_bytes())
    expected = decode_image(png, 16)
    assert (decode_image(png.read_bytes(), 16) == expected).all()
    assert (decode_image(lying, 16) == expected).all()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an image Pillow can read"),
        (b"these are not the pixels you are looking for", "not an image Pillow can read"),
    ],
)
def test_not_an_image(tmp_path, content, message):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=message):
        open_rgb(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(ImageDecodeError, match="cannot be decoded"):
        open_rgb(data[: len(data) // 2])


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = write_image(tmp_path / "bomb.png", color=0, size=(200, 100), mode="1")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageDecodeError, match=r"200x100 = 20,000 pixels is over Pillow's limit of 10,000"):
        open_rgb(path)


def test_real_bomb_over_default_limit(tmp_path):
    # 20000 x 10000 one-bit pixels: 25 MB in memory, a few KB on disk, over the 89,478,485-pixel default.
    path = write_image(tmp_path / "bomb.png", color=0, size=(20000, 10000), mode="1")
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError, match="over Pillow's limit of 89,478,485"):
        open_rgb(path)


@pytest.fixture
def mixed(tmp_path):
    """A catalog with two good images and three bad ones (empty, truncated, text with a .jpg name)."""
    for name in ("good0.png", "good1.png", "good2.png"):
        write_image(tmp_path / name)
    (tmp_path / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:800])
    (tmp_path / "notes.jpg").write_text("shopping list")
    path = write_catalog(tmp_path, {
        "a": {"images": [{"filename": "good0.png"}, {"filename": "empty.png"}, {"filename": "cut.jpg"}]},
        "b": {"images": [{"filename": "good1.png"}, {"filename": "good2.png"}]},
        "c": {"images": [{"filename": "notes.jpg"}]},
    })
    return load_catalog(path, tmp_path)


def test_bad_images_fail_listing_every_one_with_its_item(mixed):
    with pytest.raises(BadImagesError) as info:
        check_images(mixed, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"3 images in {mixed.image_dir} cannot be used (first: item 'a': empty.png: not an image "
                       "Pillow can read (empty, or another kind of file)). Fix: replace or remove them, or pass "
                       "`on_bad_image='skip'` to leave them out; run `validate` to list them all.")
    assert [str(b).split(":")[:2] for b in info.value.bad] == [["item 'a'", " empty.png"], ["item 'a'", " cut.jpg"],
                                                              ["item 'c'", " notes.jpg"]]


def test_bad_images_skipped_with_one_warning(mixed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = check_images(mixed, "skip", progress=False)
    assert len(caught) == 1
    assert "Skipping 3 images that cannot be decoded (first: item 'a': empty.png" in str(caught[0].message)
    assert [(i.id, i.filenames) for i in kept.items] == [("a", ("good0.png",)), ("b", ("good1.png", "good2.png"))]


def test_check_pass_is_paid_once_for_an_unchanged_folder(mixed, monkeypatch):
    decoded = []
    real = images_module._check_one
    monkeypatch.setattr(images_module, "_check_one", lambda p: decoded.append(p.name) or real(p))
    first = find_bad_images(mixed, progress=False)
    assert len(decoded) == 6
    decoded.clear()
    assert find_bad_images(mixed, progress=False) == first
    assert decoded == []
    # Fix one file: only that file is decoded again, and it is no longer bad.
    write_image(mixed.image_dir / "empty.png")
    assert [b.filename for b in find_bad_images(mixed, progress=False)] == ["cut.jpg", "notes.jpg"]
    assert decoded == ["empty.png"]


def test_on_bad_image_is_validated(mixed):
    with pytest.raises(ValueError, match="Expected `on_bad_image` to be 'fail' or 'skip'. Received: 'ignore'"):
        check_images(mixed, "ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("width", "height", "size", "box"),  # box: the rows and columns the image takes in the square, by hand
    [
        (37, 5, 28, (12, 16, 0, 28)),  # 5 * 28 / 37 = 3.78: 4 rows, 12 white rows above and below
        (5, 37, 28, (0, 28, 12, 16)),
        (300, 200, 32, (5, 26, 0, 32)),  # 21.33: 21 rows, the odd white row below
        (199, 200, 32, (0, 32, 0, 32)),  # 31.84 rounds to 32: no padding at all
        (1, 80, 28, (0, 28, 13, 14)),  # 0.35 rounds to 0, but one column is kept
        (8, 3, 28, (8, 19, 0, 28)),  # 10.5 rounds half up to 11
        (3, 2, 28, (4, 23, 0, 28)),  # grown: 18.67 rounds to 19
    ],
)
def test_resized_so_the_long_side_fits_then_padded_to_a_centred_square(tmp_path, width, height, size, box):
    path = write_image(tmp_path / "strip.png", color=RED, size=(width, height))
    top, bottom, left, right = box
    expected = np.full((size, size, 3), 255, np.uint8)
    expected[top:bottom, left:right] = RED  # a solid colour stays exactly itself through the bilinear filter
    np.testing.assert_array_equal(decode_image(path, size), expected)


def test_square_images_are_resized_as_before(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    path = tmp_path / "square.png"
    Image.fromarray(pixels).save(path)
    old = np.asarray(Image.fromarray(pixels).resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(path, 28), old)


@pytest.mark.parametrize(("width", "height", "ratio"), [(101, 1, "101"), (1, 150, "150"), (20000, 10, "2,000"),
                                                         (1001, 10, "100.1"), (60000, 1, "60,000")])
def test_an_absurd_aspect_ratio_is_refused(tmp_path, width, height, ratio):
    path = write_image(tmp_path / "strip.png", color=0, size=(width, height), mode="1")
    with pytest.raises(ImageDecodeError, match=rf"^{width}x{height} is an aspect ratio of {ratio}:1, over the limit "
                                               r"of 100:1 \(siamese.images.MAX_ASPECT_RATIO\); crop it$"):
        decode_image(path, 28)


def test_the_aspect_ratio_limit_itself_is_allowed(tmp_path):
    assert MAX_ASPECT_RATIO == 100
    path = write_image(tmp_path / "strip.png", color=BLUE, size=(1, 100))
    out = decode_image(path, 28)
    assert (out[:, 13] == BLUE).all() and (np.delete(out, 13, axis=1) == WHITE).all()


def test_a_refused_strip_is_named_by_the_check_pass_and_the_batch_decoder(tmp_path):
    write_image(tmp_path / "good.png")
    strip = write_image(tmp_path / "strip.png", size=(20000, 10))
    catalog = load_catalog(write_catalog(tmp_path, {"a": {"images": [{"filename": "good.png"},
                                                                     {"filename": "strip.png"}]}}), tmp_path)
    with pytest.raises(BadImagesError, match=r"item 'a': strip.png: 20000x10 is an aspect ratio of 2,000:1"):
        check_images(catalog, progress=False)
    with pytest.raises(ImageDecodeError, match=rf"^{strip}: 20000x10 is an aspect ratio of 2,000:1"):
        decode_images([str(tmp_path / "good.png"), str(strip)], 28)


BOUNDED = """
import json, resource, sys, time
import numpy as np
from siamese.images import ImageDecodeError, decode_image
with open("/proc/self/status") as f:
    mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_AS)[1]))
report = {}
for path in sys.argv[2:]:
    start = time.perf_counter()
    try:
        np.save(path + ".npy", decode_image(path, 28))
        outcome = "decoded"
    except ImageDecodeError as e:
        outcome = str(e)
    except MemoryError:
        outcome = "MemoryError"
    report[path] = [outcome, time.perf_counter() - start]
print(json.dumps(report))
"""


def strips(root: Path) -> dict[str, Path]:
    """Solid PNGs a few KB on disk whose padded square would take gigabytes: two at the aspect-ratio limit,
    two far over it."""
    return {f"{w}x{h}": write_image(root / f"{w}x{h}.png", RED, (w, h))
            for w, h in ((30000, 300), (300, 30000), (20000, 10), (60000, 1))}


def line_across(size: int, vertical: bool) -> np.ndarray:
    """What a solid red strip at 100:1 decodes to: one red line through the middle of a white square."""
    expected = np.full((size, size, 3), 255, np.uint8)
    expected[(slice(None), (size - 1) // 2) if vertical else (size - 1) // 2] = RED
    return expected


def test_strips_decode_or_are_refused_within_a_gigabyte_of_address_space(tmp_path):
    files = strips(tmp_path)
    assert max(p.stat().st_size for p in files.values()) < 100_000
    # The old decoder padded 20000x10 to a 1.6 GB square before resizing, and 30000x300 to 3.6 GB.
    result = subprocess.run([sys.executable, "-c", BOUNDED, str(1 << 30), *map(str, files.values())], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    outcome = {name: report[str(path)][0] for name, path in files.items()}
    assert outcome == {"30000x300": "decoded", "300x30000": "decoded",
                       "20000x10": "20000x10 is an aspect ratio of 2,000:1, over the limit of 100:1 "
                                   "(siamese.images.MAX_ASPECT_RATIO); crop it",
                       "60000x1": "60000x1 is an aspect ratio of 60,000:1, over the limit of 100:1 "
                                  "(siamese.images.MAX_ASPECT_RATIO); crop it"}
    assert max(seconds for _, seconds in report.values()) < 5
    np.testing.assert_array_equal(np.load(f"{files['30000x300']}.npy"), line_across(28, vertical=False))
    np.testing.assert_array_equal(np.load(f"{files['300x30000']}.npy"), line_across(28, vertical=True))


def promptly(fn, *args):
    """`fn(*args)` called in a thread: what it returns, or the exception it raises. Fails if it takes over 10 s,
    so a call that blocks fails the test instead of hanging the suite."""
    outcome = []

    def call():
        try:
            outcome.append(fn(*args))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{fn.__name__}{args} blocked"
    return outcome[0]


@pytest.fixture
def special(tmp_path):
    """Paths that are not regular files, each with the reason it is refused."""
    fifo, loop, folder = tmp_path / "fifo.png", tmp_path / "loop.png", tmp_path / "folder.png"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    folder.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "socket.png"))
    yield {
        fifo: "not a regular file but a named pipe (FIFO)",
        Path("/dev/zero"): "not a regular file but a character device",
        loop: "cannot be read: a symlink loop (or a chain of over 40 symlinks)",
        folder: "not a regular file but a directory",
        tmp_path / "socket.png": "not a regular file but a socket",
    }
    server.close()
    with contextlib.suppress(OSError):  # a reader stuck on the FIFO (a regression) gets end-of-file
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_path_that_is_not_a_regular_file_is_refused_at_once(special):
    for path, reason in special.items():
        for fn, args in ((open_rgb, (path,)), (open_rgb, (str(path),)), (decode_image, (path, 8)),
                         (file_stamp, (path,))):
            with pytest.raises(ImageDecodeError, match=f"^{re.escape(reason)}$"):
                raise promptly(fn, *args)


def test_the_check_pass_names_a_file_swapped_for_a_fifo_or_a_loop(tmp_path):
    names = ("good.png", "fifo.png", "loop.png")
    for name in names:
        write_image(tmp_path / name)
    catalog = load_catalog(write_catalog(tmp_path, {"a": {"images": [{"filename": n} for n in names]}}), tmp_path)
    fifo, loop = tmp_path / "fifo.png", tmp_path / "loop.png"
    fifo.unlink()  # swapped after the catalog was loaded
    os.mkfifo(fifo)
    loop.unlink()
    loop.symlink_to(loop)
    try:
        bad = promptly(lambda: find_bad_images(catalog, progress=False))
    finally:
        with contextlib.suppress(OSError):  # a reader stuck on the FIFO (a regression) gets end-of-file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert [str(b) for b in bad] == [
        "item 'a': fifo.png: not a regular file but a named pipe (FIFO)",
        "item 'a': loop.png: cannot be read: a symlink loop (or a chain of over 40 symlinks)",
    ]
