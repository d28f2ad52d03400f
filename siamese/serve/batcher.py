"""Requests that arrive together are embedded in one model call, and searched together.

`Batcher.answer(pixels, then, key)` waits at most `wait_ms` (default 2) for other requests, up to `max_batch` images
(default 32), then runs the model once, on one thread, for all of them. While the model runs, new requests gather for
the next call, which starts as soon as this one ends: under load the batches grow by themselves, and alone a request
waits `wait_ms` at most. The requests of one model call with the same `key` then get one call of `then` (the kNN
search) on all their embeddings, on a thread of its own while the next model call runs (one search of 16 vectors
costs far less than 16 searches of one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np


class Batcher:
    """Micro-batching of one model's calls; `image_size` is its input side."""

    def __init__(self, model: keras.Model, max_batch: int = 32, wait_ms: float = 2.0):
        self.model = model
        self.image_size = int(model.input_shape[1])
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self._pending: list[tuple[np.ndarray, asyncio.Future, Callable, Hashable]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a model call is running
        self._tasks: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="siamese-model")
        self._then_pool = ThreadPoolExecutor(1, thread_name_prefix="siamese-search")
        self.calls = 0  # model calls so far, for tests and /info
        self.then_calls = 0  # calls of `then` (searches) so far, for tests

    async def answer(self, pixels: np.ndarray, then: Callable[[np.ndarray], list], key: Hashable) -> list:
        """What `then` answers (a list, one entry per image) for the embeddings of uint8 `pixels`
        `(n, size, size, 3)`, batched with concurrent requests; `then` is called once for all the requests of a model
        call that give the same `key` (which must mean the same `then`)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((pixels, future, then, key))
        if self._busy:
            pass  # the next call takes it when the running one ends
        elif sum(len(entry[0]) for entry in self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return
        taken, size = 0, 0
        while taken < len(self._pending) and (taken == 0 or size + len(self._pending[taken][0]) <= self.max_batch):
            size += len(self._pending[taken][0])
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # held until done: the event loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future, Callable, Hashable]]) -> None:
        loop = asyncio.get_running_loop()
        images = np.concatenate([entry[0] for entry in batch])
        try:
            vectors = await loop.run_in_executor(self._pool, self._predict, images)
        except Exception as e:  # every waiting request gets the error
            _fail([entry[1] for entry in batch], e)
            return
        finally:
            self._busy = False
            self._flush()  # the next model call starts while this batch's searches run
        groups: dict[Hashable, list[tuple[np.ndarray, asyncio.Future, Callable]]] = {}
        start = 0
        for pixels, future, then, key in batch:
            groups.setdefault(key, []).append((vectors[start : start + len(pixels)], future, then))
            start += len(pixels)
        for members in groups.values():
            try:
                answers = await loop.run_in_executor(self._then_pool, self._then, members[0][2],
                                                     np.concatenate([part for part, _, _ in members]))
            except Exception as e:  # the same `key`, the same error for each (e.g. k out of range)
                _fail([future for _, future, _ in members], e)
                continue
            start = 0
            for part, future, _ in members:
                if not future.done():
                    future.set_result(answers[start : start + len(part)])
                start += len(part)

    def _then(self, then: Callable[[np.ndarray], list], vectors: np.ndarray) -> list:
        self.then_calls += 1
        return then(vectors)

    def _predict(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.asarray(self.model.predict_on_batch(images), np.float32)


def _fail(futures: list[asyncio.Future], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
