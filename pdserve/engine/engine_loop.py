"""An Engine behind asyncio: one worker thread owns the engine, gRPC handlers talk to it.

Every engine call (add, abort, reserve, admit, stats, step) runs on the same single worker
thread, in submission order, so the engine never sees two threads and a call made while a
step runs simply lands before the next step. The loop task steps while there is work and
hands each RequestOutput to the asyncio queue of its request.

`stats` is the engine's stats as of the end of the last call or step, read on the engine
thread: health and stats RPCs answer from it at once, however long a step takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable

from .engine import Engine
from .request import RequestOutput

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine, step: Callable[[], list[RequestOutput]] | None = None,
                 after_step: Callable[[dict], None] | None = None):
        self.engine = engine
        self._step = step or engine.step  # the prefill node wraps it to push KV
        self._after_step = after_step  # gets engine.stats() after each step (metrics)
        # the current CUDA device is per thread: Triton launches on it, so it must be the engine's
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="engine", initializer=engine.runner.use_device)
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_steps = 0
        self.stats: dict = engine.stats()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def call(self, fn: Callable, *args, **kwargs):
        """Runs `fn` on the engine thread between steps and wakes the loop."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: self._with_stats(fn, *args, **kwargs))
        finally:
            self._wakeup.set()

    def call_soon(self, fn: Callable, *args) -> None:
        """`call` without waiting for the result (safe in a `finally` of a cancelled handler)."""
        self._executor.submit(self._with_stats, fn, *args)
        self._wakeup.set()

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        queue = self._queues[request_id] = asyncio.Queue()
        return queue

    def close_stream(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs, stats = await loop.run_in_executor(self._executor, self._step_and_stats)
            except Exception:  # a step must never kill the node; fail loudly, keep serving
                log.exception("engine step failed; aborting every request")
                for request_id in await self.call(self._abort_all):
                    if request_id in self._queues:
                        self._queues[request_id].put_nowait(None)  # its handler fails the RPC
                continue
            self.num_steps += 1
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            if self._after_step is not None:
                self._after_step(stats)

    def _step_and_stats(self):
        outputs = self._step()
        self.stats = self.engine.stats()
        return outputs, self.stats

    def _with_stats(self, fn: Callable, *args, **kwargs):
        """On the engine thread: `fn`, then refresh `stats`."""
        try:
            return fn(*args, **kwargs)
        finally:
            self.stats = self.engine.stats()

    def _abort_all(self) -> list[str]:
        return [r for r in list(self.engine.requests) if self.engine.abort_request(r)]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
