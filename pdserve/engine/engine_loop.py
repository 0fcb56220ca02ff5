"""An Engine behind asyncio: a thread of its own owns the engine and steps it for as long as
there is work; gRPC handlers talk to it through `call`, `call_soon` and per-request queues.

Every engine call (add, abort, reserve, admit, ...) and every step runs on that one thread, in
submission order: a call made while a step runs lands before the next step, and the engine
never sees two threads. The thread never waits for the event loop: it hands each step's
outputs (and each call's result) over with one `call_soon_threadsafe` and goes on with the
next step, so a busy event loop (hundreds of streams) does not leave the GPU idle between steps.

`stats` is the engine's stats as of the end of the last call or step, read on the engine
thread: health and stats RPCs answer from it at once, however long a step takes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

from .engine import Engine
from .request import RequestOutput

log = logging.getLogger(__name__)


class _Call(NamedTuple):
    fn: Callable
    args: tuple
    kwargs: dict
    future: asyncio.Future | None  # None: nobody waits for the result (call_soon)


class EngineLoop:
    def __init__(self, engine: Engine, step: Callable[[], list[RequestOutput]] | None = None,
                 after_step: Callable[[dict], None] | None = None):
        self.engine = engine
        self._step = step or engine.step  # the prefill node wraps it to push KV
        self._after_step = after_step  # gets engine.stats() after each step, on the event loop (metrics)
        self._calls: collections.deque[_Call] = collections.deque()  # appended by the event loop
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._closed = False
        self.num_steps = 0
        self.stats: dict = engine.stats()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def call(self, fn: Callable, *args, **kwargs):
        """Runs `fn` on the engine thread, before its next step, and returns its result."""
        future = self._loop.create_future()
        self._calls.append(_Call(fn, args, kwargs, future))
        self._wake.set()
        return await future

    def call_soon(self, fn: Callable, *args, then: Callable[[], None] | None = None) -> None:
        """`call` without waiting for the result (safe in a `finally` of a cancelled handler).
        `then()` runs on the event loop once `fn` has run, after the outputs of every step that
        ended before it were delivered: a request id aborted so is free for reuse only then,
        when no output of the old request can reach a stream opened under the same id."""
        future = None
        if then is not None:
            future = self._loop.create_future()
            future.add_done_callback(lambda _: then())
        self._calls.append(_Call(fn, args, {}, future))
        self._wake.set()

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput | None]:
        """The request's outputs, in order; None if an engine step failed (it was aborted)."""
        queue = self._queues[request_id] = asyncio.Queue()
        return queue

    def close_stream(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def beat(self, marker) -> None:
        """Puts `marker` into every open stream (call on the event loop): a reader that finds
        only markers since it last sent knows its request produced nothing meanwhile."""
        for queue in self._queues.values():
            queue.put_nowait(marker)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 5)

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        self.engine.runner.use_device()  # Triton launches on the current device: the engine's
        while not self._closed:
            self._run_calls()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self._step()
            except Exception:  # a step must never kill the node; fail loudly, keep serving
                log.exception("engine step failed; aborting every request")
                aborted = [r for r in list(self.engine.requests) if self.engine.abort_request(r)]
                self._loop.call_soon_threadsafe(self._fail_streams, aborted)
                continue
            self.num_steps += 1
            self.stats = self.engine.stats()
            self._loop.call_soon_threadsafe(self._deliver, outputs, self.stats)

    def _run_calls(self) -> None:
        """The calls queued so far, in order; `stats` refreshed once after them (a burst of
        arrivals is many calls) and before any caller hears back, so a caller never reads
        stats older than its own call."""
        done = []
        while self._calls:
            call = self._calls.popleft()
            try:
                done.append((call, call.fn(*call.args, **call.kwargs), None))
            except Exception as e:  # the caller's to handle (bad input, ...)
                done.append((call, None, e))
        if not done:
            return
        self.stats = self.engine.stats()
        for call, result, error in done:
            if call.future is not None:
                self._loop.call_soon_threadsafe(_resolve, call.future, result, error)
            elif error is not None:
                log.error("engine call %s failed: %s", getattr(call.fn, "__name__", call.fn), error)

    # ---- the event loop -------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput], stats: dict) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if self._after_step is not None:
            self._after_step(stats)

    def _fail_streams(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if request_id in self._queues:
                self._queues[request_id].put_nowait(None)  # its handler fails the RPC


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
