"""The `tcp` connector: frames (kv_transfer/frame.py) over plain TCP, one connection per
(prefill node, decode node) pair, a sender thread per destination and a receiver thread per
connection. Payloads go straight from a host staging buffer into the socket and from the
socket into a reused buffer, then into the reserved blocks with one index_copy per layer.

`TcpKVReceiver` is also the `nccl` connector's receiver: a connection that opens with a PAIR
frame gets its payloads over a process group instead (kv_transfer/nccl.py), so one decode
node serves senders of both connectors. When a connection ends, the transfers that had frames
on it and have not settled fail at once (their sender cannot finish them).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from pdserve.engine.host_copy import stream_event, to_device
from pdserve.engine.kv_pool import kv_slots, pool_rows

from .connector import KVReceiver, KVTicket, TransferResult
from .frame import (DONE, GROUP_ENTRY, HEADER_SIZE, MAX_GROUP, FrameError, FrameHeader, FrameType, checksum,
                    group_entries, summary_checksum)
from .pair import MAX_OFFER_BYTES, POLL_S, PairOffer, tight_timer_slack
from .sockets import await_readable, recv_checksummed, recv_exact, tune_socket

log = logging.getLogger(__name__)

# a pair connection's reader polls its socket (every POLL_S) for this long after each frame,
# and after a BEGIN, instead of sleeping in recv: the frames of a run of layers come within
# milliseconds of each other (a prefill's layers), and a wake-up from a sleep comes late
# (sockets.py `await_readable`)
WATCH_S = 20e-3

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Incoming:
    """A ticket being received. Its blocks' addresses are made on first use, in the form that
    the path carrying it needs (a transfer takes one of the three), not for every request."""

    ticket: KVTicket
    on_done: Callable[[TransferResult], None]
    device: torch.device  # the cache's
    num_blocks: int  # the cache's
    layer_checksums: dict[int, int] = field(default_factory=dict)
    num_bytes: int = 0

    @cached_property
    def block_ids(self) -> torch.Tensor:
        """On the cache's device: tcp frames into device caches (`_write_layer`)."""
        return to_device(self.ticket.block_ids, torch.int64, self.device)  # torch.tensor would wait for the device

    @cached_property
    def runs(self) -> list[tuple[int, int]]:
        """The block ids as [start, end) runs of consecutive ids: tcp frames into host caches."""
        return _runs(self.ticket.block_ids)

    @cached_property
    def slots(self) -> np.ndarray:
        """[2 * num_blocks] its blocks' slots, K's then V's, a layer's pool rows (kv_pool.py):
        the nccl connector's groups (made at `expect` for its tickets)."""
        return np.array(kv_slots(self.ticket.block_ids, self.num_blocks), dtype=np.int64)

    @cached_property
    def device_slots(self) -> tuple[torch.Tensor, object]:
        """`slots` on the cache's device, and on CUDA an event after their upload (None on CPU):
        the nccl connector's groups, made at `expect` for its tickets, so that the first group
        does not wait for the upload (host time on the first group's path)."""
        slots = to_device(self.slots, torch.int64, self.device)
        return slots, stream_event(self.device) if self.device.type == "cuda" else None


class TcpKVReceiver(KVReceiver):
    """Listens on `host:port` (port 0: any free one) and writes frames into `kv_caches`, a
    list of (k_cache, v_cache) per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None, in_place: bool | None = None,
                 pair_timeout: float = 30.0):
        self.kv_caches = kv_caches
        self.pair_timeout = pair_timeout  # nccl connector: joining a group, one gloo receive
        self.device = kv_caches[0][0].device
        # host caches take payloads straight from the socket; device caches via a host buffer
        self.in_place = self.device.type == "cpu" if in_place is None else in_place
        # a frame for an unknown transfer is discarded only up to one whole layer of the cache
        self.max_frame_bytes = 2 * kv_caches[0][0].nbytes
        self.pool_rows = pool_rows(kv_caches)  # one row per block of K or V; the nccl connector needs it
        self._server = socket.create_server((host, port))
        self.port = self._server.getsockname()[1]
        self.endpoint = f"{advertise_host or host}:{self.port}"
        self._tickets: dict[bytes, _Incoming] = {}
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.num_bytes_received = 0
        self.num_failed = 0
        self.num_bad_connections = 0
        threading.Thread(target=self._accept, name="kv-accept", daemon=True).start()

    def expect(self, ticket: KVTicket, on_done: Callable[[TransferResult], None]) -> None:
        """Raises ValueError for a ticket that does not fit this node's cache."""
        cache = self.kv_caches[0][0]
        if (TORCH_DTYPES[ticket.dtype] != cache.dtype or ticket.layer_shape[2:] != tuple(cache.shape[1:])
                or ticket.num_layers != len(self.kv_caches)):
            raise ValueError(f"ticket of {ticket.num_layers} layers of {ticket.dtype} blocks "
                             f"{ticket.layer_shape[2:]} for a cache of {len(self.kv_caches)} layers of "
                             f"{cache.dtype} blocks {tuple(cache.shape[1:])}")
        if ticket.block_ids and not (min(ticket.block_ids) >= 0 and max(ticket.block_ids) < cache.shape[0]):
            raise ValueError(f"ticket's block ids are outside the cache's {cache.shape[0]} blocks")
        incoming = _Incoming(ticket, on_done, self.device, cache.shape[0])
        if ticket.connector == "nccl":  # made now, not when its first group is on the wire
            incoming.device_slots  # noqa: B018
        with self._lock:
            self._tickets[ticket.transfer_key] = incoming

    def forget(self, transfer_id: str) -> None:
        """Over a process group, a transfer forgotten midway may leave a receive that never
        completes on its pair; the pair's connection is closed (the sender makes a new one)."""
        key = bytes.fromhex(transfer_id)
        with self._lock:
            midway = self._tickets.pop(key, None) is not None
            stuck = [c for c in self._connections if midway and c.pair is not None and key in c.transfers]
        for conn in stuck:
            log.warning("kv transfer %s forgotten midway: closing its pair with %s", transfer_id, conn.addr)
            conn.shutdown()

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def num_pairs(self) -> int:
        """Connections that carry their payloads over a process group."""
        with self._lock:
            return sum(c.pair is not None for c in self._connections)

    def close(self) -> None:
        """Stops listening and ends every connection (their senders see the receiver gone)."""
        self._closed = True
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.shutdown()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._server.accept()
            except OSError:
                return
            tune_socket(sock)
            threading.Thread(target=self._serve, args=(_Connection(sock, addr),),
                             name=f"kv-recv-{addr[1]}", daemon=True).start()

    def _serve(self, conn: "_Connection") -> None:
        """Reads frames until the peer closes. Transfers that had frames on this connection
        and have not settled fail when it ends: the sender cannot finish them any more."""
        with self._lock:
            self._connections.add(conn)
        try:
            while True:
                if conn.pair is not None:  # a run of layers may be coming: look, do not sleep
                    await_readable(conn.sock, conn.watch_until, POLL_S)
                head = recv_exact(conn.sock, memoryview(bytearray(HEADER_SIZE)))
                if head is None:
                    return  # clean close between frames
                header = FrameHeader.unpack(bytes(head))
                if len(conn.buffer) < header.num_bytes <= self.max_frame_bytes:
                    conn.buffer = bytearray(header.num_bytes)
                self._on_frame(conn, header)
                conn.watch_until = time.monotonic() + WATCH_S
        except (FrameError, ConnectionError, OSError, RuntimeError, ValueError) as e:
            self.num_bad_connections += 1
            log.warning("kv receiver: closing connection from %s: %s", conn.addr, e)
        finally:
            with self._lock:
                broken = [self._tickets[k] for k in conn.transfers if k in self._tickets]
            for incoming in broken:
                self._fail(incoming, f"the sender's connection {conn.addr} closed mid-transfer")
            conn.close()
            with self._lock:  # only once closed: a sender that saw it gone reconnects, never reuses it
                self._connections.discard(conn)

    def _on_frame(self, conn: "_Connection", header: FrameHeader) -> None:
        if header.type is FrameType.PAIR:
            return self._open_pair(conn, header)
        if header.type is FrameType.GROUP:
            return self._recv_group(conn, header)
        if header.type is FrameType.BEGIN:  # the watch on the connection starts: all it asks
            if conn.pair is None or header.num_bytes:
                raise FrameError("unexpected BEGIN frame")
            return
        if conn.pair is not None and header.type is FrameType.KV:
            raise FrameError("KV frame on a pair connection (its layers come in GROUP frames)")
        incoming = self._admit(conn, header)
        if incoming is None:  # cancelled or expired: read past it
            recv_exact(conn.sock, memoryview(conn.buffer)[:header.num_bytes], eof_ok=False)
            return
        if header.type is FrameType.KV and self.in_place:
            return self._recv_layer_in_place(conn.sock, incoming, header)
        payload = memoryview(conn.buffer)[:header.num_bytes]
        value = recv_checksummed(conn.sock, payload)
        incoming.num_bytes += HEADER_SIZE + header.num_bytes
        if value != header.payload_checksum:
            self._fail(incoming, f"checksum mismatch in {header.type.name} frame (layer {header.layer})")
        elif header.type is FrameType.KV:
            self._write_layer(incoming, header, conn.buffer)
        elif header.type is FrameType.DONE:
            self._finish(incoming, payload, conn)
        else:
            self._fail(incoming, "the sender aborted the transfer")

    def _admit(self, conn: "_Connection", header: FrameHeader) -> _Incoming | None:
        """The transfer `header` belongs to, checked against its ticket, or None when nobody
        expects it any more (its payload is dropped). Raises FrameError on a frame that does
        not match its ticket: the stream cannot be trusted, so the connection closes."""
        with self._lock:
            incoming = self._tickets.get(header.transfer_id)
        if incoming is None:
            if header.num_bytes > self.max_frame_bytes:
                raise FrameError(f"frame of {header.num_bytes} bytes for an unknown transfer")
            return None
        try:
            self._check(incoming, header)
        except FrameError as e:
            self._fail(incoming, str(e))
            raise
        with self._lock:
            self._track(conn, [header.transfer_id])
        return incoming

    def _track(self, conn: "_Connection", transfer_ids) -> None:
        """Notes that these transfers have frames on `conn` (they fail if it breaks). With the
        lock held."""
        if len(conn.transfers) > 1024:  # keep only the transfers still expected
            conn.transfers &= self._tickets.keys()
        conn.transfers.update(transfer_ids)

    def _recv_group(self, conn: "_Connection", header: FrameHeader) -> None:
        """A GROUP frame (pair connections only): N (transfer, layer, num_bytes) entries, then
        their payloads as one group over the process group (nccl.PairPayloads)."""
        if conn.pair is None or header.num_bytes > MAX_GROUP * GROUP_ENTRY.size:
            raise FrameError("unexpected GROUP frame")
        if len(conn.buffer) < header.num_bytes:  # a cache so small that _serve did not grow it
            conn.buffer = bytearray(header.num_bytes)
        payload = recv_exact(conn.sock, memoryview(conn.buffer)[:header.num_bytes], eof_ok=False)
        conn.payloads.recv_group(group_entries(header, payload))  # entries copy out what they keep

    def _admit_entries(self, conn: "_Connection", entries: list[tuple[bytes, int, int]]) -> list[_Incoming | None]:
        """The transfer of each GROUP entry ((transfer id, layer, num_bytes); no dtype or
        shape: they are the ticket's), checked against its ticket and counted at once, so the
        same layer twice, even in one group, is refused; None where nobody expects the
        transfer any more (its bytes are dropped). Raises FrameError on an entry that does not
        fit its ticket, which fails. One lock for the whole group: a group may carry a layer of
        each of many transfers."""
        with self._lock:
            found = [self._tickets.get(transfer_id) for transfer_id, _, _ in entries]
            self._track(conn, [t for (t, _, _), incoming in zip(entries, found) if incoming is not None])
        for (_, layer, num_bytes), incoming in zip(entries, found):
            if incoming is None:  # its bytes are in the group's receive already (sized by the caller)
                continue
            error = _layer_error(incoming, layer, num_bytes)
            if error is not None:
                self._fail(incoming, error)
                raise FrameError(error)
            incoming.layer_checksums[layer] = 0
            incoming.num_bytes += GROUP_ENTRY.size + num_bytes
        return found

    def _open_pair(self, conn: "_Connection", header: FrameHeader) -> None:
        """A PAIR frame: this connection's KV payloads come over a process group from now on."""
        from .nccl import PairPayloads
        if conn.pair is not None or not 0 < header.num_bytes <= MAX_OFFER_BYTES:
            raise FrameError("unexpected PAIR frame")
        payload = recv_exact(conn.sock, memoryview(bytearray(header.num_bytes)), eof_ok=False)
        if checksum(payload) != header.payload_checksum:
            raise FrameError("checksum mismatch in PAIR frame")
        conn.payloads = PairPayloads.join(PairOffer.unpack(payload), self, conn)
        conn.pair = conn.payloads.pair
        tight_timer_slack()  # this thread's polls (_serve) sleep POLL_S, not POLL_S + 50 us

    def _check(self, incoming: _Incoming, header: FrameHeader) -> None:
        ticket = incoming.ticket
        if header.type is FrameType.KV:
            if header.dtype != ticket.dtype or header.shape != ticket.layer_shape:
                raise FrameError(f"frame {header.dtype} {header.shape} does not match the ticket's "
                                 f"{ticket.dtype} {ticket.layer_shape}")
            error = _layer_error(incoming, header.layer, header.num_bytes)
            if error is not None:
                raise FrameError(error)
        elif header.type is FrameType.DONE and header.num_bytes != DONE.size:
            raise FrameError(f"DONE frame of {header.num_bytes} bytes")
        elif header.type is FrameType.ABORT and header.num_bytes:
            raise FrameError("ABORT frame with a payload")

    def _recv_layer_in_place(self, conn: socket.socket, incoming: _Incoming, header: FrameHeader) -> None:
        """Host caches: the payload goes from the socket straight into the reserved blocks, one
        recv per run of consecutive block ids (K's runs, then V's, the payload's order),
        checksummed as it lands. A bad checksum leaves garbage only in blocks that this
        failed transfer owns, and the decode node frees them."""
        value = 0
        for cache in self.kv_caches[header.layer]:
            rows = cache.view(cache.shape[0], -1).view(torch.uint8).numpy()  # [num_blocks, block bytes]
            for start, end in incoming.runs:
                value = recv_checksummed(conn, memoryview(rows[start:end]).cast("B"), value)
        incoming.num_bytes += HEADER_SIZE + header.num_bytes
        if value != header.payload_checksum:
            return self._fail(incoming, f"checksum mismatch in KV frame (layer {header.layer})")
        incoming.layer_checksums[header.layer] = header.payload_checksum

    def _write_layer(self, incoming: _Incoming, header: FrameHeader, buffer: bytearray) -> None:
        ticket = incoming.ticket
        count = header.num_bytes // torch.empty((), dtype=TORCH_DTYPES[ticket.dtype]).element_size()
        kv = torch.frombuffer(buffer, dtype=TORCH_DTYPES[ticket.dtype], count=count).view(ticket.layer_shape)
        k_cache, v_cache = self.kv_caches[header.layer]
        k_cache.index_copy_(0, incoming.block_ids, kv[0].to(self.device))
        v_cache.index_copy_(0, incoming.block_ids, kv[1].to(self.device))
        incoming.layer_checksums[header.layer] = header.payload_checksum

    def _finish(self, incoming: _Incoming, payload: memoryview, conn: "_Connection") -> None:
        first_token_id, num_layers, summary = DONE.unpack(payload)
        ticket = incoming.ticket
        checksums = [incoming.layer_checksums.get(i, 0) for i in range(ticket.num_layers)]
        if num_layers != ticket.num_layers or len(incoming.layer_checksums) != ticket.num_layers:
            return self._fail(incoming, f"{len(incoming.layer_checksums)} of {ticket.num_layers} layers arrived")
        if summary != summary_checksum(checksums):
            return self._fail(incoming, "checksum summary mismatch")
        result = TransferResult(ticket.transfer_id, True, first_token_id, num_bytes=incoming.num_bytes)
        if conn.pair is not None:  # the layers may still be on their way: settle once they landed
            return conn.payloads.settle_when_landed(incoming, result)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._settle(incoming, result)

    def _fail(self, incoming: _Incoming, reason: str) -> None:
        self.num_failed += 1
        log.warning("kv transfer %s failed: %s", incoming.ticket.transfer_id, reason)
        self._settle(incoming, TransferResult(incoming.ticket.transfer_id, False, error=reason,
                                              num_bytes=incoming.num_bytes))

    def _settle(self, incoming: _Incoming, result: TransferResult) -> None:
        with self._lock:
            if self._tickets.pop(incoming.ticket.transfer_key, None) is None:
                return  # forgotten meanwhile: nobody waits for it
            self.num_bytes_received += incoming.num_bytes
        incoming.on_done(result)


@dataclass(eq=False)
class _Connection:
    """One sender's control connection, and its process group once it sent a PAIR frame."""

    sock: socket.socket
    addr: tuple
    buffer: bytearray = field(default_factory=bytearray)  # reused for payloads read off the socket
    transfers: set[bytes] = field(default_factory=set)  # transfer keys that had frames here
    pair: object | None = None  # ProcessGroupPair
    payloads: object | None = None  # nccl.PairPayloads
    watch_until: float = 0.0  # time.monotonic(): a pair connection's reader polls until then

    def shutdown(self) -> None:
        """Ends the connection from another thread: its reader sees EOF (or its receive on the
        aborted group fails) and cleans up."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.pair is not None:
            self.pair.close()

    def close(self) -> None:
        if self.payloads is not None:
            self.payloads.close()
        self.sock.close()


def _layer_error(incoming: _Incoming, layer: int, num_bytes: int) -> str | None:
    """Why a KV frame or GROUP entry for `layer` does not fit its ticket, or None."""
    ticket = incoming.ticket
    if not 0 <= layer < ticket.num_layers or layer in incoming.layer_checksums:
        return f"unexpected layer {layer}"
    if num_bytes != ticket.layer_bytes:
        return f"frame of {num_bytes} bytes, the ticket expects {ticket.layer_bytes}"
    return None


def _runs(block_ids) -> list[tuple[int, int]]:
    """[3, 4, 5, 9, 10] -> [(3, 6), (9, 11)]."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
