"""Where a training run computes: one device, every local GPU, or several machines named by `TF_CONFIG`.

With `TF_CONFIG` set (the cluster and this process's task, as `tf.distribute` reads it), `train` runs under
`tf.distribute.MultiWorkerMirroredStrategy`: every worker runs the same command, takes its share of each
global batch, and the gradients are summed across workers every step, so all workers hold the same weights.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from siamese.errors import SiameseError


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


@functools.cache
def _allow_keras_multi_worker_fit() -> None:
    """Let Keras's `fit` report its scalar metrics under MultiWorkerMirroredStrategy.

    Keras 3 (through 3.15) reduces each step's per-replica metrics across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars (keras-team/keras#20585). Here they
    are averaged over the replicas (axis None) instead; every other strategy and reduction is left to Keras.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica


def training_strategy(gpus: list) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy under `TF_CONFIG`, MirroredStrategy over `gpus`, else the default strategy."""
    if cluster() is not None:
        _allow_keras_multi_worker_fit()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's place in the cluster: 0 (the chief, which writes the outputs) on a single machine."""
    return strategy.cluster_resolver.task_id if is_multi_worker(strategy) else 0


def worker_path(path: str | os.PathLike, strategy: tf.distribute.Strategy) -> Path:
    """Where this worker writes what the chief writes at `path`: `path` itself on the chief, and
    `<folder>/.worker-<i>/<name>` on worker i, so workers sharing a disk never overwrite each other (each
    keeps its own backup, which is what lets it resume)."""
    path, index = Path(path), worker_index(strategy)
    return path if index == 0 else path.parent / f".worker-{index}" / path.name


def distribute_batches(strategy: tf.distribute.Strategy, global_batch: int,
                       stream: Callable[[tuple[int, int]], tf.data.Dataset]) -> tf.data.Dataset:
    """The training input for `strategy`: `stream(shard)` gives share `shard = (i, n)` of every global batch.

    On one machine the stream of whole batches is returned (Keras splits it across local GPUs). Under
    MultiWorkerMirroredStrategy each worker builds only its replicas' shares: rows
    `[i * b / n, (i + 1) * b / n)` of each global batch of `b` for replica `i` of `n`, so no image is read twice.
    """
    if not is_multi_worker(strategy):
        return stream((0, 1))
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise SiameseError(f"Expected `batch_size` to be a multiple of the {replicas} replicas of the cluster, so each "
                           f"takes an equal share. Received: {global_batch}")

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        shares = [stream((first + j, replicas)) for j in range(local)]
        if local == 1:
            return shares[0]
        # one element per local replica, in turn: replica j of this worker gets share first + j
        return tf.data.Dataset.zip(tuple(shares)).flat_map(
            lambda *batches: functools.reduce(tf.data.Dataset.concatenate,
                                              [tf.data.Dataset.from_tensors(b) for b in batches]))

    return strategy.distribute_datasets_from_function(per_worker)
