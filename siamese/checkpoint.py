"""Checkpoints of a training run: the files beside a checkpoint (`sidecar`), the callback that keeps the best
epoch's embedding network (`BestCheckpoint`, the untrained network as epoch 0 via `RetrievalMetrics`), and the
backup that lets a killed run resume to the same weights (`AtomicBackupAndRestore`). Keras and numpy only: no
input pipeline or training stack, so code that reads checkpoints (embed, export) does not load them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import keras
import numpy as np

from siamese import atomic
from siamese.models import save_embedding
from siamese.retrieval import retrieval_metrics


def sidecar(checkpoint: str | os.PathLike, kind: str) -> Path:
    """`checkpoints/x.keras` -> `checkpoints/x.<kind>.json` (config, manifest, history) or `x.backup/`."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.{kind}.json" if kind != "backup" else f"{path.stem}.backup")


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose weights and epoch are written as one atomic step.

    Keras writes the weights, then the epoch: a kill between the two resumes the wrong epoch with the
    next epoch's weights. Here each epoch's weights go to their own file (temp + rename), then the
    metadata naming them is renamed into place, so what is on disk always agrees. The metadata also holds the
    states of the random augmentation layers' seed generators, which weights files leave out, so a resumed run
    augments the same way as an uninterrupted one.
    """

    def _seed_states(self) -> list:
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]

    def saved_epoch(self) -> int:
        """The epoch a restarted run will begin at (0 without a backup)."""
        try:
            return int(json.loads(Path(self._training_metadata_path).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return 0

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch}.weights.h5"
        with atomic.atomic_path(Path(self.backup_dir) / name, suffix=".weights.h5") as tmp:
            self.model.save_weights(tmp)
        seeds = [keras.ops.convert_to_numpy(v).tolist() for v in self._seed_states()]
        atomic.write_json(self._training_metadata_path,
                          {"epoch": self._current_epoch, "batch": 0, "weights": name, "seeds": seeds})
        for old in Path(self.backup_dir).glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _load_model(self):
        try:
            metadata = json.loads(Path(self._training_metadata_path).read_text())
        except FileNotFoundError:
            return
        self._weights_path = str(Path(self.backup_dir) / metadata["weights"])
        super()._load_model()
        for variable, state in zip(self._seed_states(), metadata["seeds"], strict=True):
            variable.assign(np.asarray(state, variable.dtype))


class RetrievalMetrics(keras.callbacks.Callback):
    """Adds `val_precision_at_1` and `val_map_at_r` to each epoch's logs: leave-one-out retrieval among held-out
    images (`siamese.retrieval.retrieval_metrics`). With `initial`, also measures the untrained network when
    training begins, as `self.initial`."""

    def __init__(self, embedding: keras.Model, images: np.ndarray, items: np.ndarray, batch_size: int,
                 initial: bool = True):
        super().__init__()
        self.embedding, self.images, self.items, self.batch_size = embedding, images, items, batch_size
        self.measure_initial = initial
        self.initial: dict[str, float] | None = None

    def measure(self) -> dict[str, float]:
        # a plain call, outside any tf.distribute strategy: every worker measures all images on its own
        vectors = np.concatenate([keras.ops.convert_to_numpy(self.embedding(self.images[i : i + self.batch_size]))
                                  for i in range(0, len(self.images), self.batch_size)])
        if not np.isfinite(vectors).all():  # a diverged run: an epoch that cannot be the best
            return {"val_precision_at_1": math.nan, "val_map_at_r": math.nan}
        metrics = retrieval_metrics(vectors, self.items, ks=(1,))
        return {"val_precision_at_1": metrics["precision_at_1"], "val_map_at_r": metrics["map_at_r"]}

    def on_train_begin(self, logs=None):
        if self.measure_initial:
            self.initial = self.measure()

    def on_epoch_end(self, epoch, logs=None):
        logs.update(self.measure())


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the embedding network atomically whenever `monitor` improves (`mode` max or min), or after every
    epoch (`mode` last); keeps the per-epoch history.

    With `metrics` that measured the untrained network, that is epoch 0: saved first, and kept unless an
    epoch beats it, which means better by `monitor` and no worse by any of `RETRIEVAL` on the held-out items
    (a model that finds the nearest item less often is not better for ranking a little better). Its state
    (best value, history) lives in the backup folder, so a resumed run compares against the best of the epochs
    before the crash. At the end the history is written beside the checkpoint.
    """

    RETRIEVAL = ("val_precision_at_1", "val_map_at_r")

    def __init__(self, embedding: keras.Model, path: Path, monitor: str, mode: str, state: Path, start_epoch: int,
                 metrics: RetrievalMetrics | None = None):
        super().__init__()
        self.embedding, self.path, self.monitor, self.mode, self.state = embedding, path, monitor, mode, state
        self.metrics = metrics
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict] = []
        if start_epoch and state.exists():
            saved = json.loads(state.read_text())
            self.best, self.best_epoch = saved["best"], saved["best_epoch"]
            self.history = [h for h in saved["history"] if h["epoch"] <= start_epoch]

    @property
    def start(self) -> dict | None:
        """The untrained network's held-out figures (epoch 0), if it was measured."""
        return self.history[0] if self.history and self.history[0]["epoch"] == 0 else None

    def on_train_begin(self, logs=None):
        if self.metrics is not None and self.metrics.initial is not None:
            self.history.append({"epoch": 0, **self.metrics.initial})
            self.best, self.best_epoch = self.metrics.initial.get(self.monitor), 0
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        # a diverged epoch's figures are null in the history: JSON has no NaN
        logs = {k: float(v) if math.isfinite(v) else None for k, v in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        value = logs.get(self.monitor)
        start = self.start or {}
        no_worse = all(logs.get(k) is not None and logs[k] >= start[k] for k in self.RETRIEVAL if k in start)
        if value is not None and no_worse and (
            self.best is None or self.mode == "last" or (value > self.best if self.mode == "max" else value < self.best)
        ):
            self.best, self.best_epoch = value, epoch + 1
            self._save()
        atomic.write_json(self.state, {"best": self.best, "best_epoch": self.best_epoch, "history": self.history})

    def _save(self) -> None:
        with atomic.atomic_path(self.path, suffix=self.path.suffix) as tmp:
            save_embedding(self.embedding, tmp)

    def on_train_end(self, logs=None):
        atomic.write_json(sidecar(self.path, "history"), self.history)
