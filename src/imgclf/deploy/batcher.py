"""Dynamic micro-batching for one model: concurrent requests share one runtime call.

Requests (each one or more images) wait in a bounded queue counted in images. A worker task takes
the oldest request, waits at most ``max_delay_ms`` for others to arrive (no wait once
``max_batch`` images are there, or when batching is off with ``max_batch=1``), and takes whole
requests up to ``max_batch`` images. A request may bring encoded images rather than pixels: they are
decoded in the ``prepare`` pool in rounds, each taking every request that arrived since the last one
began (a few thread hops per round instead of one per request), while requests wait for their batch
and the runtime works; a request whose images fail to decode gets its own error, the others go on.
The predictor runs in its own thread (the event loop stays free for HTTP), one call at a time; the
next full batch is taken while the previous one runs. A full queue raises ``QueueFull`` at once
(the server answers 503 with Retry-After); ``drain`` stops intake and finishes what is queued.

Example:
    >>> b = Batcher(predict_fn, max_batch=32, max_delay_ms=5, max_queue=512)  # doctest: +SKIP
    >>> rows = await b.submit(pixels)                                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
    items: Any  # (n, H, W, C) uint8 pixels, or what ``prepare`` turns into them (encoded images)
    n: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    pixels: np.ndarray | None = None
    error: BaseException | None = None
    counted: bool = True  # its images are in ``Batcher.queued_images``


class Batcher:
    """``fn(pixels (N, H, W, C) uint8) -> dict of arrays with N rows``, batched across requests.

    Args:
        fn: the runtime call, run in a thread of its own.
        max_batch, max_delay_ms, max_queue: images per call, longest wait for a batch to fill (ms), most
            images waiting (``QueueFull`` beyond).
        on_batch: called with (images, seconds) after every runtime call.
        prepare: ``prepare(items) -> (n, H, W, C) uint8`` for requests submitted as something other than
            pixels (encoded images); run in ``pool`` in rounds of up to a batch, split over ``prepare_threads``
            tasks; what it raises becomes that request's error.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], dict[str, np.ndarray]],
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 512,
        on_batch: Callable[[int, float], None] | None = None,
        prepare: Callable[[Any], np.ndarray] | None = None,
        pool: Executor | None = None,
        prepare_threads: int = 1,
    ):
        self.fn, self.max_batch, self.max_delay, self.max_queue = fn, max_batch, max_delay_ms / 1000, max_queue
        self.on_batch, self.prepare, self.pool, self.prepare_threads = on_batch, prepare, pool, prepare_threads
        self.queue: deque[_Job] = deque()
        self.queued_images = 0
        self._undecoded: deque[_Job] = deque()  # queued requests whose images no decode round has taken yet
        self._decoding: asyncio.Future | None = None  # the decode round in the pool
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

    async def submit(self, items: Any, n: int | None = None) -> dict[str, np.ndarray]:
        """Queue one request's images: (n, H, W, C) uint8 pixels, or ``n`` items for ``prepare``; their
        output rows once computed. Raises ``QueueFull``, ``Draining``, or what ``prepare`` raised for them."""
        if self.closed:
            raise Draining()
        if not isinstance(items, np.ndarray) and self.prepare is None:
            raise TypeError("this batcher takes pixels only (no prepare function)")
        n = len(items) if n is None else n
        if self.queued_images + n > self.max_queue and self.queued_images > 0:
            raise QueueFull(self.retry_after())
        job = _Job(items, n, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.queued_images += n
        if not isinstance(items, np.ndarray):
            self._undecoded.append(job)
            self._decode_ahead()
        if len(self.queue) == 1 or self.queued_images >= self.max_batch:  # the worker only waits for these
            self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away or timed out: its images no longer wait
            self._uncount([job])
            raise

    def _uncount(self, jobs: list[_Job]) -> None:
        for j in jobs:
            if j.counted:
                j.counted = False
                self.queued_images -= j.n

    async def _run(self) -> None:
        running: asyncio.Task | None = None  # the runtime call in flight
        while True:
            while not self.queue:
                if self.closed:
                    if running is not None:
                        await running
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._wait_for_batch(running)
            jobs = self._take()
            taken = list(jobs)  # still counted as queued until the runtime takes them
            try:
                px = await self._prepare(jobs) if jobs else None
                if running is not None:
                    await running  # one call at a time (it never raises: _execute answers its own jobs)
                    running = None
                if px is not None:
                    running = asyncio.get_running_loop().create_task(self._execute(jobs, px))
                    running.add_done_callback(lambda _: self._wake.set())
            except asyncio.CancelledError:
                _fail(jobs, Draining())
                if running is not None:
                    running.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - never let the worker die: fail this batch, go on
                log.exception("batch of %d requests failed outside the runtime call", len(jobs))
                _fail(jobs, e)
            finally:
                self._uncount(taken)

    async def _wait_for_batch(self, running: asyncio.Task | None) -> None:
        """Until ``max_batch`` images wait, or the oldest request has waited ``max_delay`` and the runtime is
        free (while it is busy, more requests join the next batch)."""
        deadline = self.queue[0].enqueued + self.max_delay
        while self.queued_images < self.max_batch and not self.closed:
            busy = running is not None and not running.done()
            left = deadline - time.perf_counter()
            if left <= 0 and not busy:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(None if busy else left):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Job]:
        """The next batch: whole requests, oldest first, up to ``max_batch`` images (always one at least)."""
        jobs, n = [], 0
        while self.queue and (not jobs or n + self.queue[0].n <= self.max_batch):
            job = self.queue.popleft()
            if job.future.done():  # the client timed out or went away while queued
                self._uncount([job])
                continue
            jobs.append(job)
            n += job.n
        return jobs

    def _decode_ahead(self) -> None:
        """Start a decode round in the pool for the requests waiting undecoded (up to a batch of images, split
        over ``prepare_threads`` tasks), unless one is running: its end starts the next. Requests are decoded
        while they wait for their batch and while the runtime works, so a batch is ready when its turn comes."""
        if self._decoding is not None:
            return
        jobs, n = [], 0
        while self._undecoded and n < self.max_batch:
            j = self._undecoded.popleft()
            if not j.future.done():  # (a request whose client left is not decoded)
                jobs.append(j)
                n += j.n
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        parts = min(self.prepare_threads, len(jobs))
        tasks = asyncio.gather(*(loop.run_in_executor(self.pool, self._prepare_all, jobs[i::parts])
                                 for i in range(parts)))  # fmt: skip
        self._decoding = loop.create_future()  # resolved once the round's results are in its jobs
        tasks.add_done_callback(functools.partial(self._decoded, jobs, self._decoding))

    def _decoded(self, jobs: list[_Job], done: asyncio.Future, tasks: asyncio.Future) -> None:
        if tasks.cancelled() or tasks.exception() is not None:  # the pool is gone (shutting down)
            for j in jobs:
                if j.pixels is None and j.error is None:
                    j.error = Draining() if tasks.cancelled() else tasks.exception()
        self._decoding = None
        self._decode_ahead()  # the requests that arrived meanwhile
        done.set_result(None)
        self._wake.set()

    def _undecoded_in(self, jobs: list[_Job]) -> bool:
        return any(not isinstance(j.items, np.ndarray) and j.pixels is None and j.error is None
                   and not j.future.done() for j in jobs)  # fmt: skip

    async def _prepare(self, jobs: list[_Job]) -> np.ndarray | None:
        """The batch's pixels, once the decode rounds have reached all its requests; failed requests are answered
        and dropped from ``jobs``. None when none is left."""
        while self._undecoded_in(jobs):
            self._decode_ahead()
            if self._decoding is None:  # every undecoded request is in _undecoded or in the running round
                raise RuntimeError("a request of the batch is in no decode round")
            await asyncio.shield(self._decoding)  # (resolved after its jobs are marked: no busy loop)
        for j in jobs:
            if j.error is not None and not j.future.done():
                j.future.set_exception(j.error)
        jobs[:] = [j for j in jobs if j.error is None and not j.future.done()]
        rows = [j.items if j.pixels is None else j.pixels for j in jobs]
        if not rows:
            return None
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _prepare_all(self, jobs: list[_Job]) -> None:
        """(In the pool.) Each job's pixels, or its error."""
        for j in jobs:
            try:
                j.pixels = self.prepare(j.items)
                if len(j.pixels) != j.n:
                    raise RuntimeError(f"prepare gave {len(j.pixels)} images for a request of {j.n}")
            except Exception as e:  # noqa: BLE001 - the request's own error (a bad image, ...), raised to it
                j.error = e

    async def _execute(self, jobs: list[_Job], px: np.ndarray) -> None:
        """(A task of its own.) The runtime call; answers every job of the batch, never raises but on cancel."""
        try:
            t0 = time.perf_counter()
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, px)
            except Exception as e:  # noqa: BLE001 - the runtime failed: every request in the batch gets the error
                _fail(jobs, e)
                return
            try:
                dt = time.perf_counter() - t0
                self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * dt / len(px)
                if self.on_batch:
                    self.on_batch(len(px), dt)
                start = 0
                for j in jobs:
                    if not j.future.done():
                        j.future.set_result({k: v[start : start + j.n] for k, v in out.items()})
                    start += j.n
            except Exception as e:  # noqa: BLE001 - a bug of ours (an observer, a bad output): log, fail the batch
                log.exception("batch of %d requests failed outside the runtime call", len(jobs))
                _fail(jobs, e)
        except asyncio.CancelledError:
            _fail(jobs, Draining())
            raise

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
            self._uncount(list(self.queue))  # (a batch being decoded counts itself out)
            self.queue.clear()
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
