"""Dynamic batching: concurrent requests gathered into one victim call, as Triton's
``max_queue_delay``, TorchServe's ``maxBatchDelay`` and Ray Serve's ``@serve.batch`` do.

A request waits at most ``max_delay`` seconds after the oldest waiting request arrived (less
when ``max_batch`` images are already waiting), then every waiting request, up to ``max_batch``
images, goes to the victim as one batch in the batcher's own thread, and each request gets its
own rows back. While the victim runs, the next requests queue up; they have usually waited out
the delay by the time it is free, so under load batches form without any added wait.

A fault anywhere in forming or running a batch (the victim, joining the images, the
``observe`` hook) fails that batch's requests only; the worker goes on with the next one, and a
worker that died all the same is restarted by the next ``submit``. ``health()`` tells a dead
worker or a batch that has run for longer than ``stuck_after`` seconds (``/healthz`` reports it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from divqat.checks import check_int, check_number

log = logging.getLogger("divqat.serve")


@dataclass
class _Waiting:
    images: Tensor
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """``await batcher.submit(images) -> run(images)``, with concurrent submissions batched.

    Arguments:
        run (callable): images (N, C, H, W) -> rows (N, ...), blocking; called in one thread of
            the batcher's own, one batch at a time (the victim behind its defense).
        max_batch (int): most images per call, unless one request alone has more (it is run
            alone, never split). (Default: 256, the victim's largest compiled bucket.)
        max_delay (float): seconds the oldest waiting request may wait for others to join.
            0 runs whatever is waiting at once. (Default: 0.002.)
        observe (callable, optional): told ``(images, requests, seconds)`` after each call
            (a failure of it is logged; the answers still go out).
        stuck_after (float): seconds one victim call may run before ``health()`` calls the
            worker stuck. (Default: 60.)

    Use inside a running event loop: ``start()``, ``submit(...)``, ``close()`` (which answers
    everything already submitted first).
    """

    def __init__(self, run: Callable[[Tensor], Tensor], *, max_batch: int = 256,
                 max_delay: float = 0.002,
                 observe: Callable[[int, int, float], None] | None = None,
                 stuck_after: float = 60.0) -> None:
        self._run = run
        self.max_batch = check_int("batcher", "max_batch", max_batch, low=1)
        self.max_delay = check_number("batcher", "max_delay", max_delay, low=0, high=10)
        self._observe = observe
        self.stuck_after = check_number("batcher", "stuck_after", stuck_after, low=0)
        self._running_since: float | None = None  # time.monotonic() when the current call began
        self.restarts = 0
        self._waiting: deque[_Waiting] = deque()
        self._waiting_images = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divqat-victim")
        self._spawn()

    def _spawn(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="divqat-batcher")

    def health(self) -> str | None:
        """None while the worker is alive and no call has run past ``stuck_after``; otherwise
        what is wrong, in words."""
        if self._worker is None:
            return "the batcher is not running"
        if self._worker.done() and not self._closing:
            return "the batcher's worker died"
        since = self._running_since
        if since is not None and time.monotonic() - since > self.stuck_after:
            return f"a victim call has been running for {time.monotonic() - since:.0f} s"
        return None

    async def submit(self, images: Tensor) -> Tensor:
        """The rows ``run`` gives for ``images``, computed in a batch with whatever else is
        waiting. Raises what ``run`` raised for the batch."""
        if self._worker is None or self._closing:
            raise RuntimeError("the batcher is not running")
        if self._worker.done():  # it died (it should not: _work catches every Exception)
            log.error("the batcher's worker had died; restarted")
            self.restarts += 1
            self._spawn()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(_Waiting(images, future, loop.time()))
        self._waiting_images += len(images)
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Answer every request already submitted, then stop the worker and its thread."""
        if self._worker is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._worker
        self._executor.shutdown(wait=True)
        self._worker = None

    def _take(self) -> list[_Waiting]:
        """The waiting requests of the next batch: the oldest first, up to ``max_batch`` images
        (at least one request)."""
        group = [self._waiting.popleft()]
        size = len(group[0].images)
        while self._waiting and size + len(self._waiting[0].images) <= self.max_batch:
            group.append(self._waiting.popleft())
            size += len(group[-1].images)
        self._waiting_images -= size
        return group

    def _assemble(self, group: list[_Waiting]) -> Tensor:
        """The images of a group as one batch."""
        return group[0].images if len(group) == 1 else torch.cat([w.images for w in group])

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._waiting[0].arrived + self.max_delay
            while self._waiting_images < self.max_batch and not self._closing:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    break
            group = self._take()
            start = time.perf_counter()
            try:
                batch = self._assemble(group)
                self._running_since = time.monotonic()
                try:
                    rows = await loop.run_in_executor(self._executor, self._run, batch)
                finally:
                    self._running_since = None
            except Exception as e:  # every request of the batch gets the error; serving goes on
                for w in group:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            if self._observe is not None:
                try:
                    self._observe(len(batch), len(group), time.perf_counter() - start)
                except Exception:
                    log.exception("the batcher's observe hook failed; the answers go out")
            offset = 0
            for w in group:
                n = len(w.images)
                if not w.future.done():  # done: the request was cancelled (its client went away)
                    try:
                        w.future.set_result(rows[offset:offset + n])
                    except Exception as e:  # rows that cannot be sliced: this request fails
                        w.future.set_exception(e)
                offset += n
