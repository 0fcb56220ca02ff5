"""The receiver's record of which transfers a sender writes in place (the `ipc` connector), and
so which reserved blocks another process may still write.

Who may free such blocks: the decode node frees a reservation when its request ends; for a
transfer written in place, not before its writer is done with the blocks. A CLAIM frame that
the receiver GRANTs makes a `Claim`; a forgotten transfer (receiver `forget`) whose claim is
open has its `then` (the free) wait for the claim's end: the writer's LANDED or ABORT (sent
only after every write it queued has run), its connection closed plus `close_grace_s` (the
writes of a process that died end with it), or the claim's time bound (`transfer_timeout`
after the GRANT: a writer stuck past it is taken to be gone). A transfer forgotten before any
claim is freed at once, and a later CLAIM for it is DENYed, so nothing writes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 1.0  # after a writer's connection closes, until its blocks may be reused


@dataclass(eq=False)
class Claim:
    transfer_id: str
    conn: object  # the Connection that was GRANTed
    until: float  # time.monotonic(): the claim ends then at the latest
    then: list[Callable[[], None]] = field(default_factory=list)  # what waits for its end


class Claims:
    def __init__(self, transfer_timeout: float, close_grace_s: float = CLOSE_GRACE_S):
        self.transfer_timeout = transfer_timeout
        self.close_grace_s = close_grace_s
        self._claims: dict[bytes, Claim] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._claims)

    def grant(self, key: bytes, conn) -> bool:
        """Records `conn`'s claim; False if the transfer was claimed before."""
        with self._lock:
            if key in self._claims:
                return False
            self._claims[key] = Claim(key.hex(), conn, time.monotonic() + self.transfer_timeout)
            return True

    def holder(self, key: bytes):
        """The connection that holds the claim on `key`, or None."""
        with self._lock:
            claim = self._claims.get(key)
            return None if claim is None else claim.conn

    def after(self, key: bytes, then: Callable[[], None] | None) -> None:
        """Runs `then` once the claim on `key` ends: at once when there is none."""
        with self._lock:
            claim = self._claims.get(key)
            if claim is not None and then is not None:
                claim.then.append(then)
                return
        if then is not None:
            then()

    def end(self, key: bytes) -> None:
        """The writer is done with the blocks (its LANDED or ABORT came)."""
        with self._lock:
            claim = self._claims.pop(key, None)
        _run(claim)

    def closed(self, conn) -> None:
        """`conn` closed: its claims end `close_grace_s` from now."""
        until = time.monotonic() + self.close_grace_s
        with self._lock:
            for claim in self._claims.values():
                if claim.conn is conn:
                    claim.until = min(claim.until, until)

    def expire(self) -> None:
        """Ends the claims past their time (the receiver's watch calls it)."""
        now = time.monotonic()
        with self._lock:
            over = [key for key, claim in self._claims.items() if now > claim.until]
            ended = [self._claims.pop(key) for key in over]
        for claim in ended:
            log.warning("kv transfer %s: its in-place writer is done or gone (no LANDED or ABORT): "
                        "its blocks may be reused", claim.transfer_id)
            _run(claim)


def _run(claim: Claim | None) -> None:
    for then in claim.then if claim is not None else ():
        then()
