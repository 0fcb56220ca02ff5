"""The decode node's admission queue: a request whose prompt does not fit in the free blocks
waits here, first come first served, until blocks free up; only a full queue refuses (429).

Why here and not in the router: the decode node knows its free blocks exactly and at once,
while a router sees them through polled stats, and several routers may share one node. The
router picks the least loaded decode node (queued requests count as load) and waits for the
ticket; the reservation itself happens when the node has room, so nothing is reserved while
it waits.

FIFO: while anyone waits, a new request queues behind them even if it would fit, so a large
prompt is not starved by smaller ones. `kick()` (after every engine step and every freed
request) lets the head try again; each one that gets its blocks lets the next one try.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

R = TypeVar("R")

Reserve = Callable[[], Awaitable["R | None"]]  # a reservation, or None: no room now


class QueueFull(Exception):
    """The queue is at its bound: the caller answers RESOURCE_EXHAUSTED."""


@dataclass(eq=False)
class _Waiter:
    turn: asyncio.Event = field(default_factory=asyncio.Event)  # set: the head may try again


class AdmissionQueue:
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._waiting: collections.deque[_Waiter] = collections.deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def reserve(self, reserve: Reserve) -> R:
        """What `reserve()` gives: now if nobody waits and they fit, else once the requests
        ahead were served and they fit. Raises QueueFull. Each caller runs its own `reserve()`
        (on its turn, at the head of the queue), so a caller cancelled at any point owns
        whatever that call reserved and frees it as usual."""
        if not self._waiting:
            reservation = await reserve()
            if reservation is not None:
                return reservation
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests already wait for KV blocks")
        waiter = _Waiter()
        self._waiting.append(waiter)
        self.kick()  # blocks may have been freed since the try above
        try:
            while True:
                await waiter.turn.wait()
                waiter.turn.clear()
                reservation = await reserve()
                if reservation is not None:
                    return reservation
        finally:
            self._waiting.remove(waiter)
            self.kick()  # the next one may fit too, or is the head now

    def kick(self) -> None:
        """Blocks may have been freed: the head of the queue tries again (and on success the
        next one, and so on, until one does not fit)."""
        if self._waiting:
            self._waiting[0].turn.set()
