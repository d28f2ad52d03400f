"""Export the embedding network as a TensorFlow SavedModel, in the numbered version folder TF Serving expects.

`export_savedmodel(model, "exports/mymodel")` writes `exports/mymodel/1` (then `2`, ...) with two signatures:

- `serving_default`: `images`, a 1-D `tf.string` batch of encoded JPEG, PNG, GIF, BMP or WebP files, to
  `{"embeddings": float32 (batch, embedding_dim)}`. The decoding runs in the graph (a client needs only
  TensorFlow) and gives the same pixels as `siamese.images.decode_image`: first frame, grayscale and 16-bit
  converted like Pillow, transparency composited onto white, resized with Pillow's antialiased bilinear filter
  (re-implemented with its fixed-point arithmetic, `pillow_resize`) to `siamese.images.fitted_size` and padded
  to a centred square on white; an aspect ratio over `siamese.images.MAX_ASPECT_RATIO` is refused
  (`InvalidArgumentError`). JPEGs are decoded with the accurate integer DCT and turned upright from their EXIF
  orientation tag.
- `serve_pixels`: `pixels`, uint8 `(batch, image_size, image_size, 3)`, to the same output.

Where the graph and Pillow differ (use `decode_image` and `serve_pixels` for such files): the EXIF orientation
of PNG, WebP and TIFF files and an XMP-only orientation are ignored; transparency given by a PNG `tRNS` colour
key in an RGB or grayscale image and GIF transparency (TensorFlow decodes it as black) are not made white;
there is no decompression-bomb limit beyond the server's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from siamese import atomic
from siamese.errors import SiameseError
from siamese.images import MAX_ASPECT_RATIO
from siamese.models import check_embedding_network, model_fingerprint

BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serve_pixels"
INFO_FILE = "siamese.json"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_HEAD = 1 << 17  # the Exif APP1 segment (at most 64 KiB) sits near the start of a JPEG
_EXIF_MAX_ENTRIES = 256
_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (Resample.c)


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation tag (1-8) of JPEG bytes, read with tensor ops; 1 when absent or malformed."""
    head = tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_HEAD), tf.uint8)
    head = tf.cast(tf.pad(head, [[0, 16]]), tf.int32)
    n = tf.size(head)

    def byte(i):
        return tf.gather(head, tf.clip_by_value(i, 0, n - 1))

    # An APP1 marker, two length bytes (any), then "Exif\0\0": the first match is the image's own Exif.
    pattern = [0xFF, 0xE1, None, None, *b"Exif\0\0"]
    windows = [tf.equal(head[j : n - len(pattern) + j], b) for j, b in enumerate(pattern) if b is not None]
    matches = tf.reduce_all(tf.stack(windows), axis=0)
    tiff = tf.argmax(tf.cast(matches, tf.int32), output_type=tf.int32) + len(pattern)
    little = tf.equal(byte(tiff), ord("I"))
    byte_order_ok = tf.equal(byte(tiff), byte(tiff + 1)) & (little | tf.equal(byte(tiff), ord("M")))

    def uint(i, size):
        values = [byte(i + k) for k in range(size)]
        big = sum(v * 256 ** (size - 1 - k) for k, v in enumerate(values))
        return tf.where(little, sum(v * 256**k for k, v in enumerate(values)), big)

    ifd = tiff + uint(tiff + 4, 4)
    entries = ifd + 2 + 12 * tf.range(_EXIF_MAX_ENTRIES)
    hits = tf.equal(uint(entries, 2), 0x0112) & (tf.range(_EXIF_MAX_ENTRIES) < uint(ifd, 2))
    value = uint(entries[tf.argmax(tf.cast(hits, tf.int32))] + 8, 2)
    valid = tf.reduce_any(matches) & byte_order_ok & tf.reduce_any(hits) & (value >= 1) & (value <= 8)
    return tf.where(valid, value, 1)


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turn an `(h, w, c)` image upright from its EXIF orientation, like `PIL.ImageOps.exif_transpose`."""
    transpose = [1, 0, 2]
    return tf.switch_case(
        orientation - 1,
        [
            lambda: image,
            lambda: image[:, ::-1],
            lambda: image[::-1, ::-1],
            lambda: image[::-1],
            lambda: tf.transpose(image, transpose),
            lambda: tf.image.rot90(image, 3),
            lambda: tf.transpose(image, transpose)[::-1, ::-1],
            lambda: tf.image.rot90(image, 1),
        ],
    )


def _decode_channels(data: tf.Tensor) -> tf.Tensor:
    """Decode one image file to uint8 `(h, w, c)`, c in 1-4, the way Pillow reads it (JPEGs upright)."""

    def jpeg():
        image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return _orient(image, exif_orientation(data))

    def png():
        wide = tf.cast(tf.io.decode_png(data, dtype=tf.uint16), tf.int32)
        # Pillow rounds 16-bit grayscale to 8 bits and keeps the high byte of 16-bit colour; 8-bit PNGs come
        # back as v * 257, which both formulas map back to v.
        gray = (2 * wide + 257) // 514
        return tf.cast(tf.where(tf.shape(wide)[2] == 1, gray, wide // 256), tf.uint8)

    return tf.case(
        [(tf.io.is_jpeg(data), jpeg), (tf.equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE), png)],
        default=lambda: tf.io.decode_image(data, expand_animations=False),
        exclusive=True,
    )


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Gray, gray + alpha, RGB or RGBA uint8 to RGB, transparency composited onto white like Pillow."""
    channels = tf.shape(image)[2]

    def composite():
        wide = tf.cast(image, tf.int32)
        color, alpha = tf.gather(wide, tf.where(channels == 2, [0, 0, 0], [0, 1, 2]), axis=2), wide[..., -1:]
        return tf.cast((color * alpha + 255 * (255 - alpha) + 127) // 255, tf.uint8)

    return tf.case(
        [(channels == 3, lambda: image), (channels == 1, lambda: tf.tile(image, [1, 1, 3]))], default=composite
    )


def _fitted_size(height: tf.Tensor, width: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`siamese.images.fitted_size` in the graph, as `(height, width)`: the long side becomes `size`, the short
    side `short * size / long` rounded half up, at least 1 (int64 arithmetic, so no overflow)."""
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    long = tf.maximum(height, width)

    def fit(n):
        return tf.cast(tf.maximum((2 * n * size + long) // (2 * long), 1), tf.int32)

    return fit(height), fit(width)


def _check_aspect_ratio(image: tf.Tensor) -> tf.Tensor:
    """`image` once its long side is checked to be at most `MAX_ASPECT_RATIO` times its short side, like
    `siamese.images.open_rgb`; otherwise `InvalidArgumentError`, before anything is resized."""
    height, width = tf.cast(tf.shape(image)[0], tf.int64), tf.cast(tf.shape(image)[1], tf.int64)
    check = tf.debugging.Assert(
        tf.maximum(height, width) <= MAX_ASPECT_RATIO * tf.minimum(height, width),
        [f"Expected an image at most {MAX_ASPECT_RATIO} times as long as wide or as wide as long "
         "(siamese.images.MAX_ASPECT_RATIO). Received: an image of height, width", height, width, "Fix: crop it"],
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


def _pad_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Pad an `(h, w, 3)` image, h and w at most `size`, to a centred `size` x `size` square on white, the odd
    pixel right or below, like `siamese.images.square`."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (size - h) // 2, (size - w) // 2
    return tf.pad(image, [[top, size - h - top], [left, size - w - left], [0, 0]], constant_values=255)


def _resample_rows(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Resample the rows (axis 0) of a uint8 `(h, w, c)` image to `size` (an int32 scalar), like Pillow's 8-bit
    bilinear pass. Memory: the input, the `(size, w, c)` output and `size` x taps coefficients (taps about
    `2 h / size`), whatever the shape."""
    in_size = tf.shape(image)[0]
    scale = tf.cast(in_size, tf.float64) / tf.cast(size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)  # the filter widens by the scale factor when shrinking: antialiasing
    taps = 2 * tf.cast(tf.math.ceil(filterscale), tf.int32) + 1
    center = (tf.cast(tf.range(size), tf.float64) + 0.5) * scale
    first = tf.maximum(tf.floor(center - filterscale + 0.5), 0.0)
    end = tf.minimum(tf.floor(center + filterscale + 0.5), tf.cast(in_size, tf.float64))
    x = first[:, None] + tf.range(taps, dtype=tf.float64)
    weights = tf.maximum(1.0 - tf.abs((x - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    weights = tf.where(x < end[:, None], weights, 0.0)
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    coeffs = tf.cast(tf.floor(weights * (1 << _PRECISION_BITS) + 0.5), tf.int32)
    index = tf.minimum(tf.cast(x, tf.int32), in_size - 1)
    # One tap at a time: memory stays at one output image whatever the shrink factor.
    total = tf.foldl(
        lambda acc, tap: acc + tf.cast(tf.gather(image, tap[0]), tf.int32) * tap[1][:, None, None],
        (tf.transpose(index), tf.transpose(coeffs)),
        initializer=tf.fill([size, tf.shape(image)[1], tf.shape(image)[2]], 1 << (_PRECISION_BITS - 1)),
    )
    return tf.cast(tf.clip_by_value(total // (1 << _PRECISION_BITS), 0, 255), tf.uint8)


def pillow_resize(image: tf.Tensor, shape: tuple[int | tf.Tensor, int | tf.Tensor]) -> tf.Tensor:
    """Resize a uint8 `(h, w, c)` image to `shape = (height, width)` bit for bit like Pillow's
    `resize(BILINEAR)` of the width and then of the height (the two calls `siamese.images.square` makes).

    Each pass is Pillow's: its triangle filter widened by the scale factor when shrinking (antialiasing) and its
    fixed-point rounding to uint8; `tf.image.resize(antialias=True)` is off by up to 1. A side that keeps its
    length comes out unchanged (that pass is exact), as Pillow skips it.
    """
    height, width = (tf.convert_to_tensor(n, tf.int32) for n in shape)
    columns = _resample_rows(tf.transpose(image, [1, 0, 2]), width)
    return _resample_rows(tf.transpose(columns, [1, 0, 2]), height)


def decode_image_tf(data: tf.Tensor, size: int) -> tf.Tensor:
    """The graph twin of `siamese.images.decode_image`: one encoded image (scalar string) to uint8 `(size,
    size, 3)`. Raises `tf.errors.InvalidArgumentError` for data that is not a JPEG, PNG, GIF, BMP or WebP and
    for an aspect ratio over `MAX_ASPECT_RATIO`."""
    image = _check_aspect_ratio(_to_rgb(_decode_channels(data)))
    height, width = _fitted_size(tf.shape(image)[0], tf.shape(image)[1], size)
    same = (height == tf.shape(image)[0]) & (width == tf.shape(image)[1])
    image = tf.cond(same, lambda: image, lambda: pillow_resize(image, (height, width)))
    return tf.ensure_shape(_pad_square(image, size), (size, size, 3))


def _next_version(output: Path) -> int:
    versions = [int(p.name) for p in output.iterdir() if p.is_dir() and re.fullmatch(r"[0-9]+", p.name)]
    return max(versions, default=0) + 1


def export_savedmodel(
    model: keras.Model, output: str | os.PathLike, version: int | None = None, info: dict | None = None
) -> Path:
    """Write `model` (an embedding network) as a SavedModel to `output/<version>` and return that folder.

    `version` None (default) is one more than the largest numbered folder in `output` (1 for a new one); an
    existing version is refused. The folder also holds `siamese.json`: `info` (default none) plus the image
    size, embedding dim, signatures, model fingerprint and TensorFlow and Keras versions. It is written to a
    temporary folder in `output` and renamed when complete, so a crash never leaves a half-written version.
    """
    check_embedding_network(model, model.name)
    size, embedding_dim = model.input_shape[1], model.output_shape[-1]
    output = Path(output)
    if version is not None and version < 1:
        raise SiameseError(f"Expected a version >= 1. Received: {version}")

    def embed(pixels):
        # Batch norm rejects an empty batch in a graph: answer it without calling the model.
        empty = tf.zeros((0, embedding_dim), tf.float32)
        embeddings = tf.cond(tf.shape(pixels)[0] == 0, lambda: empty, lambda: model(pixels, training=False))
        return {"embeddings": embeddings}

    def embed_bytes(images):
        spec = tf.TensorSpec((size, size, 3), tf.uint8)
        return embed(tf.map_fn(lambda data: decode_image_tf(data, size), images, fn_output_signature=spec))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(BYTES_SIGNATURE, embed_bytes, [tf.TensorSpec((None,), tf.string, name="images")])
    archive.add_endpoint(PIXELS_SIGNATURE, embed, [tf.TensorSpec((None, size, size, 3), tf.uint8, name="pixels")])
    description = {
        **(info or {}),
        "image_size": size,
        "embedding_dim": embedding_dim,
        "signatures": {
            BYTES_SIGNATURE: {"input": "images", "output": "embeddings"},
            PIXELS_SIGNATURE: {"input": "pixels", "output": "embeddings"},
        },
        "model_fingerprint": model_fingerprint(model),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    created = not output.exists()
    with atomic.output_lock(output):  # two exports cannot both take the next version
        output.mkdir(parents=True, exist_ok=True)
        try:
            return _write_version(archive, description, output, version)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    output.rmdir()
            raise


def _write_version(archive: keras.export.ExportArchive, description: dict, output: Path, version: int | None) -> Path:
    """Write `archive` and `description` (siamese.json) to `output/<version>` through a temporary folder."""
    if version is None:
        version = _next_version(output)
    final = output / str(version)
    if final.exists():
        raise SiameseError(
            f"Expected a new version number. Received: {version}, but {final} already exists. "
            f"Fix: leave out the version to write version {_next_version(output)}, or remove {final}."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=output))
    try:
        try:
            archive.write_out(tmp, verbose=False)
        except tf.errors.OpError as e:  # TensorFlow's own file writes: a full disk is ResourceExhaustedError
            raise _os_error(e, tmp) from None
        atomic.write_json(tmp / INFO_FILE, description)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _os_error(e: tf.errors.OpError, folder: Path) -> OSError:
    """The OSError a TensorFlow file error stands for (its message ends "...; No space left on device")."""
    reason = e.message.rsplit(";", 1)[-1].split("[Op:")[0].strip()
    code = next((c for c in errno.errorcode if os.strerror(c) == reason), None)
    return OSError(code, reason, str(folder.parent))
