"""The `ipc` connector's sender: where the decode node's KV pool can be opened here (the same
host, and on CUDA the same GPU: shared_pool.py), a transfer's layers are written straight into
its reserved blocks, with no socket, host copy or checksum on the way; anywhere else the same
transfer goes over TCP frames, as the tcp connector sends it (the receiver takes both on one
port).

A transfer written in place, on its channel's thread (frames and writes in queue order):
1. CLAIM, answered on the connection with GRANT (the blocks are this sender's to write until
   it says otherwise) or DENY (nobody expects the transfer any more: it fails, unwritten);
2. each layer: one `index_copy_` of the gathered layer (pusher.py) into its rows of the pool,
   on CUDA on the channel's own stream after the event that marks the layer computed;
3. LANDED (or ABORT) once every write queued on that stream has run: the receiver then admits
   the request (or frees the blocks). The connection is closed only after the same wait, so a
   closed connection also means that its writes are over (claims.py).
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.host_copy import stream_event, to_device, to_host
from pdserve.engine.kv_pool import kv_slots, slot_rows

from .channel import AbortItem, LayerEntry, LayersItem, Outgoing
from .connector import KVTicket, TransferError
from .frame import HEADER_SIZE, FrameHeader, FrameType, bare_frame, done_frame, summary_checksum
from .shared_pool import SharedPools
from .sockets import ClientTls, recv_exact
from .tcp_sender import TcpChannel, TcpKVSender

log = logging.getLogger(__name__)


class IpcKVSender(TcpKVSender):
    """Prefill side. `device`: where the engine's KV cache lives (a pool can be opened only on
    the same device kind; on CUDA the same GPU)."""

    def __init__(self, device: torch.device | str, connect_timeout: float = 5.0, tls: ClientTls | None = None,
                 channel_idle_s: float = 300.0):
        super().__init__(connect_timeout, tls=tls, channel_idle_s=channel_idle_s)
        self.device = torch.device(device)
        self.pools = SharedPools(self.device)
        self.num_in_place = 0  # transfers written in place (LANDED sent)

    def send_layer(self, ticket: KVTicket, layer: int, kv: torch.Tensor) -> None:
        self.send_layers(layer, [(ticket, kv)])

    def send_layers(self, layer: int, items: list[tuple[KVTicket, torch.Tensor]]) -> None:
        """A layer written in place stays on the device (the pusher's gather: a copy), with an
        event after the work that made it; one going over TCP is staged to the host."""
        ready = stream_event(self.device) if self.device.type == "cuda" else None
        by_endpoint: dict[str, list[LayerEntry]] = {}
        for out, (ticket, kv) in zip(self._states([ticket for ticket, _ in items]), items):
            self._check(ticket, kv)
            if out.pool is None:  # the same answer for every layer of a transfer (opened once)
                out.pool = self.pools.open(ticket.kv_endpoint, ticket.ipc)
            entry = LayerEntry(out, layer, kv, ready) if out.pool is not None else LayerEntry(out, layer, *to_host(kv))
            by_endpoint.setdefault(ticket.kv_endpoint, []).append(entry)
        for endpoint, entries in by_endpoint.items():
            self._hand_over(endpoint, LayersItem(entries, sum(e.staged.nbytes for e in entries)))

    def _new_channel(self, endpoint: str) -> "IpcChannel":
        return IpcChannel(self, endpoint)


class IpcChannel(TcpChannel):
    """One receiver: TCP frames for control (and for transfers that go over TCP); the writes
    in place on a stream of this channel's own (CUDA)."""

    def __init__(self, sender: IpcKVSender, endpoint: str):
        self.stream = torch.cuda.Stream(sender.device) if sender.device.type == "cuda" else None
        super().__init__(sender, endpoint)

    def _run(self) -> None:
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)  # this thread's writes and index uploads run on it
        super()._run()

    def send_layers(self, entries: list[LayerEntry]) -> None:
        for entry in entries:
            if entry.out.pool is None:
                self._send_layer(entry)
            elif self._claimed(entry.out):
                self._write_in_place(entry)

    def _claimed(self, out: Outgoing) -> bool:
        """Whether this sender may write `out`'s blocks: asked once (CLAIM), at its first layer."""
        if not out.claimed and out.error is None:
            ticket = out.ticket
            self._write(ticket, bare_frame(FrameType.CLAIM, ticket.transfer_key, ticket.secret))
            reply = FrameHeader.unpack(bytes(recv_exact(self.sock, memoryview(bytearray(HEADER_SIZE)), eof_ok=False)))
            if reply.transfer_id != ticket.transfer_key or reply.type not in (FrameType.GRANT, FrameType.DENY):
                raise ConnectionError(f"unexpected {reply.type.name} frame in answer to a CLAIM")
            if reply.type is FrameType.GRANT and reply.proven_by(ticket.secret):
                out.claimed = True
            else:
                out.error = TransferError("the decode node does not expect this transfer any more")
        return out.claimed and out.error is None

    def _write_in_place(self, entry: LayerEntry) -> None:
        out, pool = entry.out, entry.out.pool
        if not 0 <= entry.layer < out.ticket.num_layers or entry.layer in out.layer_checksums:
            out.error = TransferError(f"layer {entry.layer} is not the ticket's to write")  # ABORT at its DONE
            return
        if out.rows is None:  # every layer's rows at once, on this thread's stream, as the writes that read them
            num_layers, num_blocks = out.ticket.num_layers, pool.shape[0] // (2 * out.ticket.num_layers)
            slots = to_device(kv_slots(out.ticket.block_ids, num_blocks), torch.int64, pool.device)
            out.rows = slot_rows(slots, num_layers, num_blocks)
        if entry.ready is not None:
            self.stream.wait_event(entry.ready)
            entry.staged.record_stream(self.stream)  # made on the engine's stream, read on this one
        with torch.inference_mode():  # the pool was opened, and the layer gathered, under the engine's
            pool.index_copy_(0, out.rows[entry.layer], entry.staged.view(-1, pool.shape[1]))
        out.layer_checksums[entry.layer] = 0
        out.num_bytes += out.ticket.layer_bytes

    def send_done(self, out: Outgoing, first_token_id: int) -> None:
        if out.pool is None:
            return super().send_done(out, first_token_id)
        if out.claimed and not out.future.done():  # (an abort settled it already: its ABORT is out)
            self._wait_for_writes()
            if out.error is None:
                frame = done_frame(out.ticket.transfer_key, first_token_id, len(out.layer_checksums),
                                   summary_checksum([0] * out.ticket.num_layers), out.ticket.secret,
                                   FrameType.LANDED)
                self.sender.num_in_place += 1
            else:  # a DENY cannot follow a GRANT: the claim still stands, and ends here
                frame = bare_frame(FrameType.ABORT, out.ticket.transfer_key, out.ticket.secret)
            self._write(out.ticket, frame)
            out.num_bytes += len(frame)
        self.settle(out)

    def _handle(self, item) -> None:
        if isinstance(item, AbortItem):
            self._wait_for_writes()  # the ABORT frees the blocks on the decode node
        super()._handle(item)

    def _wait_for_writes(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _disconnect(self) -> None:
        self._wait_for_writes()  # a closed connection ends this sender's claims (claims.py)
        self.sender.pools.forget(self.endpoint)  # the node may be gone: its pool is not kept mapped
        super()._disconnect()
