"""The one decoder: every odd kind of image file, written by Pillow, decoded to upright 8-bit RGB."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from conftest import write_catalog, write_image
from PIL import Image

import siamese.images as images_module
from siamese.catalog import load_catalog
from siamese.images import BadImagesError, ImageDecodeError, check_images, decode_image, find_bad_images, open_rgb

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
    assert message.startswith(f"3 images in {mixed.image_dir} cannot be used:\n")
    assert "  item 'a': empty.png: not an image Pillow can read" in message
    assert "  item 'a': cut.jpg: cannot be decoded" in message
    assert "  item 'c': notes.jpg: not an image Pillow can read" in message
    assert message.endswith("Fix: replace or remove them, or pass --on-bad-image skip to leave them out.")


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
    with pytest.raises(ValueError, match="Expected --on-bad-image to be 'fail' or 'skip'. Received: 'ignore'"):
        check_images(mixed, "ignore")  # type: ignore[arg-type]
