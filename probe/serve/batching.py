"""Dynamic micro-batching: requests that arrive together share one forward pass.

One worker task takes the first waiting item, then keeps collecting until it holds ``max_batch`` items or
``max_wait_ms`` have passed since the first, runs ``fn`` on the whole batch in a single dedicated thread (the
event loop keeps accepting requests meanwhile) and hands every caller its own row. While a forward runs, new
requests queue up, so under load batches fill by themselves and throughput approaches the offline extraction rate;
a lone request waits at most ``max_wait_ms``.

Example:
    >>> batcher = MicroBatcher(lambda xs: embedder(torch.stack(xs)), max_batch=32, max_wait_ms=5)
    >>> await batcher.start()
    >>> row = await batcher.submit(tensor)        # (D,) — computed together with whatever else was waiting
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from ..errors import ProbeError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchStats:
    """Counters for /health and /metrics: how many requests went through how many forward passes."""

    def __init__(self) -> None:
        self.requests = 0
        self.batches = 0
        self.failed_batches = 0
        self.forward_seconds = 0.0
        self.sizes: Counter[int] = Counter()

    def record(self, size: int, seconds: float, ok: bool) -> None:
        self.requests += size
        self.batches += 1
        self.failed_batches += not ok
        self.forward_seconds += seconds
        self.sizes[size] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "mean_batch": round(self.requests / self.batches, 3) if self.batches else None,
            "max_batch_seen": max(self.sizes) if self.sizes else 0,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},  # size -> how many batches
            "forward_seconds": round(self.forward_seconds, 3),
        }


class MicroBatcher(Generic[T, R]):
    """Run ``fn(items) -> results`` (one result per item, in order) on batches of concurrently submitted items.

    ``max_batch=1`` turns batching off (one forward per request, no waiting): the baseline of the benchmark."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ProbeError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ProbeError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the worker on the running event loop (call from the app's startup)."""
        self._queue = asyncio.Queue()
        # one thread: forwards never overlap (they would only fight over the same cores); torch parallelises inside
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-forward")
        self._task = asyncio.create_task(self._worker(), name="probe-micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting get an error instead of hanging."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result (or the exception its batch raised)."""
        if not self.running:
            raise RuntimeError("the micro-batcher is not running (start() was not called, or it was stopped)")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The first waiting item, plus what arrives within max_wait of it, up to max_batch."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(x, f) for x, f in await self._collect() if not f.done()]  # done: the client went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [x for x, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the worker
                log.exception("forward pass on a batch of %d failed", len(batch))
                self.stats.record(len(batch), time.perf_counter() - t0, ok=False)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats.record(len(batch), time.perf_counter() - t0, ok=True)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
