"""Dynamic micro-batching for one model: concurrent requests share one runtime call.

Requests (each one or more images) wait in a bounded queue counted in images. A worker task takes
the oldest request, waits at most ``max_delay_ms`` for others to arrive (no wait once
``max_batch`` images are there, or when batching is off with ``max_batch=1``), concatenates whole
requests up to ``max_batch`` images, runs the predictor in its own thread (the event loop stays
free for HTTP) and hands every request its rows. A full queue raises ``QueueFull`` at once (the
server answers 503 with Retry-After); ``drain`` stops intake and finishes what is queued.

Example:
    >>> b = Batcher(predict_fn, max_batch=32, max_delay_ms=5, max_queue=512)  # doctest: +SKIP
    >>> rows = await b.submit(pixels)                                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("imgclf")


class QueueFull(Exception):
    """The queue has no room for the request; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"queue full, retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """``fn(pixels (N, H, W, C) uint8) -> dict of arrays with N rows``, batched across requests."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], dict[str, np.ndarray]],
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 512,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.fn, self.max_batch, self.max_delay, self.max_queue = fn, max_batch, max_delay_ms / 1000, max_queue
        self.on_batch = on_batch
        self.queue: deque[_Job] = deque()
        self.queued_images = 0
        self.closed = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="imgclf-infer")  # one call at a time per model
        self._seconds_per_image = 0.01  # running estimate, for Retry-After

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1), for Retry-After."""
        return max(1, math.ceil(self.queued_images * self._seconds_per_image))

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one request's images; their output rows once computed."""
        if self.closed:
            raise Draining()
        n = len(pixels)
        if self.queued_images + n > self.max_queue and self.queued_images > 0:
            raise QueueFull(self.retry_after())
        job = _Job(pixels, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.queued_images += n
        self._wake.set()
        return await job.future

    async def _run(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                if self.closed:
                    return
                await self._wake.wait()
            await self._wait_for_batch()
            jobs = self._take()
            try:
                if jobs:
                    await self._execute(jobs)
            except asyncio.CancelledError:
                _fail(jobs, Draining())
                raise
            except Exception as e:  # noqa: BLE001 - never let the worker die: fail this batch, go on
                log.exception("batch of %d requests failed outside the runtime call", len(jobs))
                _fail(jobs, e)

    async def _wait_for_batch(self) -> None:
        """Up to ``max_delay`` after the oldest request arrived, unless the batch is already full."""
        deadline = self.queue[0].enqueued + self.max_delay
        while self.queued_images < self.max_batch and not self.closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Job]:
        jobs, n = [], 0
        while self.queue and (not jobs or n + len(self.queue[0].pixels) <= self.max_batch):
            job = self.queue.popleft()
            self.queued_images -= len(job.pixels)
            if job.future.done():  # the client timed out or went away while queued
                continue
            jobs.append(job)
            n += len(job.pixels)
        return jobs

    async def _execute(self, jobs: list[_Job]) -> None:
        px = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
        t0 = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, px)
        except Exception as e:  # noqa: BLE001 - the runtime failed: every request in the batch gets the error
            _fail(jobs, e)
            return
        dt = time.perf_counter() - t0
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * dt / len(px)
        if self.on_batch:
            self.on_batch(len(px), dt)
        start = 0
        for j in jobs:
            n = len(j.pixels)
            if not j.future.done():
                j.future.set_result({k: v[start : start + n] for k, v in out.items()})
            start += n

    async def drain(self, timeout: float = 30.0) -> bool:
        """Take no new requests, finish the queued ones (True if all finished within ``timeout``)."""
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
            return True
        except TimeoutError:
            self._task.cancel()
            _fail(list(self.queue), Draining())  # answer what never ran, rather than leave it waiting
            self.queue.clear()
            self.queued_images = 0
            return False
        finally:
            self._executor.shutdown(wait=False)

    def healthy(self) -> bool:
        """The worker task is running (or was never started)."""
        return self._task is None or not self._task.done() or self.closed


def _fail(jobs: list[_Job], error: BaseException) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(error)
