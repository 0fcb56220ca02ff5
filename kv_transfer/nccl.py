"""The `nccl` connector: the TCP connector's frames for control, the KV bytes over a two-rank
process group per (prefill node, decode node) pair (kv_transfer/pair.py): NCCL between GPUs,
gloo between CPU processes (the same code, so CI runs it).

A sender's connection to a receiver starts with a PAIR frame; both ends then join the pair's
process group. Layers go in groups: whatever layers are queued when the sender's thread gets
to them (one, as a prefill hands them over; many, from several transfers or a prefill that
outran the wire), up to GROUP_BYTES. A group is a GROUP frame with one KV frame header per
layer on the socket (shape, dtype, layer; no payload checksum: NCCL/gloo carry their own
integrity), then all its bytes in one send on the process group, concatenated on the pair's
stream: one handshake and one Python round per group, not per tensor. The receiver reads the
headers, checks each against its ticket, receives the group into a staging buffer, and copies
each layer's K and V into the reserved blocks (one batched copy for the layers whose blocks
are one run of ids, a scatter for the others). On CUDA nothing waits on the CPU until DONE:
the receives and copies are ordered on the pair's stream, and a completion thread settles the
transfer once they have run, or fails it at the ticket's deadline.

Who frees what is as for `tcp` (kv_transfer/connector.py). A pair that timed out or whose
connection broke is aborted and forgotten; the next transfer makes a new one.
"""

from __future__ import annotations

import logging
import time

import torch

from .connector import KVTicket, TransferResult
from .frame import (HEADER_SIZE, MAX_GROUP, FrameError, FrameHeader, FrameType, done_frame, group_frame,
                    pair_frame, summary_checksum)
from .pair import Completions, ProcessGroupPair
from .tcp import TORCH_DTYPES
from .tcp_sender import TcpKVSender, _Channel, _Outgoing

log = logging.getLogger(__name__)

GROUP_BYTES = 128 << 20  # KV bytes in one group (or one layer if larger): the receiver stages them


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

    max_batch = MAX_GROUP
    max_batch_bytes = GROUP_BYTES

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

    def _send_layers(self, layers: list[tuple]) -> None:
        """One GROUP frame with the layers' KV headers, then their bytes as one send: a lone
        layer as it is, several concatenated (one device copy, not a process-group op per
        tensor)."""
        if not layers:
            return
        if any(out.num_bytes == 0 for out, *_ in layers):  # a transfer's first frame
            self._drop_if_closed()
        headers = [FrameHeader(FrameType.KV, out.ticket.transfer_key, layer, out.ticket.dtype,
                               tuple(staged.shape), out.ticket.layer_bytes).pack()
                   for out, layer, staged, _ in layers]
        self._write(group_frame(len(layers)) + b"".join(headers))
        with self.pair.stream_context():
            for *_, ready in layers:
                if ready is not None:
                    self.pair.stream.wait_event(ready)
            chunks = [staged.view(-1).view(torch.uint8) for _, _, staged, _ in layers]
            flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # [group bytes]
        self.pair.send_many([flat])
        now = time.monotonic()
        for out, layer, staged, _ in layers:
            out.layer_checksums[layer] = 0
            out.num_bytes += HEADER_SIZE + out.ticket.layer_bytes
            out.first_layer_at = out.first_layer_at or now
            out.staged += [staged, flat]  # alive until the pair's stream is past the send

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

    def recv_group(self, entries: list[tuple]) -> None:
        """The bytes of one GROUP (or of a lone KV header) in one receive, then K and V of each
        layer into the reserved blocks: one batched copy for the layers whose blocks are one
        run of ids, a scatter for the others. `entries`: (incoming, header) each; incoming None
        is a transfer nobody expects any more, whose bytes are dropped."""
        sizes = [header.num_bytes for _, header in entries]
        if sum(sizes) > max(GROUP_BYTES, self.receiver.max_frame_bytes):
            raise FrameError(f"a group of {sum(sizes)} bytes")
        with self.pair.stream_context():  # staging is the group stream's: reused in its order
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.receiver.device)
        self.pair.recv_many([flat])
        with self.pair.stream_context():
            runs_to, runs_from = [], []
            for (incoming, header), chunk in zip(entries, flat.split(sizes)):
                if incoming is None:
                    continue
                kv = chunk.view(TORCH_DTYPES[header.dtype]).view(header.shape)  # [2, num_blocks, ...]
                runs = incoming.runs
                for cache, part in zip(self.receiver.kv_caches[header.layer], kv):
                    if len(runs) == 1:
                        runs_to.append(cache[runs[0][0]:runs[0][1]])
                        runs_from.append(part)
                    else:
                        cache.index_copy_(0, incoming.block_ids, part)
            if runs_to:
                torch._foreach_copy_(runs_to, runs_from)
        for incoming, header in entries:
            if incoming is not None:
                incoming.layer_checksums[header.layer] = header.payload_checksum
                incoming.num_bytes += HEADER_SIZE + header.num_bytes

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
