"""The "ray" runner of `siamese.embed_to_store`: a catalog's images embedded on Ray Data.

Images are decoded by CPU tasks (`decode_batch`, `map_batches` of a function) and embedded in a fixed pool of
actors (`EmbedActor`, `ActorPoolStrategy(size=actors)`), one model each, a GPU each where the cluster has GPUs.
Ray Data restarts an actor whose process dies and retries its batches (its defaults for actor pools:
`max_restarts=-1`, `max_task_retries=-1`); every image is checked to come back exactly once. `ray.init` joins
the cluster at `address` or $RAY_ADDRESS, else starts a local Ray, which is shut down when the run ends.
Images and the model's file are read where the tasks run: on a cluster, the image folder must be at the same
path on every node (a shared file system); the model's file is sent to the actors.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from siamese.catalog import Catalog
from siamese.errors import SiameseError
from siamese.images import BadImage, BadImagesError, ImageDecodeError, OnBadImage, decode_image, warn_skipped
from siamese.reaper import OWNER
from siamese.util import plural

BLOCKS = 10_000
"""Most input blocks of a run (each a whole number of batches): a hundred million images make 10,000 blocks."""
BLOCK_BATCHES = 16
"""Batches of a block (a decode task's work) where the run has enough of them: Ray Data's cost per block (a task,
an object, the scheduling) is then paid once for 1,024 images of batch 64, not for each batch."""
BLOCKS_PER_ACTOR = 4
"""Fewest blocks per actor a run is cut into, where it has the images: smaller blocks before too few to share."""


def block_rows(images: int, batch_size: int, actors: int) -> int:
    """Images per input block of a run of `images` in batches of `batch_size` on `actors` actors: BLOCK_BATCHES
    batches, fewer where the run would make fewer than BLOCKS_PER_ACTOR blocks an actor, more where it would make
    over BLOCKS."""
    batches = max(1, math.ceil(images / batch_size))
    per_block = max(1, min(BLOCK_BATCHES, batches // (BLOCKS_PER_ACTOR * actors)))
    return batch_size * max(per_block, math.ceil(batches / BLOCKS))


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """A Ray Data batch of image paths (columns index, path) decoded by `decode_image`: columns index, pixels
    (uint8 `(n, size, size, 3)`, zeros where an image failed) and error (the reason, "" where it decoded)."""
    paths = batch["path"]
    pixels = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for k, path in enumerate(paths):
        try:
            pixels[k] = decode_image(str(path), image_size)
        except ImageDecodeError as e:
            errors[k] = str(e) or type(e).__name__
    return {"index": batch["index"], "pixels": pixels, "error": errors}


class EmbedActor:
    """One embedding model in a Ray actor: loaded from `model_file` (the bytes of a `keras_model` file, written to
    a temporary file of the same `suffix`) or else from `recipe` (`Embedder.load`'s arguments), refused unless its
    fingerprint is `fingerprint`; TensorFlow runs `threads` threads."""

    def __init__(self, recipe: dict, model_file: bytes | None, suffix: str, fingerprint: str, threads: int):
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from siamese.embed import Embedder

        if model_file is not None:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"model{suffix}"
                path.write_bytes(model_file)
                embedder = Embedder.load(path)
        else:
            embedder = Embedder.load(**recipe)
        if embedder.info.fingerprint != fingerprint:
            raise SiameseError(f"Expected the actor's model to be the driver's (fingerprint {fingerprint[:12]}). "
                               f"Received: fingerprint {embedder.info.fingerprint[:12]} from {recipe}. Fix: install "
                               "the same siamese, Keras and weights on every node.")
        self.model = embedder.model
        self.dim = embedder.info.embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        embeddings = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            out = self.model.predict_on_batch(np.ascontiguousarray(batch["pixels"][ok]))
            embeddings[ok] = np.asarray(out, np.float32).reshape(int(ok.sum()), self.dim)
        return {"index": batch["index"], "embedding": embeddings, "error": batch["error"]}


def connect(address: str | None = None) -> Callable[[], None] | None:
    """Join the Ray cluster at `address`, else $RAY_ADDRESS, else start a local Ray; nothing when this process is
    connected already. Returns how to disconnect (None when this call did not connect).

    A local Ray dies with this process however it ends, even by SIGKILL: its processes are marked (`OWNER`), and
    a reaper process (`siamese.reaper`, Linux) kills them and the processes below them once this one's end closes
    its pipe. Ray's own agents outlive a killed driver by minutes, retrying a dead GCS."""
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    reaper, saved = None, os.environ.get(OWNER)
    if address == "local" and Path("/proc/self/environ").exists():
        mark = uuid.uuid4().hex
        reaper = subprocess.Popen([sys.executable, Path(__file__).with_name("reaper.py"), mark, str(os.getpid())],
                                  stdin=subprocess.PIPE, start_new_session=True)
        os.environ[OWNER] = mark
    try:
        local = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    except BaseException as e:
        if reaper is not None:  # whatever Ray started goes now, not when this process ends
            reaper.stdin.close()
            reaper.wait()
        if isinstance(e, ConnectionError):
            raise SiameseError(f"Expected a Ray cluster at {address}. Received: {e}. Fix: start it with `ray start "
                               "--head` (and `ray start --address=HEAD:6379` on the other machines), or unset "
                               "RAY_ADDRESS to start a local Ray.") from None
        raise
    finally:
        if reaper is not None:
            if saved is None:
                os.environ.pop(OWNER, None)
            else:
                os.environ[OWNER] = saved

    def disconnect() -> None:
        ray.shutdown()
        if reaper is not None:
            reaper.stdin.close()
            reaper.wait()

    return disconnect


def placement(cpus: float, nodes: list[float], gpus: float, actors: int) -> dict:
    """How a run sits on a cluster of `cpus` CPUs, `nodes` CPUs on each node, and `gpus` GPUs with `actors` actors:
    the CPUs a decode task and an actor reserve, so that beside an actor a decode task fits on the smallest node
    and the actors never take every CPU (on 2 CPUs an actor reserves half of one), never the same amount (which
    would fuse decoding into the actors); an actor's GPUs (1 where there
    are GPUs); its TensorFlow threads (half the CPUs shared among the actors, at most a node's)."""
    smallest, largest = min(nodes, default=1.0), max(nodes, default=1.0)
    decode = min(1.0, smallest / 2)
    actor = round(max(0.1, min(1.0, smallest - decode, (cpus - decode) / actors)), 2)
    if actor == decode and not gpus:  # Ray Data fuses steps of equal resources: decoding would run in the actors
        actor = round(actor - 0.01, 2)
    threads = max(1, int(min(largest, cpus // (2 * actors))))
    return {"decode_cpus": decode, "actor_cpus": actor, "actor_gpus": 1 if gpus else None, "threads": threads}


def embed_on_ray(
    embedder, catalog: Catalog, todo: np.ndarray, sink: Callable[[np.ndarray, np.ndarray], None], *,
    batch_size: int = 64, actors: int = 2, address: str | None = None, on_bad_image: OnBadImage = "fail",
    progress: bool = True,
) -> list[BadImage]:
    """Embed the catalog images `todo` (indices into `catalog.filenames`) with `embedder` on Ray Data in batches of
    `batch_size` (default 64) and `actors` (default 2) model actors, giving each batch to `sink(indices,
    embeddings)` as it comes back; return the bad images skipped (`on_bad_image="skip"`; "fail", the default,
    raises `BadImagesError` at the first). A progress bar counts the images done."""
    import pyarrow as pa
    import ray
    import ray.data
    from tqdm.auto import tqdm

    disconnect = connect(address)
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats
    loggers = [logging.getLogger(name) for name in ("ray.data", "ray")]
    levels = [logger.level for logger in loggers]
    try:
        context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
        where = placement(resources.get("CPU", 1), nodes, resources.get("GPU", 0), actors)
        recipe = embedder.recipe
        model_file, suffix = None, ""
        if recipe.get("keras_model"):
            model_file, suffix = Path(recipe["keras_model"]).read_bytes(), Path(recipe["keras_model"]).suffix
        paths = [str(catalog.paths[i].absolute()) for i in todo]
        per_block = block_rows(len(todo), batch_size, actors)
        table = pa.table({"index": pa.array(todo, pa.int64()), "path": pa.array(paths, pa.string())})
        dataset = (
            ray.data.from_arrow([table.slice(lo, per_block) for lo in range(0, len(todo), per_block)])
            .map_batches(decode_batch, batch_size=batch_size, fn_kwargs={"image_size": embedder.info.image_size},
                         num_cpus=where["decode_cpus"], udf_modifying_row_count=False)
            .map_batches(EmbedActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                         fn_constructor_kwargs={"recipe": recipe, "model_file": model_file, "suffix": suffix,
                                                "fingerprint": embedder.info.fingerprint,
                                                "threads": where["threads"]},
                         num_cpus=where["actor_cpus"], num_gpus=where["actor_gpus"], udf_modifying_row_count=False)
        )
        return _collect(dataset, catalog, todo, sink, on_bad_image,
                        tqdm(total=len(todo), desc="embedding on ray", unit="img", disable=not progress))
    finally:
        context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if disconnect:
            disconnect()


def _collect(dataset, catalog: Catalog, todo: np.ndarray, sink, on_bad_image: OnBadImage, bar) -> list[BadImage]:
    """Read the embedded batches of `dataset` as they come back into `sink`, counting each image (each must come
    back once) and the bad ones."""
    owner = catalog.image_item
    received = np.zeros(len(catalog.filenames), np.int32)
    bad: list[BadImage] = []
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with bar:
            for batch in batches:
                indices = np.asarray(batch["index"], np.int64)
                received[indices] += 1
                ok = batch["error"] == ""
                for i, reason in zip(indices[~ok], batch["error"][~ok], strict=True):
                    bad.append(BadImage(catalog.items[owner[i]].id, catalog.filenames[i], str(reason)))
                if bad and on_bad_image == "fail":
                    raise BadImagesError(bad, catalog.image_dir)
                if ok.any():
                    sink(indices[ok], np.asarray(batch["embedding"], np.float32)[ok])
                bar.update(len(indices))
    finally:
        close = getattr(batches, "close", None)
        if close:
            close()
    counts = received[todo]
    if (counts != 1).any():
        first = todo[np.flatnonzero(counts != 1)[0]]
        raise SiameseError(f"Expected Ray to return each image once. Received: {catalog.filenames[first]} "
                           f"{plural(int(received[first]), 'time')} ({int((counts != 1).sum()):,} images not once). "
                           "Fix: run again; the store is unchanged.")
    if bad:
        warn_skipped(bad)
    return bad
