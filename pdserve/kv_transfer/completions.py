"""One thread that polls CUDA events against deadlines and calls back once each is done
(`on_done(None)`) or late (`on_done(TimeoutError)`), in the order they were added. The KV
receivers settle a transfer through it once its copies into the blocks have run (so the
decode node admits a request only after its KV is there, and its steps never wait for a
landing); the nccl sender learns through it that a transfer's bytes have left."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from pdserve.engine.private_apis import tight_timer_slack

log = logging.getLogger(__name__)

POLL_S = 20e-6  # between two looks at an event (the thread's timer slack is tight)


class Completions:
    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, event, deadline: float, on_done: Callable[[BaseException | None], None]) -> None:
        """`deadline` in time.monotonic(); `event` None means done already."""
        self._queue.put((event, deadline, on_done))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        tight_timer_slack()
        while (item := self._queue.get()) is not None:
            event, deadline, on_done = item
            error = None
            while event is not None and not event.query():
                if time.monotonic() > deadline:
                    error = TimeoutError("the copies did not complete in time")
                    break
                time.sleep(POLL_S)
            try:
                on_done(error)
            except Exception:  # a callback's bug must not stop the others
                log.exception("completion callback failed")
