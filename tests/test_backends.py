"""Training on JAX as on TensorFlow: checkpoints cross backends both ways, a JAX-trained model exports the same
embeddings, DataParallel on 2 virtual CPU devices trains like one device, and TensorBoard logs are written.

JAX runs in a subprocess: the backend is chosen before keras is first imported, and this process runs TensorFlow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import siamese.models as models_module
from siamese.catalog import load_catalog
from siamese.checkpoint import sidecar
from siamese.config import TrainConfig
from siamese.distribute import Placement
from siamese.errors import SiameseError
from siamese.export import export_savedmodel
from siamese.models import build_embedding, load_embedding, save_embedding
from siamese.pipeline import decoded_images
from siamese.training import train

pytestmark = pytest.mark.slow  # trains in subprocesses: make test runs it, make test-fast not

ROOT = Path(__file__).resolve().parents[1]
FAST = {"image_size": 16, "batch_size": 32, "images_per_epoch": 512, "val_pairs": 128, "embedding_dim": 16}

ON_JAX = """
import importlib.abc, json, sys
spec = json.loads(sys.argv[1])


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")


if spec.get("hide_tensorflow"):  # as on a machine without it
    sys.meta_path.insert(0, NoTensorFlow())
import keras, numpy as np
from siamese.config import TrainConfig
from siamese.distribute import Placement
from siamese.models import load_embedding
from siamese.training import train
assert keras.backend.backend() == "jax", keras.backend.backend()
report = {}
if "train" in spec:
    report["history"] = train(TrainConfig(**spec["train"]), verbose=0).history
pixels = np.load(spec["pixels"])
for path in spec.get("embed", []):  # each checkpoint's embeddings of the pixels, computed on JAX
    model = load_embedding(path)
    np.save(path + ".jax.npy", keras.ops.convert_to_numpy(model(pixels, training=False)))
    for copy in spec.get("resave", {}).get(path, []):
        model.save(copy)
print(json.dumps(report))
"""


def start_on_jax(spec: dict, devices: int = 1) -> subprocess.Popen:
    """Start `ON_JAX` with `spec` in a fresh process on the JAX backend, over `devices` virtual CPU devices."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", ON_JAX, json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_of(process: subprocess.Popen) -> dict:
    """What a process of `start_on_jax` reported, once it ended well."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def on_jax(spec: dict, devices: int = 1) -> dict:
    """Run `ON_JAX` with `spec` on the JAX backend and return its report."""
    return report_of(start_on_jax(spec, devices))


def settings(digits, out, **kwargs) -> dict:
    return {"labeled_data": str(digits / "train.json"), "image_dir": str(digits), "out": str(out), **FAST, **kwargs}


@pytest.fixture(scope="module")
def pixels(digits, tmp_path_factory) -> tuple[np.ndarray, Path]:
    """32 held-out digits as the models see them (16 px), and the .npy file holding them."""
    images = decoded_images(load_catalog(digits / "test.json", digits), 16, progress=False)[::10][:32]
    path = tmp_path_factory.mktemp("pixels") / "pixels.npy"
    np.save(path, images)
    return images, path


def event_tags(folder: Path) -> set[str]:
    """The scalar tags Keras's TensorBoard callback wrote under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return set(events.Tags()["tensors"])


def test_jax_trains_and_its_checkpoint_loads_and_exports_on_tensorflow_with_the_same_embeddings(digits, tmp_path,
                                                                                                  pixels):
    images, pixels_file = pixels
    out = tmp_path / "jax.keras"
    config = settings(digits, out, epochs=2, images_per_epoch=2048, val_labeled_data=str(digits / "test.json"))
    h5 = tmp_path / "jax.hdf5"
    report = on_jax({"train": config, "pixels": str(pixels_file), "embed": [str(out)], "resave": {str(out): [str(h5)]}})

    history = report["history"]
    losses = [h["loss"] for h in history[1:]]
    assert np.isfinite(losses).all() and losses[0] > losses[1], losses
    assert max(h["val_map_at_r"] for h in history[1:]) > history[0]["val_map_at_r"] + 0.05  # it learns
    manifest = json.loads(sidecar(out, "manifest").read_text())
    assert manifest["backend"] == "jax" and "jax" in manifest["versions"] and manifest["devices"] == ["cpu:0 cpu"]
    assert json.loads(sidecar(out, "config").read_text())["backend"] == "jax"
    # the logs of both backends are Keras's TensorBoard logs, beside the checkpoint
    assert {"epoch_loss", "epoch_learning_rate"} <= event_tags(tmp_path / "jax.logs" / "train")
    assert {"epoch_loss", "epoch_precision_at_1", "epoch_map_at_r"} <= event_tags(tmp_path / "jax.logs" / "validation")

    on_jax_embeddings = np.load(f"{out}.jax.npy")
    for path in (out, h5):
        model = load_embedding(path)
        np.testing.assert_allclose(model.predict(images, verbose=0), on_jax_embeddings, atol=1e-5)
    folder = export_savedmodel(load_embedding(out), tmp_path / "exports")
    pngs = []
    for image in images:  # lossless and at the model's size: the graph decodes them to the same pixels
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    served = tf.saved_model.load(str(folder)).signatures["serving_default"](images=tf.constant(pngs))
    np.testing.assert_allclose(served["embeddings"].numpy(), on_jax_embeddings, atol=1e-5)


def test_tensorflow_checkpoints_load_on_jax_with_the_same_embeddings(digits, tmp_path, pixels, monkeypatch):
    images, pixels_file = pixels
    trained = train(TrainConfig(**settings(digits, tmp_path / "tf.hdf5", epochs=1, tensorboard="none")), verbose=0)
    # one built for several tf.distribute replicas: its batch norm says synchronized, which only TensorFlow has
    monkeypatch.setattr(models_module, "_synchronized", lambda: True)
    keras.utils.set_random_seed(1)
    replicated = build_embedding("small_cnn", 16, 16)
    save_embedding(replicated, tmp_path / "replicated.keras")
    assert replicated.get_layer("block0_bn0").synchronized  # still, for the training that goes on

    checkpoints = [trained.checkpoint, tmp_path / "replicated.keras"]
    on_jax({"pixels": str(pixels_file), "embed": [str(p) for p in checkpoints]})
    for path in checkpoints:
        np.testing.assert_allclose(np.load(f"{path}.jax.npy"), load_embedding(path).predict(images, verbose=0),
                                   atol=1e-5)


def test_data_parallel_over_two_devices_trains_like_one_device(digits, tmp_path, pixels):
    images, pixels_file = pixels
    processes = {}
    for devices in (1, 2):  # side by side: each on its own core, mostly
        out = tmp_path / f"devices{devices}.keras"
        # one step an epoch: each epoch's loss is that step's
        config = settings(digits, out, epochs=4, batch_size=16, images_per_epoch=16, tensorboard="none")
        # training on JAX needs no TensorFlow (only the TensorBoard logs would)
        processes[devices] = start_on_jax({"train": config, "pixels": str(pixels_file), "hide_tensorflow": True},
                                          devices)
    runs = {devices: report_of(process)["history"] for devices, process in processes.items()}
    for devices in (1, 2):
        assert len(json.loads(sidecar(tmp_path / f"devices{devices}.keras", "manifest").read_text())["devices"]) == (
            devices)
    one, two = ([h["loss"] for h in runs[n][1:]] for n in (1, 2))
    assert len(one) == 4 and len(set(one)) == 4  # four different steps
    np.testing.assert_allclose(two, one, rtol=1e-5)
    for key in ("val_loss", "val_map_at_r"):
        np.testing.assert_allclose([h[key] for h in runs[2][1:]], [h[key] for h in runs[1][1:]], rtol=1e-4)
    # the same model: AdamW divides by the root of the squared gradients, which makes a near-zero one's last bits
    # move its weight by up to a step (3e-3), so the embeddings are compared, not each weight
    one_model, two_model = (load_embedding(tmp_path / f"devices{n}.keras") for n in (1, 2))
    np.testing.assert_allclose(two_model.predict(images, verbose=0), one_model.predict(images, verbose=0), atol=1e-4)
    two_devices = Placement("jax", ["cpu:0 cpu", "cpu:1 cpu"], accelerated=False, replicas=2)
    with pytest.raises(SiameseError, match=r"Expected `batch_size` to be a multiple of the 2 devices, so each takes "
                                           r"an equal share\. Received: 15"):
        two_devices.batches(15, lambda shard: pytest.fail("no batches for a batch the devices cannot share"))


def test_the_backend_is_checked(digits, tmp_path):
    with pytest.raises(SiameseError, match=r"Expected Keras to run on jax, as `backend` says\. Received: Keras runs "
                                           r"on tensorflow in this process\. Fix: set KERAS_BACKEND=jax"):
        train(TrainConfig(**settings(digits, tmp_path / "m.keras", backend="jax")))
    with pytest.raises(SiameseError, match=r"Expected `backend` to be one of tensorflow, jax\. Received: 'torch'"):
        train(TrainConfig(**settings(digits, tmp_path / "m.keras", backend="torch")))
    command = [sys.executable, "utilities.py", "train", "--labeled-data", str(digits / "train.json"), "--image-dir",
               str(digits), "--output", str(tmp_path / "m.keras")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "error: Expected KERAS_BACKEND to be one of tensorflow, jax. Received: 'torch'. Fix: pass --backend" in (
        result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_check_refuses_a_machine_without_a_gpu_and_reports_why(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "OUT": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "error: JAX sees no GPU" in result.stderr, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["platform"] == "cpu" and report["versions"]["keras"] == keras.__version__
    assert report["steps"]["gpu"]["passed"] is False and "train" not in report["steps"]
