"""Training: a validated catalog in, the best embedding network out, resumable after any crash.

`train(TrainConfig(...))` runs the same checks as `validate`, splits by item, streams fresh pairs every
epoch, trains the siamese network with Keras `fit`, reports validation loss, precision@1 and MAP@R of
held-out items before training and after each epoch, and keeps the best embedding network (`.keras`, or HDF5
for `.h5`/`.hdf5` names) with its configuration and a manifest beside it. The untrained network is a
candidate: when no epoch beats it on held-out items, its weights are kept, with a warning. A run killed at
any point and started again with the same settings goes on from its last finished epoch and ends with the
same weights (on the CPU). The same code runs on Keras's TensorFlow or JAX backend (`siamese.distribute` places
it on the devices); on JAX it needs no TensorFlow, except for the TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from siamese import __version__, atomic
from siamese.augment import augmentation
from siamese.catalog import Catalog, load_catalog, split_by_item
from siamese.checkpoint import AtomicBackupAndRestore, BestCheckpoint, RetrievalMetrics, sidecar
from siamese.config import BACKENDS, TrainConfig
from siamese.distribute import Placement, placement, worker_path
from siamese.errors import SiameseError
from siamese.images import check_images
from siamese.loss_registry import get_loss
from siamese.models import build_batch_all, build_embedding, build_siamese, build_triplet
from siamese.pairs import ItemSampler, PairSampler, PKSampler
from siamese.pipeline import ItemBatches, PairBatches, decoded_images, steps_per_epoch
from siamese.util import utc_now

MEMORY_CACHE_LIMIT = 0.25
"""`cache="auto"` decodes into memory when the images take at most this share of the machine's RAM."""


@dataclass
class TrainResult:
    """Where a run wrote its model and how it went."""

    checkpoint: Path
    monitor: str
    best: float | None
    best_epoch: int | None
    history: list[dict]
    resumed_from_epoch: int

    @property
    def kept_untrained(self) -> bool:
        """True when no epoch beat the untrained network on held-out items, so its weights were kept."""
        return self.best_epoch == 0


def _versions(backend: str) -> dict[str, str]:
    """The versions of what a run on `backend` computes with, by package name."""
    modules = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib")}[backend]
    modules += ("keras", "numpy", "sklearn", "PIL")
    names = {"sklearn": "scikit-learn", "PIL": "pillow"}
    return {"siamese": __version__, "python": platform.python_version(),
            **{names.get(m, m): importlib.import_module(m).__version__ for m in modules}}


def _choose_cache(config: TrainConfig, n_images: int) -> str:
    if config.cache != "auto":
        return config.cache
    need = n_images * config.image_size**2 * 3
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "memory" if need <= MEMORY_CACHE_LIMIT * ram else "disk"


def _sample_images(catalog: Catalog, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` images of `catalog`, a seeded sample, in order."""
    n = len(catalog.filenames)
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _stream(config: TrainConfig, devices: Placement, sampler: ItemSampler, per_epoch: int, *, start_epoch: int = 0,
            cache: str = "memory", images: np.ndarray | None = None, steps: int | None = None):
    """The endless training input of `config.batches` and `config.loss` (P x K batches, or the pairs or triplets
    the loss draws), for `devices`; with `steps`, the first `steps` batches over and over."""

    def share(shard: tuple[int, int]):
        common = {"batch_size": config.batch_size, "start_epoch": start_epoch, "cache": cache, "images": images,
                  "shard": shard, "repeat": steps}
        if config.batches == "pk":
            return ItemBatches(sampler, config.image_size, images_per_item=config.images_per_item,
                               images_per_epoch=per_epoch, **common)
        return PairBatches(sampler, config.image_size, pairs_per_epoch=per_epoch, triplets=_triplets(config),
                           **common)

    return devices.batches(config.batch_size, share)


def _sampler(config: TrainConfig, catalog: Catalog) -> ItemSampler:
    """What draws `config.batches` of `catalog`: P x K batches, or pairs and triplets; a catalog that cannot give
    the triplets of a loss over triplets is refused here, not inside `fit`."""
    sampler = (PKSampler if config.batches == "pk" else PairSampler)(catalog, seed=config.seed)
    if get_loss(config.loss).drawn == "triplets":
        drawn = sampler if isinstance(sampler, PairSampler) else PairSampler(catalog, seed=config.seed)
        drawn.triplets(0, 2)
    return sampler


def _triplets(config: TrainConfig) -> bool:
    """Whether `config` trains on drawn triplets (`batches='pairs'` with a loss over triplets)."""
    return config.batches == "pairs" and get_loss(config.loss).drawn == "triplets"


def _training_model(config: TrainConfig, embedding: keras.Model) -> tuple[keras.Model, keras.losses.Loss]:
    """The model `fit` trains around `embedding` (which alone is saved), with the augmentation of training
    images, and its loss (`siamese.losses.LOSSES[config.loss]` for `config.batches`, with its settings)."""
    augment = augmentation(config.flip, config.seed) if config.augment else None
    settings = {**config.loss_settings, "margin": config.margin, "temperature": config.temperature}
    loss = get_loss(config.loss).make(config.batches, settings)
    if config.batches == "pk":
        return build_batch_all(embedding, augment, config.views), loss
    if _triplets(config):
        return build_triplet(embedding, augment), loss
    return build_siamese(embedding, augment), loss


def _learning_rate(config: TrainConfig, steps: int):
    """AdamW's learning rate: constant, or cosine decay to 0 over the run's `steps` (a function of the step
    count, which the backup restores with the optimizer, so a resumed run continues the same curve)."""
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
    return config.learning_rate


def _validation(config: TrainConfig, devices: Placement, val_catalog: Catalog, embedding: keras.Model, cache: str,
                progress: bool, start_epoch: int) -> tuple[list, object, int | None]:
    """The retrieval callback and the fixed validation pairs (triplets, batches) with their step count.

    Nothing without validation items; no pair loss when the held-out items cannot form both kinds of pair
    (e.g. a single item), while the retrieval figures still work. The untrained network is measured on a
    fresh run, not on a resumed one (it was, before the crash).
    """
    if not len(val_catalog):
        return [], None, None
    if len(val_catalog) == 1:
        warnings.warn(f"a single held-out item ({val_catalog.items[0].id}) cannot score retrieval (every neighbour "
                      "is of its item): keeping the last epoch. Fix: hold out more items (`val_fraction`) or pass "
                      "`val_labeled_data`", UserWarning, stacklevel=3)
        return [], None, None
    size = config.image_size
    images = decoded_images(val_catalog, size, "disk" if cache == "disk" else "memory", progress=progress)
    picked = _sample_images(val_catalog, config.val_images, config.seed)
    metrics = RetrievalMetrics(embedding, images[picked], val_catalog.image_item[picked], config.batch_size,
                               initial=start_epoch == 0)
    try:
        sampler = _sampler(config, val_catalog)
    except SiameseError:
        return [metrics], None, None
    steps = steps_per_epoch(config.val_pairs, config.batch_size)
    # the same validation pairs every epoch, so val_loss is comparable across epochs
    return [metrics], _stream(config, devices, sampler, config.val_pairs, images=images, steps=steps), steps


def train(config: TrainConfig, verbose: int | str = "auto") -> TrainResult:
    """Train an embedding network as `config` says; see the module docstring. `verbose` goes to `fit`."""
    config = config.resolved()
    backend = keras.backend.backend()
    if config.backend is None:
        config = dataclasses.replace(config, backend=backend)
    elif config.backend != backend:
        raise SiameseError(f"Expected Keras to run on {config.backend}, as `backend` says. Received: Keras runs on "
                           f"{backend} in this process. Fix: set KERAS_BACKEND={config.backend} before Python first "
                           f"imports keras (`train --backend {config.backend}` does), or pass `backend='{backend}'`.")
    if backend not in BACKENDS:
        raise SiameseError(f"Expected Keras to run on {' or '.join(BACKENDS)}. Received: {backend}. Fix: set "
                           "KERAS_BACKEND=jax or tensorflow.")
    devices = placement(backend)  # first: on JAX it keeps TensorFlow, which set_random_seed imports, off the GPUs
    keras.utils.set_random_seed(config.seed)
    out = worker_path(config.out, devices)
    if out.is_dir():
        raise SiameseError(f"Expected `out` to name a checkpoint file. Received: {out}, which is a folder. Fix: name "
                           f"a file in it, e.g. {out / Path(TrainConfig.out).name}.")
    logs = Path(config.tensorboard)
    if config.tensorboard != "none" and logs.exists() and not logs.is_dir():
        raise SiameseError(f"Expected `tensorboard` to name a folder for the logs. Received: {logs}, which is a file. "
                           "Fix: name another folder, or pass `tensorboard='none'`.")
    with atomic.output_lock(out):  # before any long work: a folder that cannot be written fails here
        return _train(config, verbose, devices, out)


def _tensorboard(config: TrainConfig, devices: Placement) -> list[keras.callbacks.Callback]:
    """Keras's TensorBoard callback writing to `config.tensorboard` (this worker's own folder on other workers):
    losses, validation figures and the learning rate of every epoch. It needs TensorFlow's `tf.summary`, on either
    backend; without TensorFlow there are no logs, with a warning."""
    if config.tensorboard == "none":
        return []
    missing = [m for m in ("tensorflow", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        warnings.warn(f"TensorBoard logs need tensorflow and tensorboard (Keras writes them with tf.summary); "
                      f"{' and '.join(missing)} not installed: none are written. Fix: pip install tensorflow-cpu "
                      "tensorboard, or pass `tensorboard='none'`.", UserWarning, stacklevel=3)
        return []
    return [keras.callbacks.TensorBoard(str(worker_path(config.tensorboard, devices)), write_graph=False)]


def _train(config: TrainConfig, verbose: int | str, devices: Placement, out: Path) -> TrainResult:
    """`train` once the checkpoint `out` is locked for this run."""
    backup_dir = sidecar(out, "backup")
    backup_config = backup_dir / "config.json"
    if backup_config.exists() and json.loads(backup_config.read_text()) != config.to_dict():
        raise SiameseError(
            f"{backup_dir} holds an interrupted run with different settings. Fix: run the same command again "
            f"to resume it, or delete {backup_dir} to start afresh."
        )

    progress = verbose not in (0, 2)  # tqdm bars only where Keras shows its own bar too
    catalog = check_images(load_catalog(config.labeled_data, config.image_dir), config.on_bad_image, progress=progress)
    if config.val_labeled_data:
        train_catalog = catalog
        val_catalog = check_images(load_catalog(config.val_labeled_data, config.image_dir), config.on_bad_image,
                                   progress=progress)
    else:
        train_catalog, val_catalog = split_by_item(catalog, config.val_fraction, config.seed)
    sampler = _sampler(config, train_catalog)

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(devices.precision)
    try:
        cache = _choose_cache(config, len(train_catalog.filenames) + len(val_catalog.filenames))
        size = config.image_size
        train_images = decoded_images(train_catalog, size, cache, progress=progress) if cache != "none" else None
        backup = AtomicBackupAndRestore(str(backup_dir))
        start_epoch = backup.saved_epoch()
        stream = _stream(config, devices, sampler, config.images_per_epoch, start_epoch=start_epoch, cache=cache,
                         images=train_images)
        steps = steps_per_epoch(config.images_per_epoch, config.batch_size)

        with devices.scope():
            embedding = build_embedding(config.backbone, size, config.embedding_dim, config.weights,
                                        config.trainable_layers)
        # The wrapper (no weights of its own) is made outside the scope and compiled and fitted inside it:
        # Keras 3 cannot build a model made inside a MultiWorkerMirroredStrategy scope (keras-team/keras#20585).
        model, loss = _training_model(config, embedding)
        with devices.scope():
            learning_rate = _learning_rate(config, steps * config.epochs)
            optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)
            model.compile(optimizer=optimizer, loss=loss, jit_compile=devices.jit_compile)

        metrics, validation, val_steps = _validation(config, devices, val_catalog, embedding, cache, progress,
                                                     start_epoch)
        # Nothing held out: the last epoch. A batch-all loss is the mean over the pairs still inside the margin,
        # which grows harder as training goes, so epochs' losses do not say which model is best.
        monitor, mode = config.monitor, "max"
        if not metrics:
            monitor, mode = "loss", "last"
        elif monitor == "val_loss":
            # the held-out items may form no pairs: then there is no val_loss to go by
            monitor, mode = ("val_loss", "min") if validation is not None else ("val_map_at_r", "max")
        checkpoint = BestCheckpoint(embedding, out, monitor, mode, backup_dir / "best.json", start_epoch,
                                    metrics[0] if metrics else None)
        # epoch ends run in this order: measure, log, keep the best, back up; a non-finite loss ends the run
        callbacks = [keras.callbacks.TerminateOnNaN(), *metrics, *_tensorboard(config, devices), checkpoint, backup]

        atomic.write_json(backup_config, config.to_dict())
        atomic.write_json(sidecar(out, "config"), config.to_dict())
        manifest = {
            "started": utc_now(),
            "seed": config.seed,
            "backend": config.backend,
            "versions": _versions(config.backend),
            "devices": devices.devices,
            "cluster": devices.cluster,
            "precision": keras.mixed_precision.global_policy().name,
            "cache": cache,
            "catalog": {"labeled_data": str(config.labeled_data), "sha256": catalog.digest(),
                        "summary": catalog.summary()},
            "split": {"train_items": [i.id for i in train_catalog.items],
                      "val_items": [i.id for i in val_catalog.items]},
            "resumed_from_epoch": start_epoch,
        }
        with devices.scope():
            model.fit(stream, epochs=config.epochs, steps_per_epoch=steps, validation_data=validation,
                      validation_steps=val_steps, shuffle=False, callbacks=callbacks, verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(policy)

    manifest["finished"] = utc_now()
    if checkpoint.best_epoch is None:
        raise SiameseError(f"Training diverged: the loss was not finite by the end of epoch {len(checkpoint.history)}, "
                           f"so no model was saved at {out}. Fix: lower `learning_rate`.")
    result = TrainResult(out, monitor, checkpoint.best, checkpoint.best_epoch, checkpoint.history, start_epoch)
    manifest["best"] = {"monitor": monitor, "value": checkpoint.best, "epoch": checkpoint.best_epoch,
                        "kept_untrained": result.kept_untrained}
    atomic.write_json(sidecar(out, "manifest"), manifest)
    if result.kept_untrained:
        start = ", ".join(f"{k} {checkpoint.start[k]:.4f}" for k in BestCheckpoint.RETRIEVAL)
        trained = [h for h in checkpoint.history[1:] if h.get(monitor) is not None]
        best = "no epoch with finite figures"
        if trained:
            top = (max if mode == "max" else min)(trained, key=lambda h: h[monitor])
            best = f"the best epoch by {monitor}, {top['epoch']}: " + ", ".join(
                f"{k} {top[k]:.4f}" if top.get(k) is not None else f"{k} n/a" for k in BestCheckpoint.RETRIEVAL)
        warnings.warn(f"no epoch beat the untrained network on the held-out items (before training: {start}; "
                      f"{best}): {out} keeps the untrained weights", UserWarning, stacklevel=2)
    return result

