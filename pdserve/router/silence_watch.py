"""Bounds how long a decode stream may stay silent, with one periodic check for all of them
rather than a timer per read (the reads are the router's hot path). A decode node sends a
heartbeat while a request waits, so a silent stream means a hung node: the watch cancels the
call, and the reader, seeing `silent`, treats it as that node's failure (torch-free)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

CHECK_INTERVAL_S = 0.25  # a silence is caught within the bound plus this (a pass over the set is cheap)


@dataclass(eq=False)
class Watched:
    call: object  # a grpc.aio stream call
    last: float = field(default_factory=time.monotonic)  # when it last sent a message
    silent: bool = False  # the watch cancelled it for its silence


class SilenceWatch:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.watched: set[Watched] = set()
        self._task: asyncio.Task | None = None

    def watch(self, call) -> Watched:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        entry = Watched(call)
        self.watched.add(entry)
        return entry

    def unwatch(self, entry: Watched) -> None:
        self.watched.discard(entry)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(self.timeout_s / 4, CHECK_INTERVAL_S))
            now = time.monotonic()
            for entry in [e for e in self.watched if now - e.last > self.timeout_s]:
                entry.silent = True
                self.watched.discard(entry)
                entry.call.cancel()
