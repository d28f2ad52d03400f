"""Training on real data (scikit-learn digits): it learns, it saves, it resumes after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import write_catalog, write_image

from siamese.catalog import load_catalog
from siamese.checkpoint import sidecar
from siamese.config import TrainConfig
from siamese.errors import SiameseError
from siamese.images import BadImagesError
from siamese.models import build_embedding
from siamese.pipeline import decoded_images
from siamese.retrieval import precision_at_1
from siamese.training import train

pytestmark = pytest.mark.slow  # trains or runs end to end: make test runs it, make test-fast not

ROOT = Path(__file__).resolve().parents[1]
FAST = {"image_size": 16, "batch_size": 32, "images_per_epoch": 512, "val_pairs": 128, "embedding_dim": 16}


def digits_config(digits, out, **kwargs) -> TrainConfig:
    settings = {**FAST, **kwargs}
    return TrainConfig(labeled_data=str(digits / "train.json"), image_dir=str(digits), out=str(out), **settings)


def test_training_lowers_the_loss_and_beats_the_untrained_model_on_held_out_images(digits, tmp_path):
    # Validation on digits' test split: images the training never saw, of the ten classes. (On held-out
    # *classes* random convolutions already separate digits, and five training classes do not beat them:
    # see the note in docs/benchmarks.md.)
    config = digits_config(digits, tmp_path / "digits.keras", epochs=3, images_per_epoch=4096,
                           val_labeled_data=str(digits / "test.json"))
    result = train(config, verbose=0)
    losses = [h["loss"] for h in result.history[1:]]  # epoch 0 is the untrained network: no loss
    # supcon (the default): a mean of -log softmax, bounded below by the log of the positives per anchor
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.9 * losses[0]

    test = load_catalog(digits / "test.json", digits)
    images = decoded_images(test, 16, progress=False)
    keras.utils.set_random_seed(0)
    untrained = build_embedding("small_cnn", 16, embedding_dim=16)
    trained = keras.saving.load_model(result.checkpoint)
    before = precision_at_1(untrained.predict(images, verbose=0), test.image_item)
    after = precision_at_1(trained.predict(images, verbose=0), test.image_item)
    assert after > before + 0.05, (before, after)
    assert result.monitor == "val_map_at_r"
    assert result.best == pytest.approx(max(h["val_map_at_r"] for h in result.history))
    best = result.history[result.best_epoch]  # the checkpoint is the best epoch's model
    assert result.best_epoch > 0 and after == pytest.approx(best["val_precision_at_1"], abs=1e-6)
    # epoch 0 is the untrained network, scored before training on the same held-out images
    assert result.history[0]["epoch"] == 0 and set(result.history[0]) == {"epoch", "val_precision_at_1",
                                                                          "val_map_at_r"}
    assert result.history[0]["val_precision_at_1"] == pytest.approx(before, abs=1e-6)


def test_checkpoint_config_and_manifest_are_written_beside_each_other(digits, tmp_path):
    out = tmp_path / "file_saved_by_notebook.hdf5"
    result = train(digits_config(digits, out, epochs=1), verbose=0)
    assert h5py.is_hdf5(out) and result.checkpoint == out
    assert keras.saving.load_model(out).output_shape == (None, 16)
    config = json.loads(sidecar(out, "config").read_text())
    assert config["weights"] == "none" and config["image_size"] == 16 and config["seed"] == 0
    manifest = json.loads(sidecar(out, "manifest").read_text())
    catalog = load_catalog(digits / "train.json", digits)
    assert manifest["catalog"]["sha256"] == catalog.digest()
    assert manifest["versions"]["keras"] == keras.__version__
    assert manifest["devices"] == ["CPU"] and manifest["precision"] == "float32"
    assert manifest["backend"] == config["backend"] == "tensorflow" and "tensorflow" in manifest["versions"]
    assert config["tensorboard"] == str(tmp_path / "file_saved_by_notebook.logs")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(config["tensorboard"] + "/train", size_guidance={"tensors": 0})
    events.Reload()
    assert {"epoch_loss", "epoch_learning_rate"} <= set(events.Tags()["tensors"])
    split = manifest["split"]
    assert len(split["train_items"]) == 8 and len(split["val_items"]) == 2
    assert not set(split["train_items"]) & set(split["val_items"])
    assert [h["epoch"] for h in json.loads(sidecar(out, "history").read_text())] == [0, 1]
    assert not sidecar(out, "backup").exists()  # removed once training finished


def cli_train(digits, out, epochs, backend="tensorflow") -> list[str]:
    # JAX: XLA's CPU augmentation is 10x slower than TensorFlow's, so its epochs are shorter
    return [sys.executable, "utilities.py", "train", "--labeled-data", str(digits / "train.json"),
            "--image-dir", str(digits), "--output", str(out), "--epochs", str(epochs), "--image-size", "16",
            "--batch-size", "32", "--images-per-epoch", "512" if backend == "tensorflow" else "128",
            "--val-pairs", "128", "--embedding-dim", "16", "--backend", backend,
            "--augment", "--no-progress"]  # augmented: a resumed run restores the augmentation's random state too


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(digits, tmp_path, cache_dir, backend):
    epochs = 5
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    killed, straight = tmp_path / "killed.keras", tmp_path / "straight.keras"
    metadata = sidecar(killed, "backup") / "training_metadata.json"
    # the uninterrupted run, side by side (the CPU's results do not depend on what else runs)
    whole_log = (tmp_path / "straight.log").open("w")
    whole = subprocess.Popen(cli_train(digits, straight, epochs, backend), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=whole_log)
    process = subprocess.Popen(cli_train(digits, killed, epochs, backend), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metadata.exists() and json.loads(metadata.read_text())["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_epoch = json.loads(metadata.read_text())["epoch"]
    assert 2 <= saved_epoch < epochs

    resumed = subprocess.run(cli_train(digits, killed, epochs, backend), cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads(sidecar(killed, "manifest").read_text())
    assert manifest["resumed_from_epoch"] == saved_epoch
    history = json.loads(sidecar(killed, "history").read_text())
    assert [h["epoch"] for h in history] == list(range(epochs + 1))

    assert whole.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-2000:]
    whole_log.close()
    straight_history = json.loads(sidecar(straight, "history").read_text())
    a, b = keras.saving.load_model(killed), keras.saving.load_model(straight)
    if backend == "tensorflow":  # deterministic kernels on the CPU: the very same numbers
        assert straight_history == history
        for x, y in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    else:  # XLA's CPU kernels: the same to float tolerance
        assert [h.keys() for h in straight_history] == [h.keys() for h in history]
        for got, want in zip(history, straight_history, strict=True):
            assert got == pytest.approx(want, rel=1e-5)
        for x, y in zip(a.weights, b.weights, strict=True):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


def test_a_backup_from_other_settings_is_not_resumed(digits, tmp_path):
    out = tmp_path / "m.keras"
    backup = sidecar(out, "backup")
    backup.mkdir()
    (backup / "config.json").write_text(json.dumps({"epochs": 99}))
    with pytest.raises(SiameseError, match="m.backup holds an interrupted run with different settings. Fix: run "
                                           "the same command again to resume it, or delete"):
        train(digits_config(digits, out, epochs=1), verbose=0)


def test_training_runs_the_image_check_first(tmp_path):
    for item in ("a", "b", "c"):
        for k in range(3):
            write_image(tmp_path / f"{item}{k}.png", color=(80 * k, 40, 200 if item == "a" else 0))
    (tmp_path / "c2.png").write_bytes(b"broken")
    path = write_catalog(tmp_path, {i: {"images": [{"filename": f"{i}{k}.png"} for k in range(3)]} for i in "abc"})
    config = TrainConfig(labeled_data=str(path), image_dir=str(tmp_path), out=str(tmp_path / "m.keras"), epochs=2,
                         val_fraction=0.0, **FAST)
    with pytest.raises(BadImagesError, match="item 'c': c2.png: not an image"):
        train(config, verbose=0)
    assert not (tmp_path / "m.keras").exists()
    config.on_bad_image = "skip"
    with pytest.warns(UserWarning, match="Skipping 1 image"):
        result = train(config, verbose=0)
    # no validation items: the last epoch's model (a batch-all loss does not compare across epochs)
    assert result.monitor == "loss" and result.best_epoch == 2 and result.best == result.history[-1]["loss"]
    assert result.checkpoint.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"out": "model.pt"}, r"Expected `out` to end in .keras, .h5, .hdf5. Received: model.pt"),
     ({"loss": "hinge"}, r"Expected `loss` to be one of contrastive, triplet, supcon. Received: 'hinge'"),
     ({"loss": "supcon", "batches": "pairs"}, r"Expected `batches` to be 'pk' with `loss='supcon'`. Received: 'pairs'"),
     ({"monitor": "loss"}, r"Expected `monitor` to be one of val_map_at_r, val_precision_at_1, val_loss. "
                           r"Received: 'loss'"),
     ({"temperature": 0.0}, r"Expected `temperature` > 0. Received: 0.0"),
     ({"views": 0}, r"Expected `views` >= 1. Received: 0"),
     ({"learning_rate": float("nan")}, r"Expected a finite `learning_rate`. Received: nan"),
     ({"margin": float("inf")}, r"Expected a finite `margin`. Received: inf"),
     ({"epochs": 0}, r"Expected `epochs` >= 1. Received: 0"),
     ({"margin": -1.0}, r"Expected `margin` and `learning_rate` > 0"),
     ({"cache": "gpu"}, r"Expected `cache` to be auto, none, memory, disk. Received: 'gpu'"),
     ({"batches": "hard"}, r"Expected `batches` to be one of pk, pairs. Received: 'hard'"),
     ({"images_per_item": 1}, r"Expected 2 <= `images_per_item` <= `batch_size` with `batches='pk'`. "
                              r"Received: 1 and 64"),
     ({"lr_schedule": "step"}, r"Expected `lr_schedule` to be one of constant, cosine. Received: 'step'"),
     ({"weight_decay": -0.1}, r"Expected `weight_decay` >= 0. Received: -0.1")],
)
def test_settings_are_checked_before_anything_runs(tmp_path, change, message):
    config = TrainConfig(labeled_data="x.json", image_dir=str(tmp_path), **change)
    with pytest.raises(SiameseError, match=message):
        config.resolved()


def test_a_tensorboard_folder_that_is_a_file_is_refused_before_training(digits, tmp_path):
    (tmp_path / "logs").write_text("mine")
    with pytest.raises(SiameseError, match=r"Expected `tensorboard` to name a folder for the logs\. Received: .*logs, "
                                           r"which is a file\. Fix: name another folder"):
        train(digits_config(digits, tmp_path / "m.keras", tensorboard=str(tmp_path / "logs")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"] and (tmp_path / "logs").read_text() == "mine"


def test_cli_train_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "utilities.py", "train", "--labeled-data", "x.json", "--image-dir",
                             str(tmp_path), "--output", "model.pt"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "utilities.py: error: Expected --output to end in .keras, .h5, .hdf5. Received: model.pt"]


@pytest.mark.parametrize("batches", ["pk", "pairs"])
def test_triplet_loss_trains_behind_the_same_flag(digits, tmp_path, batches):
    result = train(digits_config(digits, tmp_path / "triplet.keras", epochs=2, loss="triplet", batches=batches),
                   verbose=0)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[-1]["loss"] < result.history[1]["loss"]
    assert "val_loss" in result.history[1] and result.monitor == "val_map_at_r"
    assert keras.saving.load_model(result.checkpoint).output_shape == (None, 16)


def test_weight_decay_shrinks_the_weights_by_the_decoupled_rule(digits, tmp_path):
    """AdamW: each step multiplies every weight by (1 - learning rate x weight decay) besides Adam's update; 0 is
    plain Adam. Adam's own moves are at most about the learning rate per entry and step, small beside the
    projection's initial weights (about 0.12), so the decayed kernel's norm is the decay's share of the other."""
    norms = {}
    for decay in (0.0, 100.0):
        config = digits_config(digits, tmp_path / f"decay{decay}.keras", epochs=1, val_fraction=0,
                               lr_schedule="constant", learning_rate=0.001, weight_decay=decay)
        result = train(config, verbose=0)
        assert json.loads(sidecar(result.checkpoint, "config").read_text())["weight_decay"] == decay
        kernel = keras.saving.load_model(result.checkpoint).get_layer("projection").kernel
        norms[decay] = float(np.linalg.norm(keras.ops.convert_to_numpy(kernel)))
    steps = FAST["images_per_epoch"] // FAST["batch_size"]
    assert norms[100.0] / norms[0.0] == pytest.approx((1 - 0.001 * 100) ** steps, abs=0.05), norms


def test_drawn_pairs_train_too(digits, tmp_path):
    config = digits_config(digits, tmp_path / "pairs.keras", epochs=2, batches="pairs", lr_schedule="constant")
    result = train(config, verbose=0)
    assert result.history[-1]["loss"] < result.history[1]["loss"]
    settings = json.loads(sidecar(result.checkpoint, "config").read_text())
    assert (settings["batches"], settings["loss"], settings["mining"]) == ("pairs", "contrastive", None)


def test_a_run_that_wrecks_training_keeps_the_untrained_weights(digits, tmp_path):
    out = tmp_path / "wrecked.keras"
    config = digits_config(digits, out, epochs=2, learning_rate=50.0, lr_schedule="constant")
    message = (r"no epoch beat the untrained network on the held-out items \(before training: val_precision_at_1 "
               r"0\.\d{4}, val_map_at_r 0\.\d{4}; (the best epoch by val_map_at_r, \d: .*|no epoch with finite "
               r"figures)\): .*wrecked.keras keeps the untrained weights")
    with pytest.warns(UserWarning, match=message):
        result = train(config, verbose=0)
    assert result.kept_untrained and result.best_epoch == 0
    assert result.best == result.history[0]["val_map_at_r"]
    keras.utils.set_random_seed(0)
    untrained = build_embedding("small_cnn", 16, embedding_dim=16)
    for kept, start in zip(keras.saving.load_model(out).weights, untrained.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(kept), keras.ops.convert_to_numpy(start))
    manifest = json.loads(sidecar(out, "manifest").read_text())
    assert manifest["best"] == {"monitor": "val_map_at_r", "value": result.best, "epoch": 0, "kept_untrained": True}
    assert json.loads(sidecar(out, "history").read_text())[0]["epoch"] == 0


def test_augmented_training_exports_the_pixels_it_validates_on(digits, tmp_path):
    """Augmentation wraps the embedding network in training only: the checkpoint holds no augmentation layer,
    embeds held-out images as validation measured them, and its SavedModel gives the same embeddings."""
    import tensorflow as tf

    from siamese.export import export_savedmodel
    from siamese.retrieval import retrieval_metrics

    config = digits_config(digits, tmp_path / "augmented.keras", epochs=2, images_per_epoch=4096, val_images=10_000,
                           val_labeled_data=str(digits / "test.json"), augment=True)
    result = train(config, verbose=0)
    settings = json.loads(sidecar(result.checkpoint, "config").read_text())
    assert settings["augment"] is True and settings["views"] == 2
    assert result.best_epoch > 0  # a trained model, not the kept start
    model = keras.saving.load_model(result.checkpoint)
    assert not [layer.name for layer in model.layers if "augment" in layer.name or "random" in layer.name]
    val = load_catalog(digits / "test.json", digits)
    pixels = decoded_images(val, 16, progress=False)
    embeddings = model.predict(pixels, verbose=0)
    measured = result.history[result.best_epoch]
    assert retrieval_metrics(embeddings, val.image_item, (1,))["map_at_r"] == pytest.approx(measured["val_map_at_r"],
                                                                                            abs=1e-6)
    served = tf.saved_model.load(str(export_savedmodel(model, tmp_path / "export")))
    out = served.signatures["serve_pixels"](pixels=tf.constant(pixels[:64]))["embeddings"].numpy()
    np.testing.assert_allclose(out, embeddings[:64], atol=1e-5)


def test_an_epoch_must_be_no_worse_on_every_held_out_figure_to_replace_the_start(tmp_path):
    """Better MAP@R but a worse precision@1 than the untrained network does not replace it; no worse on both does."""
    from types import SimpleNamespace

    from siamese.checkpoint import BestCheckpoint

    metrics = SimpleNamespace(initial={"val_precision_at_1": 0.80, "val_map_at_r": 0.30})
    embedding = build_embedding("small_cnn", 16, 4)
    out = tmp_path / "m.keras"
    checkpoint = BestCheckpoint(embedding, out, "val_map_at_r", "max", tmp_path / "best.json", 0, metrics)
    checkpoint.on_train_begin()
    assert (checkpoint.best_epoch, checkpoint.best) == (0, 0.30) and out.exists()
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_precision_at_1": 0.70, "val_map_at_r": 0.35})
    assert checkpoint.best_epoch == 0
    checkpoint.on_epoch_end(1, {"loss": 0.9, "val_precision_at_1": 0.80, "val_map_at_r": 0.31})
    assert (checkpoint.best_epoch, checkpoint.best) == (2, 0.31)
    checkpoint.on_epoch_end(2, {"loss": 0.8, "val_precision_at_1": 0.85, "val_map_at_r": 0.305})
    assert checkpoint.best_epoch == 2 and [h["epoch"] for h in checkpoint.history] == [0, 1, 2, 3]


def test_a_diverged_run_with_nothing_held_out_saves_nothing_and_says_so(digits, tmp_path):
    out = tmp_path / "diverged.keras"
    config = digits_config(digits, out, epochs=2, val_fraction=0, learning_rate=1e38, lr_schedule="constant")
    with pytest.raises(SiameseError, match=r"Training diverged: the loss was not finite by the end of epoch 1, so no "
                                           r"model was saved at .*diverged.keras. Fix: lower `learning_rate`."):
        train(config, verbose=0)
    assert not out.exists()
    # the diverged epoch is in the history as nulls: strict JSON, no NaN
    history = json.loads(sidecar(out, "history").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert history == [{"epoch": 1, "loss": None}]


def test_cli_training_into_a_log_prints_one_line_an_epoch(digits, tmp_path):
    """Output that is not a terminal (CI, `> file`) gets no redrawn progress bars, without --no-progress."""
    command = [a for a in cli_train(digits, tmp_path / "log.keras", 2) if a != "--no-progress"]
    result = subprocess.run([*command, "--tensorboard", str(tmp_path / "board")], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "board").iterdir()) == ["train", "validation"]
    assert not (tmp_path / "log.logs").exists()
    assert "━" not in result.stdout and "\r" not in result.stdout + result.stderr
    epochs = [line for line in result.stdout.splitlines() if " - loss: " in line]
    assert len(epochs) == 2 and all("val_map_at_r" in line for line in epochs), result.stdout
