"""The tickets a KV receiver expects, by transfer key, and the secrets of the last ones that
ended. A sender reconnects with the first item it had queued; when that item's transfer ended a
moment before (cancelled: its request finished at its first token), its frame still proves the
new connection, so the transfers queued behind it are not refused (for nccl, a PAIR refused
would leave its sender waiting for a peer that never joins). Not thread-safe: the receiver
holds its lock around every call."""

from __future__ import annotations

import collections
import time

from .incoming import Incoming

MAX_ENDED = 4096  # ended tickets whose secrets still prove a connection


class Tickets:
    def __init__(self):
        self.live: dict[bytes, Incoming] = {}
        self._ended: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def add(self, incoming: Incoming) -> None:
        self.live[incoming.ticket.transfer_key] = incoming

    def get(self, key: bytes) -> Incoming | None:
        return self.live.get(key)

    def end(self, key: bytes) -> Incoming | None:
        """Takes the ticket out (None: it had ended), remembering its secret."""
        incoming = self.live.pop(key, None)
        if incoming is not None:
            self._ended[key] = incoming.ticket.secret
            if len(self._ended) > MAX_ENDED:
                self._ended.popitem(last=False)
        return incoming

    def ended_secret(self, key: bytes) -> bytes | None:
        return self._ended.get(key)

    def late(self, transfer_timeout: float) -> list[Incoming]:
        """Tickets whose bytes have not begun by their deadline, and transfers not landed
        `transfer_timeout` after their first bytes."""
        now, wall = time.monotonic(), time.time()
        return [i for i in self.live.values()
                if (i.started_at is None and wall > i.ticket.deadline)
                or (i.started_at is not None and now > i.started_at + transfer_timeout)]
