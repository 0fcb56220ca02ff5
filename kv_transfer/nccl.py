"""The `nccl` connector: the TCP connector's frames for control, the KV bytes over a two-rank
process group per (prefill node, decode node) pair (kv_transfer/pair.py): NCCL between GPUs,
gloo between CPU processes (the same code, so CI runs it).

A sender's connection to a receiver starts with a PAIR frame; both ends then join the pair's
process group. Each layer goes as a KV frame header on the socket (shape, dtype, layer; no
payload checksum: NCCL/gloo carry their own integrity) followed by two sends on the group, K
then V. The receiver reads the header, checks it against the ticket, and receives K and V
straight into the reserved blocks when they are one run of consecutive ids, else into a
staging tensor it scatters from. On CUDA nothing waits on the CPU until DONE: the receives and
scatters are ordered on the pair's stream, and a completion thread settles the transfer
once they have run, or fails it at the ticket's deadline.

Who frees what is as for `tcp` (kv_transfer/connector.py). A pair that timed out or whose
connection broke is aborted and forgotten; the next transfer makes a new one.
"""

from __future__ import annotations

import logging
import time

import torch

from .connector import KVTicket, TransferResult
from .frame import HEADER_SIZE, FrameHeader, FrameType, done_frame, pair_frame, summary_checksum
from .pair import Completions, ProcessGroupPair
from .tcp import TORCH_DTYPES
from .tcp_sender import TcpKVSender, _Channel, _Outgoing

log = logging.getLogger(__name__)


class NcclKVSender(TcpKVSender):
    """Prefill side. `device`: where the engine's KV cache lives (cuda:N, or cpu for gloo).
    `connect_timeout`: for the socket and for the peer to join the group; `transfer_timeout`:
    from a transfer's DONE until its bytes have left."""

    def __init__(self, device: torch.device | str, connect_timeout: float = 5.0,
                 transfer_timeout: float = 30.0):
        super().__init__(connect_timeout)
        self.device = torch.device(device)
        self.transfer_timeout = transfer_timeout

    def send_layer(self, ticket: KVTicket, layer: int, kv: torch.Tensor) -> None:
        assert kv.device == self.device, (kv.device, self.device)
        super().send_layer(ticket, layer, kv)

    def _new_channel(self, endpoint: str) -> _Channel:
        return _PairChannel(self, endpoint)

    @staticmethod
    def _stage(kv: torch.Tensor):
        """`kv` stays where it is; on CUDA an event marks when the copy that made it is done."""
        if kv.device.type != "cuda":
            return kv.contiguous(), None
        event = torch.cuda.Event()
        event.record()
        return kv.contiguous(), event


class _PairChannel(_Channel):
    """One receiver: the socket for frames and the process group for the bytes."""

    def __init__(self, sender: NcclKVSender, endpoint: str):
        self.pair: ProcessGroupPair | None = None
        self.completions = Completions(f"kv-pair-sent-{endpoint}")
        self.broken = False  # set by the completion thread when the pair timed out
        super().__init__(sender, endpoint)

    def _run(self) -> None:
        super()._run()
        self.completions.close()

    def _connect(self) -> None:
        super()._connect()
        offer, store = ProcessGroupPair.offer(self.sock.getsockname()[0], self.sender.device)
        self.sock.sendall(pair_frame(offer.pack()))
        self.pair = ProcessGroupPair.create(offer, 0, self.sender.device, self.sender.transfer_timeout,
                                            store=store)
        log.info("kv pair with %s: %s group up", self.endpoint, offer.backend)

    def _write(self, *parts) -> None:
        if self.broken:  # a transfer timed out on this pair: every frame goes on a new one
            self._disconnect()
        super()._write(*parts)

    def _send_layer(self, out: _Outgoing, layer: int, staged: torch.Tensor, ready) -> None:
        header = FrameHeader(FrameType.KV, out.ticket.transfer_key, layer, out.ticket.dtype,
                             tuple(staged.shape), out.ticket.layer_bytes).pack()
        self._write(header)
        works = [self.pair.send(staged[0], after=ready), self.pair.send(staged[1])]
        for work in works:
            self.pair.settle(work)  # gloo: the bytes have left; NCCL: ordered on the pair's stream
        out.layer_checksums[layer] = 0
        out.num_bytes += HEADER_SIZE + out.ticket.layer_bytes
        out.first_layer_at = out.first_layer_at or time.monotonic()
        out.staged.append(staged)  # alive until the group is done with it

    def _send_done(self, out: _Outgoing, first_token_id: int) -> None:
        if out.error is not None or self.pair is None:
            return self._settle(out)
        checksums = [0] * out.ticket.num_layers
        frame = done_frame(out.ticket.transfer_key, first_token_id, len(out.layer_checksums),
                           summary_checksum(checksums))
        self._write(frame)
        out.num_bytes += len(frame)
        done_at = time.monotonic()
        deadline = done_at + self.sender.transfer_timeout
        self.completions.add(self.pair.done_event(), deadline, lambda error: self._sent(out, error, done_at))

    def _sent(self, out: _Outgoing, error: BaseException | None, done_at: float) -> None:
        """Completion thread: every byte of `out` has left, or the peer stopped taking them."""
        log.debug("kv transfer %s: layers queued over %.1f ms, then the bytes left %.1f ms after DONE",
                  out.ticket.transfer_id, 1e3 * (done_at - (out.first_layer_at or done_at)),
                  1e3 * (time.monotonic() - done_at))
        if error is not None:
            self.broken = True  # the channel thread aborts the pair before its next frame
            out.error = ConnectionError(f"kv pair with {self.endpoint}: {error}")
        out.staged.clear()
        self._settle(out)

    def _disconnect(self) -> None:
        if self.pair is not None:
            self.pair.close()
            self.pair = None
        self.broken = False
        super()._disconnect()


class PairPayloads:
    """Receiver side of one pair connection: takes KV payloads off the process group."""

    def __init__(self, pair: ProcessGroupPair, receiver, conn):
        self.pair, self.receiver, self.conn = pair, receiver, conn
        self.completions = Completions("kv-pair-landed") if pair.stream is not None else None

    @classmethod
    def join(cls, offer, receiver, conn) -> "PairPayloads":
        pair = ProcessGroupPair.create(offer, 1, receiver.device, receiver.pair_timeout)
        log.info("kv pair from %s: %s group up", conn.addr, offer.backend)
        return cls(pair, receiver, conn)

    def recv_layer(self, incoming, header: FrameHeader) -> None:
        """K then V of one layer, into the reserved blocks."""
        ids, runs = incoming.block_ids, incoming.runs
        for cache in self.receiver.kv_caches[header.layer]:
            if len(runs) == 1 and cache.is_contiguous():  # one run: no staging, no scatter
                self.pair.settle(self.pair.recv(cache[runs[0][0]:runs[0][1]]))
                continue
            staging = torch.empty((len(ids), *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            self.pair.settle(self.pair.recv(staging))
            with self.pair.stream_context():
                cache.index_copy_(0, ids, staging)
        incoming.layer_checksums[header.layer] = header.payload_checksum
        incoming.num_bytes += HEADER_SIZE + header.num_bytes

    def discard(self, header: FrameHeader) -> None:
        """A layer of a transfer nobody expects any more: taken off the group and dropped."""
        for _ in range(2):
            scratch = torch.empty(header.shape[1:], dtype=TORCH_DTYPES[header.dtype],
                                  device=self.receiver.device)
            self.pair.settle(self.pair.recv(scratch))

    def settle_when_landed(self, incoming, result: TransferResult) -> None:
        event = self.pair.done_event()
        if event is None:
            return self.receiver._settle(incoming, result)
        deadline = time.monotonic() + max(0.0, incoming.ticket.deadline - time.time())

        def landed(error: BaseException | None) -> None:
            if error is None:
                return self.receiver._settle(incoming, result)
            self.receiver._fail(incoming, f"kv pair with {self.conn.addr}: {error}")
            self.conn.shutdown()  # the pair is stuck: its reader closes it

        self.completions.add(event, deadline, landed)

    def close(self) -> None:
        if self.completions is not None:
            self.completions.close()
        self.pair.close()
