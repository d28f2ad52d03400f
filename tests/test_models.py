"""Embedding networks: uint8 in, unit vectors out, every backbone, weights paths, and saved-model round trips."""

from __future__ import annotations

import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

from siamese.errors import SiameseError
from siamese.losses import ContrastiveLoss
from siamese.models import build_embedding, build_siamese, build_triplet, load_embedding

PIXELS = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def run_python(code: str) -> str:
    """Run `code` in a fresh Python process and return its stdout (the test fails on a non-zero exit)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("small_cnn", 32), ("mobilenet_v2", 32), ("efficientnet_b0", 32), ("inception_v3", 75),
     pytest.param("inception_resnet_v2", 75, marks=pytest.mark.slow)],  # 8 s: not in make test-fast
)
def test_every_backbone_embeds_uint8_to_unit_vectors(backbone, size):
    model = build_embedding(backbone, size, embedding_dim=16, weights="none")
    assert model.inputs[0].dtype == "uint8" and model.input_shape == (None, size, size, 3)
    pixels = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = model.predict(pixels, verbose=0)
    assert out.shape == (2, 16) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_default_image_sizes_follow_the_backbone():
    assert build_embedding("small_cnn").input_shape == (None, 64, 64, 3)
    assert build_embedding("mobilenet_v2", weights=None).input_shape == (None, 224, 224, 3)


def test_freezing_and_fine_tuning_the_backbone():
    frozen = build_embedding("mobilenet_v2", 32, weights=None, trainable_layers=0)
    assert [w.path for w in frozen.trainable_weights] == ["projection/kernel", "projection/bias"]
    top = build_embedding("mobilenet_v2", 32, weights=None, trainable_layers=5)
    base = next(layer for layer in top.layers if isinstance(layer, keras.Model))
    assert [x.trainable for x in base.layers[-5:]] == [
        not isinstance(x, keras.layers.BatchNormalization) for x in base.layers[-5:]]
    assert not any(x.trainable for x in base.layers[:-5])
    assert 2 < len(top.trainable_weights) < len(build_embedding("mobilenet_v2", 32, weights=None).trainable_weights)


def test_local_weights_path_is_loaded(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "mobilenet_no_top.weights.h5"
    source.save_weights(path)
    model = build_embedding("mobilenet_v2", 32, weights=str(path))
    loaded = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for mine, theirs in zip(loaded.weights, source.weights, strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    with pytest.raises(SiameseError, match="Weights file not found: .*nope.h5. Fix: pass an existing file"):
        build_embedding("mobilenet_v2", 32, weights=str(tmp_path / "nope.h5"))


def test_offline_imagenet_download_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):  # what keras.utils.get_file raises with no network
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -3] no network")

    monkeypatch.setattr(keras.src.applications.mobilenet_v2.file_utils, "get_file", offline)
    with pytest.raises(SiameseError, match=r"ImageNet weights for mobilenet_v2 could not be downloaded \(no internet"
                                           r"\?\).*`weights='PATH'`"):
        build_embedding("mobilenet_v2", 32, weights="imagenet")


def test_bad_arguments():
    with pytest.raises(SiameseError, match="Expected `backbone` to be one of small_cnn, mobilenet_v2"):
        build_embedding("resnet9000")
    with pytest.raises(SiameseError, match="small_cnn has no ImageNet weights"):
        build_embedding("small_cnn", weights="imagenet")
    with pytest.raises(SiameseError, match="Expected `image_size` >= 8. Received: 4"):
        build_embedding("small_cnn", 4)


SUFFIXES = (".keras", ".hdf5", ".h5")


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_embedding_reloads_in_a_fresh_process_without_custom_objects(tmp_path):
    model = build_embedding("small_cnn", 32, embedding_dim=8)
    paths = [tmp_path / f"embedding{suffix}" for suffix in SUFFIXES]
    for path in paths:
        model.save(path)
    assert h5py.is_hdf5(paths[1]) and h5py.is_hdf5(paths[2]) and not h5py.is_hdf5(paths[0])
    np.save(tmp_path / "pixels.npy", PIXELS)
    out = run_python(
        "import keras, numpy as np, sys\n"
        f"x = np.load({str(tmp_path / 'pixels.npy')!r})\n"
        f"for n, p in enumerate({[str(p) for p in paths]!r}):\n"
        f"    np.save(f'{tmp_path}/out{{n}}.npy', keras.saving.load_model(p).predict(x, verbose=0))\n"
        "print('siamese' in sys.modules)"
    )
    assert out.strip() == "False"  # nothing of ours was needed
    expected = model.predict(PIXELS, verbose=0)
    for n, path in enumerate(paths):
        assert np.allclose(np.load(tmp_path / f"out{n}.npy"), expected, atol=1e-6), path
        assert load_embedding(path).output_shape == (None, 8)


@pytest.mark.slow  # over 5 s: make test runs it, make test-fast not
def test_siamese_and_triplet_models_reload_with_registered_layer_and_loss(tmp_path):
    embedding = build_embedding("small_cnn", 32, embedding_dim=8)
    model = build_siamese(embedding)
    model.compile(optimizer="adam", loss=ContrastiveLoss(margin=0.5))
    for suffix in (".keras", ".h5"):
        model.save(tmp_path / f"siamese{suffix}")
        build_triplet(embedding).save(tmp_path / f"triplet{suffix}")
    np.save(tmp_path / "pixels.npy", PIXELS)
    out = run_python(
        "import keras, numpy as np\nimport siamese.layers, siamese.losses\n"
        f"x = np.load({str(tmp_path / 'pixels.npy')!r})\n"
        "for suffix in ('.keras', '.h5'):\n"
        f"    m = keras.saving.load_model('{tmp_path}/siamese' + suffix)\n"
        f"    t = keras.saving.load_model('{tmp_path}/triplet' + suffix, compile=False)\n"
        f"    np.save('{tmp_path}/out' + suffix + '.npy', m.predict([x, x[::-1]], verbose=0))\n"
        "    print(type(m.loss).__name__, m.loss.margin, t.output_shape)"
    )
    assert out.splitlines() == ["ContrastiveLoss 0.5 (None, 2)"] * 2
    expected = model.predict([PIXELS, PIXELS[::-1]], verbose=0)
    for suffix in (".keras", ".h5"):
        assert np.allclose(np.load(tmp_path / f"out{suffix}.npy"), expected, atol=1e-6)


def test_load_embedding_refuses_what_is_not_one(tmp_path):
    with pytest.raises(SiameseError, match="Model file not found: .*missing.keras. Fix: pass the checkpoint"):
        load_embedding(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    with pytest.raises(SiameseError, match="junk.keras could not be loaded as a Keras model"):
        load_embedding(junk)
    siamese_path = tmp_path / "pair.keras"
    build_siamese(build_embedding("small_cnn", 32, embedding_dim=4)).save(siamese_path)
    with pytest.raises(SiameseError, match="Expected .*pair.keras to be an embedding network with one uint8 image"):
        load_embedding(siamese_path)


def test_mixed_precision_keeps_embeddings_float32():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_embedding("small_cnn", 32, embedding_dim=8)
        distance = build_siamese(model)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert model.get_layer("block0_conv0").compute_dtype == "float16"
    assert model.output.dtype == "float32" and distance.output.dtype == "float32"


def test_augmentation_acts_in_training_only(digits):
    from siamese.augment import augmentation
    from siamese.catalog import load_catalog
    from siamese.models import build_batch_all
    from siamese.pipeline import decoded_images

    images = decoded_images(load_catalog(digits / "test.json", digits), 16, progress=False)[:8]
    augment = augmentation(seed=0)
    same = keras.ops.convert_to_numpy(augment(images, training=False))
    assert same.dtype == np.uint8 and np.array_equal(same, images)
    changed = keras.ops.convert_to_numpy(augment(images, training=True))
    assert changed.dtype == np.uint8 and changed.shape == images.shape and not np.array_equal(changed, images)

    keras.utils.set_random_seed(0)
    embedding = build_embedding("small_cnn", 16, 8)
    plain = embedding.predict(images, verbose=0)
    model = build_batch_all(embedding, augment, views=2)
    inference = keras.ops.convert_to_numpy(model(images, training=False))
    assert inference.shape == (8, 2, 8)
    np.testing.assert_allclose(inference[:, 0], plain, atol=1e-6)
    np.testing.assert_allclose(inference[:, 1], plain, atol=1e-6)
    training = keras.ops.convert_to_numpy(model(images, training=True))
    assert not np.allclose(training[:, 0], training[:, 1])  # two different views of each image
    with pytest.raises(SiameseError, match="Expected `views` >= 1, and augmentation for `views` > 1."):
        build_batch_all(embedding, None, views=2)
