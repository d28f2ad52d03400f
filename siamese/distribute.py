"""Where a training run computes, on either Keras backend: one device, every local GPU, or several machines.

TensorFlow: `tf.distribute.MirroredStrategy` over the local GPUs. With `TF_CONFIG` set (the cluster and this
process's task, as `tf.distribute` reads it), `MultiWorkerMirroredStrategy`: every worker runs the same command,
takes its share of each global batch, and the gradients are summed across workers every step.

JAX: `keras.distribution.DataParallel` over every device JAX sees (each takes an equal slice of every batch).
With `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set, the
hosts join through `jax.distributed` first, and each host loads only its share of every global batch.

Either way all workers hold the same weights, and worker 0 (the chief) writes the outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siamese.errors import SiameseError

if TYPE_CHECKING:
    from siamese.pipeline import TrainingBatches

JAX_CLUSTER = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
"""The environment that makes several JAX hosts one training run (`jax.distributed.initialize`'s arguments)."""


def cluster() -> dict | None:
    """`TF_CONFIG` parsed and checked (None when unset): `{"cluster": {"worker": [...]}, "task": {...}}`."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    fix = ('Fix: set TF_CONFIG to e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
           '"task": {"type": "worker", "index": 0}}, the index being this machine\'s place in the list.')
    try:
        config = json.loads(text)
    except ValueError as e:
        raise SiameseError(f"TF_CONFIG is not valid JSON ({e}). {fix}") from None
    workers = config.get("cluster", {}).get("worker") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) for w in workers):
        raise SiameseError(f"Expected TF_CONFIG to list the workers' host:port in cluster.worker. Received: {text}. "
                           f"{fix}")
    if not isinstance(task, dict) or task.get("type") != "worker" or task.get("index") not in range(len(workers)):
        raise SiameseError(f"Expected TF_CONFIG's task to be a worker with an index below {len(workers)}. "
                           f"Received: {task}. {fix}")
    return config


def jax_cluster() -> dict | None:
    """The `JAX_CLUSTER` variables, checked (None when none is set): `{"coordinator", "processes", "process"}`."""
    values = {name: os.environ.get(name, "").strip() for name in JAX_CLUSTER}
    if not any(values.values()):
        return None
    fix = "Fix: set all three, e.g. JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0."
    try:
        processes, process = int(values["JAX_NUM_PROCESSES"]), int(values["JAX_PROCESS_ID"])
    except ValueError:
        raise SiameseError(f"Expected whole numbers in JAX_NUM_PROCESSES and JAX_PROCESS_ID. Received: {values}. "
                           f"{fix}") from None
    if not values["JAX_COORDINATOR_ADDRESS"] or not 0 <= process < processes:
        raise SiameseError(f"Expected a coordinator address and 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES. "
                           f"Received: {values}. {fix}")
    return {"coordinator": values["JAX_COORDINATOR_ADDRESS"], "processes": processes, "process": process}


@dataclass
class Placement:
    """The devices of a training run and how it spreads over them; `placement()` finds them."""

    backend: str
    devices: list[str]
    accelerated: bool  # GPUs (or other accelerators) rather than the CPU
    cluster: dict | None = None  # TF_CONFIG, or the JAX cluster variables
    strategy: Any = None  # the tf.distribute.Strategy, on TensorFlow
    distribution: Any = None  # keras.distribution.DataParallel over several JAX devices
    worker: int = 0  # this process's place among the workers (hosts); 0 writes the outputs
    workers: int = 1
    replicas: int = 1  # devices that each take a slice of every batch

    @property
    def precision(self) -> str:
        """The Keras dtype policy: mixed bfloat16 on accelerators that have it, mixed float16 on older GPUs
        (TensorFlow, compute capability below 8), float32 on the CPU."""
        if not self.accelerated:
            return "float32"
        return "mixed_float16" if self.backend == "tensorflow" and not _tf_bfloat16_gpus() else "mixed_bfloat16"

    @property
    def jit_compile(self) -> bool | str:
        """`compile`'s jit_compile: JAX always compiles; TensorFlow's XLA on GPUs, its own kernels on the CPU (oneDNN,
        faster there)."""
        if self.backend == "jax":
            return True
        return "auto" if self.accelerated else False

    def scope(self) -> contextlib.AbstractContextManager:
        """Build, compile and fit inside this: the strategy's or distribution's scope (nothing on one device)."""
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()

    def batches(self, global_batch: int, batches: Callable[[tuple[int, int]], TrainingBatches]):
        """What `fit` reads: `batches(shard)` gives share `shard = (i, n)` of every global batch of `global_batch`.

        TensorFlow: the batches as `tf.data` (per worker under MultiWorkerMirroredStrategy). JAX: this host's
        share as a `PyDataset`, which Keras splits across the devices.
        """
        if self.backend == "tensorflow":
            return _tf_batches(self.strategy, global_batch, batches)
        devices = self.replicas * self.workers
        if global_batch % devices:
            raise SiameseError(f"Expected `batch_size` to be a multiple of the {devices} devices, so each takes an "
                               f"equal share. Received: {global_batch}")
        return batches((self.worker, self.workers))


def placement(backend: str) -> Placement:
    """The devices training on `backend` (one of `BACKENDS`) uses; see the module docstring. On the CPU,
    TensorFlow runs deterministic kernels, so a resumed run ends with the same weights."""
    if backend == "tensorflow":
        return _tf_placement()
    if cluster() is not None:
        raise SiameseError("TF_CONFIG names a TensorFlow cluster, but this run trains on jax. Fix: unset TF_CONFIG and "
                           f"set {', '.join(JAX_CLUSTER)} for several JAX hosts, or pass `backend='tensorflow'`.")
    import jax
    import keras

    _hide_gpus_from_tensorflow()
    hosts = jax_cluster()
    if hosts is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(hosts["coordinator"], hosts["processes"], hosts["process"])
    devices = jax.devices()
    distribution = keras.distribution.DataParallel(devices=devices) if len(devices) > 1 else None
    return Placement("jax", [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
                     devices[0].platform != "cpu", hosts, distribution=distribution, worker=jax.process_index(),
                     workers=jax.process_count(), replicas=jax.local_device_count())


def worker_path(path: str | os.PathLike, placement: Placement) -> Path:
    """Where this worker writes what the chief writes at `path`: `path` itself on the chief, and
    `<folder>/.worker-<i>/<name>` on worker i, so workers sharing a disk never overwrite each other (each
    keeps its own backup, which is what lets it resume)."""
    path = Path(path)
    return path if placement.worker == 0 else path.parent / f".worker-{placement.worker}" / path.name


def _hide_gpus_from_tensorflow() -> None:
    """On JAX the GPUs are JAX's: TensorFlow, where installed (Keras's `set_random_seed` imports it, and
    TensorBoard's `tf.summary` needs only the CPU), is kept off them. Nothing once TensorFlow's runtime started."""
    try:
        import tensorflow as tf
    except ImportError:
        return
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")


def _tf_placement() -> Placement:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        tf.config.experimental.enable_op_determinism()
    config = cluster()
    if config is not None:
        _allow_keras_multi_worker_fit()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        worker, workers = strategy.cluster_resolver.task_id, len(config["cluster"]["worker"])
    else:
        strategy = tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()
        worker, workers = 0, 1
    return Placement("tensorflow", [d.name for d in gpus] or ["CPU"], bool(gpus), config, strategy=strategy,
                     worker=worker, workers=workers, replicas=strategy.num_replicas_in_sync)


@functools.cache
def _tf_bfloat16_gpus() -> bool:
    """Whether every GPU TensorFlow sees computes in bfloat16 (compute capability 8.0 and up: Ampere, Hopper)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)) for g in gpus]
    return bool(gpus) and all(c >= (8, 0) for c in capabilities)


@functools.cache
def _allow_keras_multi_worker_fit() -> None:
    """Let Keras's `fit` report its scalar metrics under MultiWorkerMirroredStrategy.

    Keras 3 (through 3.15) reduces each step's per-replica metrics across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars (keras-team/keras#20585). Here they
    are averaged over the replicas (axis None) instead; every other strategy and reduction is left to Keras.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica


def _tf_batches(strategy, global_batch: int, batches: Callable[[tuple[int, int]], TrainingBatches]):
    """The `tf.data` training input for `strategy`. On one machine the stream of whole batches (Keras splits it
    across local GPUs). Under MultiWorkerMirroredStrategy each worker builds only its replicas' shares: rows
    `[i * b / n, (i + 1) * b / n)` of each global batch of `b` for replica `i` of `n`, so no image is read twice.
    """
    import tensorflow as tf

    from siamese.tfdata import tf_dataset

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return tf_dataset(batches((0, 1)))
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise SiameseError(f"Expected `batch_size` to be a multiple of the {replicas} replicas of the cluster, so each "
                           f"takes an equal share. Received: {global_batch}")

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        shares = [tf_dataset(batches((first + j, replicas))) for j in range(local)]
        if local == 1:
            return shares[0]
        # one element per local replica, in turn: replica j of this worker gets share first + j
        return tf.data.Dataset.zip(tuple(shares)).flat_map(
            lambda *elements: functools.reduce(tf.data.Dataset.concatenate,
                                               [tf.data.Dataset.from_tensors(e) for e in elements]))

    return strategy.distribute_datasets_from_function(per_worker)


def replica_gather(*tensors):
    """Under a `tf.distribute` strategy of N > 1 replicas: every replica's share of each of `tensors` (equal
    shapes), in replica order, and N; else None.

    `ReplicaContext.all_gather` fails under MultiWorkerMirroredStrategy on the CPU ("destinations can not
    be empty": its tensors carry no device); `all_reduce` of zero-padded shares works everywhere, is exact
    (adding zeros) and sends each replica the gradient of its own share.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    me, n = context.replica_id_in_sync_group, context.num_replicas_in_sync

    def gather(x):
        shares = [x * tf.cast(tf.equal(me, i), x.dtype) for i in range(n)]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(shares, axis=0))

    return *(gather(t) for t in tensors), n
