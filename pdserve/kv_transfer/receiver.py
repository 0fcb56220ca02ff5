"""The decode node's KV receiver, for both connectors: it listens on a TCP port, reads each
sender's frames (frame.py), checks every one against the ticket it names before a byte of
payload reaches a block, and settles each ticket exactly once.

How a connection's payloads reach the blocks is its `Payloads` (the connector's half):
`TcpPayloads` (tcp.py) reads a KV frame's bytes off the socket; a connection that opens with a
PAIR frame switches to `PairPayloads` (nccl_receiver.py), whose layers come over the pair's
process group, announced by GROUP frames. Both land on a stream of the receiver's own and
settle a transfer only once its copies have run, so the decode node admits a request only
when its KV is in the blocks and its decode steps never wait for a landing. The `ipc`
connector's sender on this host writes the blocks itself (`ipc_descriptor`, shared_pool.py):
it CLAIMs a transfer, which is GRANTed while the ticket is live, and its LANDED settles it; who
may free such blocks is claims.py's business (`forget` takes a `then`).

Who may write (kv_transfer/proof.py): a frame that names a transfer must carry the tag of
that ticket's secret; the receiver checks it before it reads the payload or allocates a byte
for it. A connection's first frame must be proven so (a frame for an unknown transfer there
closes it), and a connection with no proven frame `proof_timeout` after it opened is closed;
at most `max_connections` are open at once. A proven connection's frames for transfers nobody
expects any more (cancelled meanwhile) are read past in small pieces, into nothing new.

Timeouts, in one place (`_watch`): a ticket whose first bytes have not come by its deadline
(the reservation's: the prefill may queue that long) fails, and so does a transfer not done
`transfer_timeout` after its first bytes came. When a connection ends, the transfers that had
frames on it and have not settled fail at once (their sender cannot finish them).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import torch

from pdserve.engine.kv_pool import pool_rows

from .claims import Claims
from .completions import Completions
from .connector import KVReceiver, KVTicket, TransferResult
from .frame import (DONE, GROUP_ENTRY, HEADER_SIZE, FrameError, FrameHeader, FrameType, GroupEntry, checksum,
                    summary_checksum)
from .incoming import Connection, Incoming, check_frame, layer_error
from .ipc_receiver import IpcFrames
from .nccl_receiver import PairPayloads
from .pair import MAX_OFFER_BYTES, PairOffer
from .shared_pool import TORCH_DTYPES, describe
from .sockets import await_readable, recv_exact, tune_socket
from .tcp import TcpPayloads
from .tickets import Tickets

log = logging.getLogger(__name__)

# a pair connection's reader polls its socket for this long after each frame, and after a
# BEGIN, instead of sleeping in recv: the frames of a run of layers come within milliseconds of
# each other (a prefill's layers), and a wake-up from a sleep comes late (sockets.py
# `await_readable`)
WATCH_S = 20e-3
POLL_S = 20e-6  # the watch's look at the socket
WATCHDOG_S = 0.1  # how often `_watch` looks for transfers past their time
DISCARD_BYTES = 256 << 10  # a dropped payload is read through a buffer this big, shared by all


class KVSocketReceiver(KVReceiver):
    """Listens on `host:port` (port 0: any free one) and writes transfers into `kv_caches`, a
    list of (k_cache, v_cache) per layer, each [num_blocks, block_size, num_kv_heads, head_dim].
    `transfer_timeout`: seconds a transfer may take from its first bytes to its last landing;
    `pair_timeout`: joining a pair's process group (nccl); `proof_timeout`: how long a connection
    may stay open without a proven frame; `max_connections`: open connections at most; `tls`:
    every connection speaks TLS (its handshake within `proof_timeout`); `ipc`: offer senders on
    this host the pool to write in place (`ipc_descriptor`; a CPU pool must lie in a memfd)."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None, in_place: bool | None = None,
                 pair_timeout: float = 30.0, transfer_timeout: float = 30.0, proof_timeout: float = 10.0,
                 max_connections: int = 256, tls: ssl.SSLContext | None = None, ipc: bool = False):
        self.kv_caches = kv_caches
        self.pair_timeout = pair_timeout
        self.transfer_timeout = transfer_timeout
        self.proof_timeout = proof_timeout
        self.max_connections = max_connections
        self.tls = tls
        self.device = kv_caches[0][0].device
        # host caches take payloads straight from the socket; device caches via pinned staging
        self.in_place = self.device.type == "cpu" if in_place is None else in_place
        # a frame for an unknown transfer is read past only up to one whole layer of the cache
        self.max_frame_bytes = 2 * kv_caches[0][0].nbytes
        self._discard = memoryview(bytearray(DISCARD_BYTES))  # what it is read into: bytes nobody reads
        self.pool_rows = pool_rows(kv_caches)  # one row per block of K or V; the nccl connector needs it
        # what `ipc` tickets carry: the pool, for a sender on this host to open (b"": none can)
        self.ipc_descriptor = describe(self.pool_rows) if ipc and self.pool_rows is not None else b""
        self.claims = Claims(transfer_timeout)  # transfers written in place, and what waits for them
        self.ipc_frames = IpcFrames(self)
        cuda = self.device.type == "cuda"
        # landings run here, never on the stream the decode steps run on
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.completions = Completions("kv-landed") if cuda else None  # settles landed transfers
        self._server = socket.create_server((host, port))
        self.port = self._server.getsockname()[1]
        self.endpoint = f"{advertise_host or host}:{self.port}"
        self._tickets = Tickets()  # expected, and the secrets of those just ended
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.num_bytes_received = 0
        self.num_failed = 0
        self.num_bad_connections = 0
        self.num_refused_connections = 0  # over `max_connections`
        threading.Thread(target=self._accept, name="kv-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="kv-watchdog", daemon=True).start()

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
        incoming = Incoming(ticket, on_done, self.device, cache.shape[0])
        if ticket.connector == "nccl":  # made now, not when its first group is on the wire
            incoming.device_slots  # noqa: B018
        with self._lock:
            self._tickets.add(incoming)

    def forget(self, transfer_id: str, then: Callable[[], None] | None = None) -> None:
        """Over a process group, a transfer forgotten midway may leave a receive that never
        completes on its pair; the pair's connection is closed (the sender makes a new one).
        `then()` (the blocks' free) runs once no sender may write them any more: at once, or
        for a transfer written in place, when its claim ends (claims.py), on a receiver thread."""
        key = bytes.fromhex(transfer_id)
        with self._lock:
            midway = self._tickets.end(key) is not None
            stuck = [c for c in self._connections if midway and c.pair is not None and key in c.transfers]
        for conn in stuck:
            log.warning("kv transfer %s forgotten midway: closing its pair with %s", transfer_id, conn.addr)
            conn.shutdown()
        self.claims.after(key, then)

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
        if self.completions is not None:
            self.completions.close()

    # ---- what the payload paths call ----------------------------------------------------

    def admit(self, conn: Connection, header: FrameHeader) -> Incoming | None:
        """The transfer a KV, DONE or ABORT frame belongs to, proven and checked against its
        ticket, or None when nobody expects it any more (its payload is dropped). Raises
        FrameError on a frame that is not proven or does not match its ticket: the stream cannot
        be trusted, so the connection closes (a frame not proven fails no transfer: whoever sent
        it holds none)."""
        incoming = self.proven(conn, header)
        if incoming is None:
            return None
        try:
            check_frame(incoming, header)
        except FrameError as e:
            self.fail(incoming, str(e))
            raise
        with self._lock:
            self._track(conn, [incoming])
        return incoming

    def proven(self, conn: Connection, header: FrameHeader) -> Incoming | None:
        """The live transfer `header` names, once its tag proves the ticket's secret; None for
        a transfer nobody expects on a connection proven before. Raises FrameError otherwise."""
        with self._lock:
            incoming = self._tickets.get(header.transfer_id)
            ended_secret = self._tickets.ended_secret(header.transfer_id) if incoming is None else None
        if incoming is None:
            if ended_secret is not None and header.proven_by(ended_secret):
                conn.proven = True  # it holds a ticket of ours that ended just now
            if not conn.proven:
                raise FrameError(f"{header.type.name} frame for an unknown transfer before any proven frame")
            if header.num_bytes > self.max_frame_bytes:
                raise FrameError(f"frame of {header.num_bytes} bytes for an unknown transfer")
            return None
        if not header.proven_by(incoming.ticket.secret):
            raise FrameError(f"{header.type.name} frame not proven for transfer {incoming.ticket.transfer_id}")
        conn.proven = True
        return incoming

    def admit_entries(self, conn: Connection, entries: list[GroupEntry]) -> list[Incoming | None]:
        """The transfer of each GROUP entry (no dtype or shape: they are the ticket's), proven
        and checked against its ticket and counted at once, so the same layer twice, even in one
        group, is refused; None where nobody expects the transfer any more (its bytes are
        dropped). Raises FrameError on an entry not proven (the connection closes), or that does
        not fit its ticket (which fails). One lock for the whole group: a group may carry a layer
        of each of many transfers."""
        with self._lock:
            found = [self._tickets.get(entry.transfer_id) for entry in entries]
        for entry, incoming in zip(entries, found):
            if incoming is not None and not entry.proven_by(incoming.ticket.secret):
                raise FrameError(f"GROUP entry not proven for transfer {incoming.ticket.transfer_id}")
        with self._lock:
            self._track(conn, [incoming for incoming in found if incoming is not None])
        for (_, layer, num_bytes, _), incoming in zip(entries, found):
            if incoming is None:  # its bytes are in the group's receive already (sized by the caller)
                continue
            error = layer_error(incoming, layer, num_bytes)
            if error is not None:
                self.fail(incoming, error)
                raise FrameError(error)
            incoming.layer_checksums[layer] = 0
            incoming.num_bytes += GROUP_ENTRY.size + num_bytes
        return found

    def fail(self, incoming: Incoming, reason: str, timed_out: bool = False) -> None:
        self.num_failed += 1
        log.warning("kv transfer %s failed: %s", incoming.ticket.transfer_id, reason)
        self.settle(incoming, TransferResult(incoming.ticket.transfer_id, False, error=reason,
                                             num_bytes=incoming.num_bytes, timed_out=timed_out))

    def settle(self, incoming: Incoming, result: TransferResult) -> None:
        """Calls the ticket back, once: whoever settles first wins."""
        with self._lock:
            if self._tickets.end(incoming.ticket.transfer_key) is None:
                return  # settled or forgotten meanwhile: nobody waits for it
            self.num_bytes_received += incoming.num_bytes
        incoming.on_done(result)

    def settle_when_copied(self, stream, incoming: Incoming, result: TransferResult, on_late=None) -> None:
        """Settles `incoming` once the work queued so far on CUDA `stream` (its copies into the
        blocks) has run; at once without a stream (host caches). Copies not done by the
        transfer's landing deadline fail it, and `on_late()` runs."""
        if stream is None:
            return self.settle(incoming, result)

        def landed(error: BaseException | None) -> None:
            if error is None:
                return self.settle(incoming, result)
            self.fail(incoming, f"its copies into the blocks did not finish: {error}", timed_out=True)
            if on_late is not None:
                on_late()

        deadline = (incoming.started_at or time.monotonic()) + self.transfer_timeout
        self.completions.add(stream.record_event(), deadline, landed)

    # ---- threads ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._server.accept()
            except OSError:
                return
            if self.num_connections >= self.max_connections:
                self.num_refused_connections += 1
                log.warning("kv receiver: refusing a connection from %s: %d open already", addr, self.max_connections)
                sock.close()
                continue
            tune_socket(sock)
            if self.tls is not None:  # the handshake is the connection's thread's (`_serve`)
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = Connection(sock, addr)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"kv-recv-{addr[1]}", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        """Reads frames until the peer closes. Transfers that had frames on this connection
        and have not settled fail when it ends: the sender cannot finish them any more."""
        conn.payloads = TcpPayloads(self, conn)  # this thread's current stream: the copy stream
        try:
            conn.handshake(self.proof_timeout)
            while True:
                if conn.pair is not None:  # a run of layers may be coming: look, do not sleep
                    await_readable(conn.sock, conn.watch_until, POLL_S)
                head = recv_exact(conn.sock, memoryview(bytearray(HEADER_SIZE)))
                if head is None:
                    return  # clean close between frames
                self._on_frame(conn, FrameHeader.unpack(bytes(head)))
                conn.watch_until = time.monotonic() + WATCH_S
        except (FrameError, ConnectionError, OSError, RuntimeError, ValueError) as e:
            self.num_bad_connections += 1
            log.warning("kv receiver: closing connection from %s: %s", conn.addr, e)
        finally:
            with self._lock:
                broken = [i for i in map(self._tickets.get, conn.transfers) if i is not None]
            for incoming in broken:
                self.fail(incoming, f"the sender's connection {conn.addr} closed mid-transfer")
            self.claims.closed(conn)
            conn.close()
            with self._lock:  # only once closed: a sender that saw it gone reconnects, never reuses it
                self._connections.discard(conn)

    def _on_frame(self, conn: Connection, header: FrameHeader) -> None:
        kind = header.type
        if kind is FrameType.PAIR:
            return self._open_pair(conn, header)
        if kind is FrameType.GROUP:
            return conn.payloads.on_group(header)
        if kind is FrameType.BEGIN:  # the watch on the connection starts: all it asks
            if conn.pair is None or header.num_bytes:
                raise FrameError("unexpected BEGIN frame")
            return
        if kind is FrameType.CLAIM:
            return self.ipc_frames.on_claim(conn, header)
        if kind in (FrameType.LANDED, FrameType.ABORT):
            self.ipc_frames.end_claim(conn, header)
        incoming = self.admit(conn, header)
        if incoming is None:  # cancelled or expired: read past it
            return self._read_past(conn, header.num_bytes)
        if kind is FrameType.KV:
            return conn.payloads.on_layer(incoming, header)
        payload = recv_exact(conn.sock, memoryview(bytearray(header.num_bytes)), eof_ok=False)  # _check: small
        incoming.num_bytes += HEADER_SIZE + header.num_bytes
        if checksum(payload) != header.payload_checksum:
            self.fail(incoming, f"checksum mismatch in {kind.name} frame")
        elif kind is FrameType.DONE:
            self._finish(incoming, payload, conn)
        elif kind is FrameType.LANDED:
            self.ipc_frames.on_landed(incoming, payload, conn)
        else:
            self.fail(incoming, "the sender aborted the transfer")

    def _read_past(self, conn: Connection, num_bytes: int) -> None:
        for start in range(0, num_bytes, DISCARD_BYTES):
            recv_exact(conn.sock, self._discard[:min(DISCARD_BYTES, num_bytes - start)], eof_ok=False)

    def _open_pair(self, conn: Connection, header: FrameHeader) -> None:
        """A PAIR frame, proven by the ticket of a live transfer or one that ended just now (a
        sender reconnects with the first item it had queued; refused, it would wait for a peer
        that never joins): this connection's KV payloads come over a process group from now on."""
        if conn.pair is not None or not 0 < header.num_bytes <= MAX_OFFER_BYTES:
            raise FrameError("unexpected PAIR frame")
        self.proven(conn, header)
        payload = recv_exact(conn.sock, memoryview(bytearray(header.num_bytes)), eof_ok=False)
        if checksum(payload) != header.payload_checksum:
            raise FrameError("checksum mismatch in PAIR frame")
        conn.payloads.close()
        conn.payloads = PairPayloads.join(PairOffer.unpack(payload), self, conn)

    def _finish(self, incoming: Incoming, payload: memoryview, conn: Connection) -> None:
        first_token_id, num_layers, summary = DONE.unpack(payload)
        ticket = incoming.ticket
        checksums = [incoming.layer_checksums.get(i, 0) for i in range(ticket.num_layers)]
        if num_layers != ticket.num_layers or len(incoming.layer_checksums) != ticket.num_layers:
            return self.fail(incoming, f"{len(incoming.layer_checksums)} of {ticket.num_layers} layers arrived")
        if summary != summary_checksum(checksums):
            return self.fail(incoming, "checksum summary mismatch")
        result = TransferResult(ticket.transfer_id, True, first_token_id, num_bytes=incoming.num_bytes)
        conn.payloads.settle_when_landed(incoming, result)  # the layers may still be on their way

    def track(self, conn: Connection, incomings: list[Incoming]) -> None:
        """`_track`, taking the lock."""
        with self._lock:
            self._track(conn, incomings)

    def _track(self, conn: Connection, incomings: list[Incoming]) -> None:
        """Notes that these transfers have frames on `conn` (they fail if it breaks) and when
        each began. With the lock held."""
        if len(conn.transfers) > 1024:  # keep only the transfers still expected
            conn.transfers &= self._tickets.live.keys()
        now = time.monotonic()
        for incoming in incomings:
            if incoming.started_at is None:
                incoming.started_at, incoming.conn = now, conn
            conn.transfers.add(incoming.ticket.transfer_key)

    def _watch(self) -> None:
        """Fails the tickets whose bytes have not begun by their deadline, and the transfers
        not landed `transfer_timeout` after their first bytes; a pair connection carrying one
        of those is closed (a receive on it may never complete)."""
        while not self._closed:
            time.sleep(WATCHDOG_S)
            now = time.monotonic()
            with self._lock:
                late = self._tickets.late(self.transfer_timeout)
                unproven = [c for c in self._connections if not c.proven and now > c.opened_at + self.proof_timeout]
            for conn in unproven:
                log.warning("kv receiver: closing %s: no proven frame %.0fs after it opened", conn.addr,
                            self.proof_timeout)
                conn.shutdown()
            self.claims.expire()
            for incoming in late:
                if incoming.started_at is None:
                    self.fail(incoming, "no KV arrived before the reservation's deadline", timed_out=True)
                    continue
                self.fail(incoming, f"not landed {self.transfer_timeout:.0f}s after its first bytes", timed_out=True)
                if incoming.conn is not None and incoming.conn.pair is not None:
                    incoming.conn.shutdown()

