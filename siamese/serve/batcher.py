"""Requests that arrive together are embedded in one model call.

`Batcher.embed(pixels)` waits at most `wait_ms` (default 2) for other requests, up to `max_batch` images (default
32), then runs the model once, on one thread, for all of them. While the model runs, new requests gather for the next
call, which starts as soon as this one ends: under load the batches grow by themselves, and alone a request waits
`wait_ms` at most.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np


class Batcher:
    """Micro-batching of one model's calls; `image_size` is its input side."""

    def __init__(self, model: keras.Model, max_batch: int = 32, wait_ms: float = 2.0):
        self.model = model
        self.image_size = int(model.input_shape[1])
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a model call is running
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="siamese-model")
        self.calls = 0  # model calls so far, for tests and /info

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """The embeddings `(n, dim)` of uint8 `pixels` `(n, size, size, 3)`, batched with concurrent requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((pixels, future))
        if self._busy:
            pass  # the next call takes it when the running one ends
        elif sum(len(p) for p, _ in self._pending) >= self.max_batch:
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
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        images = np.concatenate([pixels for pixels, _ in batch])
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._pool, self._predict, images)
        except Exception as e:  # every waiting request gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            self._busy = False
            self._flush()
        start = 0
        for pixels, future in batch:
            if not future.done():
                future.set_result(vectors[start : start + len(pixels)])
            start += len(pixels)

    def _predict(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.asarray(self.model.predict_on_batch(images), np.float32)
