"""A KV sender's side of one receiver: a queue of typed items and the thread that writes their
frames in order (each connector's channel says how: tcp_sender.py `TcpChannel`, nccl.py
`PairChannel`).

Items: `LayersItem` (the layers one `send_layers` call handed over, a `LayerEntry` each),
`DoneItem` (a transfer's DONE with its first token), `AbortItem`, and `STOP`. The layers of
`LayersItem`s queued back to back are taken up to `max_batch` layers and `max_batch_bytes`
at a time (the nccl connector sends each batch as one group).

Whoever writes holds `_lock` from taking an item off the queue until its frames are out, so
frames leave in queue order: this channel's thread, or (nccl) the thread that handed the
layers over, posting them itself while its connection is up.

A channel idle for `sender.channel_idle_s` asks its sender to retire it (`retire`), which the
sender grants only while nothing is queued and no transfer to its endpoint is unsettled; then
the thread disconnects and ends. So the channels of decode nodes that went away do not keep a
thread and a socket each for the life of the prefill node.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .connector import KVTicket
from .frame import abort_frame
from .sockets import dial, peer_closed

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Outgoing:
    """One transfer on the sender's side."""

    ticket: KVTicket
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    layer_checksums: dict[int, int] = field(default_factory=dict)
    num_bytes: int = 0
    error: BaseException | None = None
    staged: list = field(default_factory=list)  # nccl: tensors the process group still reads
    first_layer_at: float | None = None  # nccl: when its first layer was handed to the group
    pool: object = None  # ipc: the decode node's pool rows, opened here (None: the transfer goes over TCP)
    claimed: bool = False  # ipc: the receiver GRANTed this sender the transfer's blocks
    rows: object = None  # ipc: [num_layers, its blocks' K and V] pool rows, on the pool's device


class LayerEntry(NamedTuple):
    out: Outgoing
    layer: int
    staged: object  # the layer's tensor (on the host for tcp; where the cache is for nccl)
    ready: object  # tcp: a callable that waits for the host copy; nccl: a CUDA event or None


@dataclass(eq=False)
class LayersItem:
    entries: list[LayerEntry]
    num_bytes: int


@dataclass(eq=False)
class DoneItem:
    out: Outgoing
    first_token_id: int


@dataclass(eq=False)
class AbortItem:
    out: Outgoing


STOP = None  # the last item: the thread disconnects and ends


class FrameChannel:
    """One destination. Subclasses say how layers and DONE go out (`send_layers`,
    `send_done`); `sender` is the KV sender that owns the channel (its `connect_timeout` and
    `finished(out)`, which drops a settled transfer)."""

    max_batch = 1
    max_batch_bytes = 0

    def __init__(self, sender, endpoint: str):
        self.sender = sender
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self._items: collections.deque = collections.deque()  # appended by any thread, taken under _lock
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=f"kv-send-{endpoint}", daemon=True)
        self.thread.start()

    def put(self, item, wake: bool = True) -> None:
        """Queues `item`; `wake`: for this channel's thread to write it (else the caller
        writes it itself, or leaves it for whoever comes next: `post_queued` in nccl.py)."""
        self._items.append(item)
        if wake:
            self._wake.set()

    def has_items(self) -> bool:
        return bool(self._items)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.put(STOP)
        self.thread.join(timeout=5)

    def send_layers(self, entries: list[LayerEntry]) -> None:
        raise NotImplementedError

    def send_done(self, out: Outgoing, first_token_id: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stopping:
            if not self._wake.wait(self.sender.channel_idle_s) and self.sender.retire(self):
                break
            self._wake.clear()  # an item put from now on wakes the next round
            # Polled, not a blocking acquire: a thread blocked on a lock takes it the moment it
            # is released, then waits for the GIL while holding it (up to Python's switch
            # interval while the caller runs), and the caller could post nothing meanwhile
            while not self._lock.acquire(blocking=False):
                time.sleep(50e-6)
            try:
                self._drain()
            finally:
                self._lock.release()
        self._disconnect()

    def _drain(self, caller: bool = False) -> None:
        """Writes the queued items in order, under `_lock`. `caller` (the thread that handed
        them over): only layers and DONE, and only over the connection that is up (connecting
        is this channel's thread's work); the rest stays queued for that thread."""
        while self._items:
            item = self._items[0]
            if caller and (item is STOP or isinstance(item, AbortItem) or not self._connected()):
                return
            if item is STOP:
                self._stopping = True
                return
            if isinstance(item, LayersItem) and any(e.out.num_bytes == 0 for e in item.entries):
                self._drop_if_closed()  # a transfer's first frame: is the receiver still there?
                if caller and not self._connected():
                    return
            self._items.popleft()
            self._handle(item)

    def _connected(self) -> bool:
        return self.sock is not None

    def _handle(self, item) -> None:
        layers = isinstance(item, LayersItem)
        entries = self._batch(item) if layers else []
        try:
            if layers:
                self.send_layers([entry for entry in entries if entry.out.error is None])
            elif isinstance(item, DoneItem):
                self.send_done(item.out, item.first_token_id)
            else:
                self._write(item.out.ticket, abort_frame(item.out.ticket.transfer_key, item.out.ticket.secret))
                self.settle(item.out)
        except Exception as e:  # noqa: BLE001  (whatever broke, the transfers fail; the thread lives)
            self._disconnect()
            outs = [entry.out for entry in entries] if layers else [item.out]
            for out in {id(out): out for out in outs}.values():  # each transfer once
                log.warning("kv transfer %s to %s: %s", out.ticket.transfer_id, self.endpoint, e)
                out.error = out.error or ConnectionError(f"kv connection to {self.endpoint}: {e}")
                if not layers:  # DONE or ABORT: the transfer ends here (layers: at its DONE)
                    self.settle(out)

    def _batch(self, first: LayersItem) -> list[LayerEntry]:
        """The layers of `first` and of the items queued right after it, within the batch
        limits (the first layer always: it may pass them alone). Layers past the limits go
        back to the front of the queue as an item of their own, taken next."""
        entries, num_bytes, item = [], 0, first
        while True:
            if len(entries) + len(item.entries) <= self.max_batch and num_bytes + item.num_bytes <= self.max_batch_bytes:
                entries += item.entries  # the whole item fits (the usual case: no look at each layer)
                num_bytes += item.num_bytes
            else:
                for i, entry in enumerate(item.entries):
                    if entries and (len(entries) == self.max_batch
                                    or num_bytes + entry.staged.nbytes > self.max_batch_bytes):
                        rest = item.entries[i:]
                        self._items.appendleft(LayersItem(rest, sum(e.staged.nbytes for e in rest)))
                        return entries
                    entries.append(entry)
                    num_bytes += entry.staged.nbytes
            if not self._items or not isinstance(self._items[0], LayersItem):
                return entries
            item = self._items.popleft()

    def settle(self, out: Outgoing) -> None:
        """The transfer ended: its future gets the bytes sent, or its error."""
        self.sender.finished(out)
        if out.future.done():
            return
        if out.error is None:
            out.future.set_result(out.num_bytes)
        else:
            out.future.set_exception(out.error)

    def _drop_if_closed(self) -> None:
        """A dead receiver's socket stays writable for a while; the next `_write` reconnects
        (and fails at once if the receiver is gone for good). The receiver never writes, so a
        readable socket means it closed (or reset) the connection."""
        if self.sock is not None and peer_closed(self.sock):
            log.warning("kv receiver %s closed the connection; reconnecting", self.endpoint)
            self._disconnect()

    def _write(self, ticket: KVTicket, *parts) -> None:
        """Writes `parts`, frames of `ticket`'s transfer, connecting first if need be (a
        connection that must open with a proof makes it with `ticket`: nccl.py)."""
        if self.sock is None:
            self._connect(ticket)
        for part in parts:
            self.sock.sendall(part)

    def _connect(self, ticket: KVTicket) -> None:
        self.sock = dial(self.endpoint, self.sender.connect_timeout, self.sender.tls)
        self.sock.settimeout(60.0)

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
