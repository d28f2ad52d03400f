"""Multi-worker training for real: two worker processes on localhost ports, CPU only, against one worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from siamese.checkpoint import sidecar

pytestmark = pytest.mark.slow  # trains or runs end to end: make test runs it, make test-fast not

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def train_command(digits, out, batches: str) -> list[str]:
    return [sys.executable, "utilities.py", "train", "--labeled-data", str(digits / "train.json"),
            "--image-dir", str(digits), "--output", str(out), "--epochs", "3", "--image-size", "16",
            "--batch-size", "32", "--images-per-epoch", "32", "--val-pairs", "128", "--embedding-dim", "16",
            "--batches", batches, "--learning-rate", "0.001", "--no-progress"]


def environment(cache_dir, tf_config: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(SIAMESE_CACHE_DIR=str(cache_dir), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


@pytest.mark.parametrize("batches", ["pk", "pairs"])
def test_two_workers_agree_and_train_like_one_worker_with_the_same_global_batch(digits, tmp_path, cache_dir, batches):
    workers = [f"localhost:{port}" for port in free_ports(2)]
    multi = tmp_path / "multi.keras"
    processes = [
        subprocess.Popen(train_command(digits, multi, batches), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         env=environment(cache_dir, {"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    single = tmp_path / "single.keras"
    alone = subprocess.run(train_command(digits, single, batches), cwd=ROOT, capture_output=True, text=True,
                           env=environment(cache_dir))
    assert alone.returncode == 0, alone.stderr[-3000:]

    # One step per epoch: each epoch's loss is one global batch's, the same as on one worker: to float32
    # precision for the first two steps, then float sums in another order drift apart (Adam amplifies them)
    histories = [json.loads(sidecar(p, "history").read_text())[1:] for p in (multi, single)]  # [0]: untrained
    assert len(histories[0]) == 3
    np.testing.assert_allclose([h["loss"] for h in histories[0][:2]], [h["loss"] for h in histories[1][:2]], rtol=3e-6)
    for key in ("loss", "val_loss", "val_precision_at_1"):
        np.testing.assert_allclose([h[key] for h in histories[0]], [h[key] for h in histories[1]], rtol=1e-3)
    chief, worker, one = (keras.saving.load_model(p) for p in (multi, tmp_path / ".worker-1" / "multi.keras", single))
    # Adam moves a weight by up to the learning rate (0.001) a step whatever its gradient's size, so where a
    # gradient is near 0 the other summation order can move it by a fair part of that: 1.4e-4 was seen
    for a, b, c in zip(chief.weights, worker.weights, one.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # the workers hold the same weights
        np.testing.assert_allclose(a.numpy(), c.numpy(), atol=3e-4)
        assert np.mean(np.abs(a.numpy() - c.numpy())) < 1e-5
    assert json.loads(sidecar(multi, "manifest").read_text())["cluster"]["cluster"]["worker"] == workers


@pytest.mark.parametrize(("tf_config", "message"), [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "cluster.worker"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}', "index below 1"),
])
def test_a_bad_tf_config_is_one_line_naming_the_fix(digits, tmp_path, cache_dir, tf_config, message):
    env = {**environment(cache_dir), "TF_CONFIG": tf_config}
    del env["TF_CPP_MIN_LOG_LEVEL"]  # as a user runs it: the CLI silences TensorFlow's start-up itself
    result = subprocess.run(train_command(digits, tmp_path / "m.keras", "pk"), cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert message in result.stderr and "Fix: set TF_CONFIG" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
