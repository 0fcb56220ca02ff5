"""The `tcp` connector's sender side: one queue and one thread per destination, writing
each transfer's frames in order (see tcp.py for the receiver and the shared helpers)."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.engine.host_copy import to_host

from .connector import KVSender, KVTicket, TransferError
from .frame import HEADER_SIZE, FrameHeader, abort_frame, done_frame, kv_frame, summary_checksum
from .sockets import readable, split_endpoint, tune_socket

log = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    ticket: KVTicket
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    layer_checksums: dict[int, int] = field(default_factory=dict)
    num_bytes: int = 0
    error: BaseException | None = None
    staged: list = field(default_factory=list)  # nccl: tensors the process group still reads
    first_layer_at: float | None = None  # nccl: when its first layer was handed to the group


class TcpKVSender(KVSender):
    """`corrupt_transfers` is a test hook: the first N transfers get one flipped payload byte
    after the checksum is computed, so the receiver must catch them."""

    def __init__(self, connect_timeout: float = 5.0, corrupt_transfers: int = 0):
        self.connect_timeout = connect_timeout
        self.num_corrupt_left = corrupt_transfers
        self._channels: dict[str, _Channel] = {}
        self._outgoing: dict[str, _Outgoing] = {}
        self._lock = threading.Lock()
        self.num_bytes_sent = 0

    def send_layer(self, ticket: KVTicket, layer: int, kv: torch.Tensor) -> None:
        self._check(ticket, kv)
        staged, ready = self._stage(kv)
        self._hand_over(ticket.kv_endpoint, ("kv", [(self._state(ticket), layer, staged, ready)], staged.nbytes))

    def finish(self, ticket: KVTicket, first_token_id: int) -> concurrent.futures.Future:
        out = self._state(ticket)
        self._hand_over(ticket.kv_endpoint, ("done", out, first_token_id))
        return out.future

    def _hand_over(self, endpoint: str, item) -> None:
        """Queues a KV or DONE item for `endpoint`'s channel thread to write."""
        self._channel(endpoint).put(item)

    def abort(self, ticket: KVTicket) -> None:
        with self._lock:
            out = self._outgoing.get(ticket.transfer_id)
        if out is not None:
            out.error = out.error or TransferError("aborted by the sender")
            self._channel(ticket.kv_endpoint).put(("abort", out))

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.stop()

    @staticmethod
    def _check(ticket: KVTicket, kv: torch.Tensor) -> None:
        assert kv.shape == ticket.layer_shape, (tuple(kv.shape), ticket.layer_shape)
        assert str(kv.dtype) == f"torch.{ticket.dtype}", (kv.dtype, ticket.dtype)

    def _state(self, ticket: KVTicket) -> _Outgoing:
        return self._states([ticket])[0]

    def _states(self, tickets: list[KVTicket]) -> list[_Outgoing]:
        """Each ticket's transfer state, made on its first layer; under one lock for all."""
        with self._lock:
            return [self._outgoing.get(t.transfer_id) or self._outgoing.setdefault(t.transfer_id, _Outgoing(t))
                    for t in tickets]

    def _channel(self, endpoint: str) -> "_Channel":
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = self._new_channel(endpoint)
            return channel

    def _new_channel(self, endpoint: str) -> "_Channel":
        return _Channel(self, endpoint)

    def _take_corruption(self) -> bool:
        with self._lock:
            if self.num_corrupt_left > 0:
                self.num_corrupt_left -= 1
                return True
            return False

    def _done(self, out: _Outgoing) -> None:
        with self._lock:
            self._outgoing.pop(out.ticket.transfer_id, None)
            self.num_bytes_sent += out.num_bytes

    _stage = staticmethod(to_host)  # a host copy of kv in stream order, and ready()


class _Channel:
    """One destination: a queue of frames and the thread that writes them in order. A KV item
    ("kv", layers, num_bytes) carries the layers one call handed over, (out, layer, staged,
    ready) each, and their bytes; the layers of items queued back to back are taken up to
    `max_batch` layers and `max_batch_bytes` at a time (the nccl connector sends each batch
    as one group).

    Whoever writes holds `_lock` from taking an item off the queue until its frames are out,
    so frames leave in queue order: this channel's thread, or (nccl) the thread that handed
    the layers over, posting them itself while its connection is up."""

    max_batch = 1
    max_batch_bytes = 0

    def __init__(self, sender: TcpKVSender, endpoint: str):
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

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.put(None)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()  # an item put from now on wakes the next round
            # Polled, not a blocking acquire: a thread blocked on a lock takes it the moment it
            # is released, then waits for the GIL while holding it (up to the 5 ms switch
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
        them over): only KV and DONE items, and only over the connection that is up
        (connecting is this channel's thread's work); the rest stays queued for that thread."""
        while self._items:
            item = self._items[0]
            if caller and (item is None or item[0] == "abort" or not self._connected()):
                return
            if item is None:
                self._stopping = True
                return
            if item[0] == "kv" and any(out.num_bytes == 0 for out, *_ in item[1]):
                self._drop_if_closed()  # a transfer's first frame: is the receiver still there?
                if caller and not self._connected():
                    return
            self._items.popleft()
            self._handle(item)

    def _connected(self) -> bool:
        return self.sock is not None

    def _handle(self, item) -> None:
        kind = item[0]
        layers = self._batch(item) if kind == "kv" else []
        try:
            if kind == "kv":
                self._send_layers([entry for entry in layers if entry[0].error is None])
            elif kind == "done":
                self._send_done(item[1], item[2])
            elif kind == "abort":
                self._write(abort_frame(item[1].ticket.transfer_key))
                self._settle(item[1])
        except Exception as e:  # noqa: BLE001  (whatever broke, the transfers fail; the thread lives)
            self._disconnect()
            outs = [entry[0] for entry in layers] if kind == "kv" else [item[1]]
            for out in {id(out): out for out in outs}.values():  # each transfer once
                log.warning("kv transfer %s to %s: %s", out.ticket.transfer_id, self.endpoint, e)
                out.error = out.error or ConnectionError(f"kv connection to {self.endpoint}: {e}")
                if kind in ("done", "abort"):
                    self._settle(out)

    def _batch(self, first) -> list:
        """The layers of `first` and of the KV items queued right after it, within the batch
        limits (the first layer always: it may pass them alone). Layers past the limits go
        back to the front of the queue as an item of their own, taken next."""
        layers, num_bytes, item = [], 0, first
        while True:
            if len(layers) + len(item[1]) <= self.max_batch and num_bytes + item[2] <= self.max_batch_bytes:
                layers += item[1]  # the whole item fits (the usual case: no look at each layer)
                num_bytes += item[2]
            else:
                for i, entry in enumerate(item[1]):
                    if layers and (len(layers) == self.max_batch or num_bytes + entry[2].nbytes > self.max_batch_bytes):
                        rest = item[1][i:]
                        self._items.appendleft(("kv", rest, sum(entry[2].nbytes for entry in rest)))
                        return layers
                    layers.append(entry)
                    num_bytes += entry[2].nbytes
            if not self._items or self._items[0] is None or self._items[0][0] != "kv":
                return layers
            item = self._items.popleft()

    def _send_layers(self, layers: list[tuple]) -> None:
        """`layers`: (out, layer, staged, ready) each."""
        for entry in layers:
            self._send_layer(*entry)

    def _send_layer(self, out: _Outgoing, layer: int, staged: torch.Tensor, ready) -> None:
        ready()
        payload = staged.view(-1).view(torch.uint8).numpy()
        header = kv_frame(out.ticket.transfer_key, layer, out.ticket.dtype, tuple(staged.shape), payload)
        out.layer_checksums[layer] = FrameHeader.unpack(header).payload_checksum
        if layer == 0 and self.sender._take_corruption():
            payload = payload.copy()
            payload[len(payload) // 2] ^= 0xFF
            log.warning("test hook: corrupting kv transfer %s", out.ticket.transfer_id)
        self._write(header, payload)
        out.num_bytes += HEADER_SIZE + payload.nbytes

    def _send_done(self, out: _Outgoing, first_token_id: int) -> None:
        if out.error is None:
            checksums = [out.layer_checksums.get(i, 0) for i in range(out.ticket.num_layers)]
            frame = done_frame(out.ticket.transfer_key, first_token_id, len(out.layer_checksums),
                               summary_checksum(checksums))
            self._write(frame)
            out.num_bytes += len(frame)
        self._settle(out)

    def _settle(self, out: _Outgoing) -> None:
        self.sender._done(out)
        if out.future.done():
            return
        if out.error is None:
            out.future.set_result(out.num_bytes)
        else:
            out.future.set_exception(out.error)

    def _drop_if_closed(self) -> None:
        """A dead receiver's socket stays writable for a while; the next `_write` reconnects
        (and fails at once if the receiver is gone for good)."""
        if self.sock is not None and _peer_closed(self.sock):
            log.warning("kv receiver %s closed the connection; reconnecting", self.endpoint)
            self._disconnect()

    def _write(self, *parts) -> None:
        if self.sock is None:
            self._connect()
        for part in parts:
            self.sock.sendall(part)

    def _connect(self) -> None:
        host, port = split_endpoint(self.endpoint)
        self.sock = socket.create_connection((host, port), timeout=self.sender.connect_timeout)
        self.sock.settimeout(60.0)
        tune_socket(self.sock)

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _peer_closed(sock: socket.socket) -> bool:
    """The receiver never writes, so a readable socket means it closed (or reset) the connection."""
    return readable(sock)
