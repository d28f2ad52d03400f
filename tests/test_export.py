"""SavedModel export: the in-graph decoder equals decode_image, both signatures equal the Keras model when
served by plain TensorFlow in a fresh process, and versions are written whole or not at all."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import write_image
from PIL import Image

from siamese import export
from siamese.errors import SiameseError
from siamese.export import decode_image_tf, exif_orientation, export_savedmodel
from siamese.images import decode_image, decode_images
from siamese.models import build_embedding, build_siamese, load_embedding, model_fingerprint

SIZE, DIM = 32, 16


def photo(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth pattern plus noise, `(height, width, channels)` uint8: resizing it exercises every filter tap."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / (3 + c) + c) * np.cos(y / (5 + c) - c) for c in range(channels)], -1)
    noise = np.random.default_rng(seed).normal(0, 30, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    """Write `pixels` with Pillow (format from the suffix) and return the path."""
    Image.fromarray(pixels.squeeze()).save(path, **options)
    return path


def exif_jpeg(path: Path, orientation: int, byte_order: str) -> Path:
    """A non-square JPEG carrying an EXIF orientation tag, in little ("II") or big ("MM") endian TIFF."""
    if byte_order == "II":
        exif = Image.Exif()
        exif[0x0110] = "camera"  # another tag first, so the orientation is not the IFD's only entry
        exif[0x0112] = orientation
        data = exif.tobytes()
    else:
        entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
        data = b"Exif\0\0MM\0\x2a" + struct.pack(">IH", 8, 1) + entry + b"\0\0\0\0"
    blocks = np.kron(photo(5, 3), np.ones((8, 8, 1))).astype(np.uint8)  # 24x40 colour blocks survive JPEG
    return save(path, blocks, quality=95, exif=data)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One file per decoding path: formats, modes, 16-bit, padding, shrinking and growing, animation."""
    root = tmp_path_factory.mktemp("images")
    frames = [Image.fromarray(photo(30, 20, seed=k)).convert("P") for k in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(photo(40, 40)).convert("CMYK").save(root / "cmyk.jpg")
    return {
        "native.png": save(root / "native.png", photo(SIZE, SIZE)),
        "photo.jpg": save(root / "photo.jpg", photo(50, 40), quality=90),
        "big.jpg": save(root / "big.jpg", photo(640, 480)),
        "gray.jpg": save(root / "gray.jpg", photo(45, 45, 1)),
        "rgba.png": save(root / "rgba.png", photo(40, 24, 4)),
        "solid_rgba.png": write_image(root / "solid_rgba.png", (200, 30, 90, 100), (20, 28), "RGBA"),
        "gray.png": save(root / "gray.png", photo(20, 36, 1)),
        "wide.png": save(root / "wide.png", photo(SIZE, 11)),
        "gray16.png": save(root / "gray16.png", np.random.default_rng(1).integers(0, 65536, (40, 50), np.uint16)),
        "image.bmp": save(root / "image.bmp", photo(33, 31)),
        "image.webp": save(root / "image.webp", photo(36, 36, 4), lossless=True),
        "animated.gif": root / "animated.gif",
        "rotated.jpg": exif_jpeg(root / "rotated.jpg", 6, "II"),
        "cmyk.jpg": root / "cmyk.jpg",
    }


@pytest.fixture(scope="module")
def decode():
    """`decode_image_tf` traced once per size, as the SavedModel runs it."""
    return {
        size: tf.function(lambda data, size=size: decode_image_tf(data, size), autograph=False)
        for size in (SIZE, 9, 28, 100)
    }


@pytest.mark.parametrize("name", ["native.png", "photo.jpg", "big.jpg", "gray.jpg", "rgba.png", "solid_rgba.png",
                                  "gray.png", "wide.png", "gray16.png", "image.bmp", "image.webp", "animated.gif",
                                  "rotated.jpg", "cmyk.jpg"])
@pytest.mark.parametrize("size", [SIZE, 9, 100])
def test_graph_decoder_gives_the_pixels_of_decode_image(images, decode, name, size):
    data = images[name].read_bytes()
    np.testing.assert_array_equal(decode[size](tf.constant(data)).numpy(), decode_image(data, size))


@pytest.mark.parametrize(("width", "height"), [(37, 5), (5, 37), (300, 200), (199, 200), (1, 80), (80, 1), (8, 3),
                                               (3, 2), (100, 1), (1000, 10)])
@pytest.mark.parametrize("size", [28, SIZE])
def test_graph_decoder_resizes_and_pads_any_shape_like_decode_image(tmp_path, decode, width, height, size):
    data = save(tmp_path / "image.png", photo(width, height, seed=width)).read_bytes()
    np.testing.assert_array_equal(decode[size](tf.constant(data)).numpy(), decode_image(data, size))


@pytest.mark.parametrize(("width", "height"), [(101, 1), (1, 101), (20000, 10)])
def test_graph_decoder_refuses_an_absurd_aspect_ratio(tmp_path, decode, width, height):
    data = write_image(tmp_path / "strip.png", (0, 0, 0), (width, height)).read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Expected an image at most 100 times as long as wide "
                                                             rf"or as wide as long .*\] \[{height}\] \[{width}\]"):
        decode[28](tf.constant(data))


BOUNDED = """
import json, resource, sys
import numpy as np, tensorflow as tf
from siamese.export import decode_image_tf
decode = tf.function(lambda data: decode_image_tf(data, 28), autograph=False)
small, *paths = sys.argv[2:]
decode(tf.constant(open(small, "rb").read()))  # TensorFlow's threads and kernels, before the limit
with open("/proc/self/status") as f:
    mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_AS)[1]))
report = {}
for path in paths:
    try:
        np.save(path + ".npy", decode(tf.constant(open(path, "rb").read())).numpy())
        report[path] = "decoded"
    except tf.errors.InvalidArgumentError as e:
        report[path] = e.message
print(json.dumps(report))
"""


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_graph_decoder_decodes_or_refuses_strips_within_1_5_gigabytes_of_address_space(tmp_path):
    small = save(tmp_path / "small.png", photo(40, 30))
    files = {f"{w}x{h}": write_image(tmp_path / f"{w}x{h}.png", (200, 10, 30), (w, h))
             for w, h in ((30000, 300), (300, 30000), (20000, 10), (60000, 1))}
    # The old decoder padded 20000x10 to a 1.2 GB square and transposed it (2.4 GB); 30000x300 to 2.7 GB.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", BOUNDED, str(3 << 29), str(small), *map(str, files.values())],
                            cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for name in ("20000x10", "60000x1"):
        assert "Expected an image at most 100 times as long as wide" in report[str(files[name])]
    for name in ("30000x300", "300x30000"):
        assert report[str(files[name])] == "decoded"
        np.testing.assert_array_equal(np.load(f"{files[name]}.npy"), decode_image(files[name], 28))


def test_16_bit_colour_png_keeps_the_high_byte_like_pillow(decode):
    for channels in (2, 3, 4):  # Pillow cannot write these; TensorFlow's encoder can
        wide = np.random.default_rng(channels).integers(0, 65536, (30, 40, channels), np.uint16)
        data = tf.io.encode_png(wide).numpy()
        np.testing.assert_array_equal(decode[SIZE](tf.constant(data)).numpy(), decode_image(data, SIZE))


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(10))
def test_jpeg_exif_orientation_is_applied_in_the_graph(tmp_path, decode, orientation, byte_order):
    data = exif_jpeg(tmp_path / "exif.jpg", orientation, byte_order).read_bytes()
    assert int(exif_orientation(tf.constant(data))) == (orientation if 1 <= orientation <= 8 else 1)
    np.testing.assert_array_equal(decode[SIZE](tf.constant(data)).numpy(), decode_image(data, SIZE))


def test_no_exif_reads_as_upright(images):
    for name in ("photo.jpg", "native.png"):
        assert int(exif_orientation(tf.constant(images[name].read_bytes()))) == 1
    assert int(exif_orientation(tf.constant(b""))) == 1


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_embedding("small_cnn", SIZE, DIM, weights=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model) -> Path:
    """The model exported three times into one folder: as built, reloaded from .keras, reloaded from .hdf5."""
    root = tmp_path_factory.mktemp("export")
    output = root / "exports"
    assert export_savedmodel(model, output, info={"source": "built"}) == output / "1"
    for version, suffix in ((2, ".keras"), (3, ".hdf5")):
        path = root / f"embedding{suffix}"
        model.save(path)
        assert export_savedmodel(load_embedding(path), output, info={"source": suffix}) == output / str(version)
    return output


SERVE = """
import json, sys
import numpy as np, tensorflow as tf
spec = json.loads(sys.argv[1])
images = tf.constant([open(p, "rb").read() for p in spec["images"]])
pixels = tf.constant(np.load(spec["pixels"]))
out, errors = {}, {}
for n, folder in enumerate(spec["exports"]):
    serve = tf.saved_model.load(folder).signatures
    out[f"pixels{n}"] = serve["serve_pixels"](pixels=pixels)["embeddings"].numpy()
    out[f"no_pixels{n}"] = serve["serve_pixels"](pixels=pixels[:0])["embeddings"].numpy()
# Every export has the same decoding graph: serve bytes from the last one only.
out["bytes"] = serve["serving_default"](images=images)["embeddings"].numpy()
out["no_bytes"] = serve["serving_default"](images=images[:0])["embeddings"].numpy()
for name, data in spec["bad"].items():
    try:
        serve["serving_default"](images=tf.constant([images[0].numpy(), data.encode("latin-1")]))
    except Exception as e:
        errors[name] = type(e).__name__
np.savez(spec["out"], **out)
print(json.dumps({"errors": errors, "ours": sorted(m for m in sys.modules if m.split(".")[0] == "siamese")}))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, exported, images):
    """Serve every export from a fresh process with TensorFlow alone; returns (embeddings, report, pixels)."""
    root = tmp_path_factory.mktemp("served")
    pixels = decode_images([str(images[n]) for n in ("native.png", "photo.jpg", "rgba.png")], SIZE)
    np.save(root / "pixels.npy", pixels)
    png = images["native.png"].read_bytes()
    spec = {
        "exports": [str(exported / v) for v in ("1", "2", "3")],
        "images": [str(path) for path in images.values()],
        "pixels": str(root / "pixels.npy"),
        "bad": {"text": "not an image", "empty": "", "truncated": png[: len(png) // 2].decode("latin-1"),
                "strip": write_image(root / "strip.png", size=(20000, 10)).read_bytes().decode("latin-1")},
        "out": str(root / "out.npz"),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", SERVE, json.dumps(spec)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(root / "out.npz"), json.loads(result.stdout.splitlines()[-1]), pixels


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_signatures_equal_the_keras_model_on_decode_image_pixels(served, model, images):
    out, report, pixels = served
    expected = model.predict(pixels, verbose=0)
    for n in range(3):  # built, from .keras, from .hdf5
        np.testing.assert_allclose(out[f"pixels{n}"], expected, atol=1e-5)
        assert out[f"no_pixels{n}"].shape == (0, DIM)
    # Every kind of file, JPEGs and resized images included: the graph decodes them to the same pixels.
    expected = model.predict(decode_images([str(p) for p in images.values()], SIZE), verbose=0)
    np.testing.assert_allclose(out["bytes"], expected, atol=1e-5)
    assert out["no_bytes"].shape == (0, DIM)
    assert report["ours"] == []  # TensorFlow alone served them


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_bad_bytes_raise_invalid_argument(served):
    _, report, _ = served
    assert report["errors"] == dict.fromkeys(("text", "empty", "truncated", "strip"), "InvalidArgumentError")


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_versions_and_their_description(exported, model):
    assert sorted(os.listdir(exported)) == ["1", "2", "3"]  # numbered in order, no temporary folder left
    for version, source in zip("123", ("built", ".keras", ".hdf5"), strict=True):
        info = json.loads((exported / version / export.INFO_FILE).read_text())
        assert info["source"] == source
        assert info["model_fingerprint"] == model_fingerprint(model)  # the same weights whatever the file
        assert (info["image_size"], info["embedding_dim"]) == (SIZE, DIM)
        assert list(info["signatures"]) == ["serving_default", "serve_pixels"]
        assert (info["tensorflow"], info["keras"]) == (tf.__version__, keras.__version__)
        assert (exported / version / "saved_model.pb").is_file()


@pytest.mark.slow  # over 5 s with its fixture: make test runs it, make test-fast not
def test_existing_version_is_refused(exported, model, tmp_path):
    with pytest.raises(SiameseError, match=r"Expected a new version number. Received: 2, but .*exports/2 already "
                                           r"exists. Fix: leave out the version to write version 4"):
        export_savedmodel(model, exported, version=2)
    for name in ("9", "10", "notes"):
        (tmp_path / name).mkdir()
    with pytest.raises(SiameseError, match="write version 11"):  # numbers, not names, are compared
        export_savedmodel(model, tmp_path, version=10)
    with pytest.raises(SiameseError, match="Expected a version >= 1. Received: 0"):
        export_savedmodel(model, tmp_path, version=0)


def test_a_failed_export_leaves_nothing_behind(tmp_path, model, monkeypatch):
    (tmp_path / "1").mkdir()

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.atomic, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_savedmodel(model, tmp_path)
    assert os.listdir(tmp_path) == ["1"]


def test_only_an_embedding_network_is_exported(tmp_path, model):
    with pytest.raises(SiameseError, match=r"Expected \w+ to be an embedding network with one uint8 image "
                                           r"input of shape \(batch, size, size, 3\).*Received: inputs "
                                           r"\[\(\(None, 32, 32, 3\), 'uint8'\), "):
        export_savedmodel(build_siamese(model), tmp_path)
    assert not any(tmp_path.iterdir())

