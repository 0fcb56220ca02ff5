"""The `tcp` connector's sender: a channel (channel.py) and its thread per destination,
writing each transfer's frames in order: a KV frame per layer (header, then the layer's bytes
from a host copy), then DONE."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import torch

from pdserve.engine.host_copy import to_host

from .channel import AbortItem, DoneItem, FrameChannel, LayerEntry, LayersItem, Outgoing
from .connector import KVSender, KVTicket, TransferError
from .frame import HEADER_SIZE, FrameHeader, done_frame, kv_frame, summary_checksum
from .sockets import ClientTls

log = logging.getLogger(__name__)


class TcpKVSender(KVSender):
    """`tls`: dial receivers over TLS; `channel_idle_s`: a destination's channel (thread and
    connection) is retired after this long with nothing to send. `corrupt_transfers` is a test
    hook: the first N transfers get one flipped payload byte after the checksum is computed, so
    the receiver must catch them."""

    def __init__(self, connect_timeout: float = 5.0, corrupt_transfers: int = 0, tls: ClientTls | None = None,
                 channel_idle_s: float = 300.0):
        self.connect_timeout = connect_timeout
        self.tls = tls
        self.channel_idle_s = channel_idle_s
        self.num_corrupt_left = corrupt_transfers
        self._channels: dict[str, FrameChannel] = {}
        self._outgoing: dict[str, Outgoing] = {}
        self._lock = threading.Lock()
        self.num_bytes_sent = 0

    def send_layer(self, ticket: KVTicket, layer: int, kv: torch.Tensor) -> None:
        self._check(ticket, kv)
        staged, ready = to_host(kv)  # a host copy of kv in stream order, and ready()
        entry = LayerEntry(self._state(ticket), layer, staged, ready)
        self._hand_over(ticket.kv_endpoint, LayersItem([entry], staged.nbytes))

    def finish(self, ticket: KVTicket, first_token_id: int) -> concurrent.futures.Future:
        out = self._state(ticket)
        self._hand_over(ticket.kv_endpoint, DoneItem(out, first_token_id))
        return out.future

    def _hand_over(self, endpoint: str, item) -> None:
        """Queues an item for `endpoint`'s channel thread to write."""
        self._put(endpoint, item)

    def abort(self, ticket: KVTicket) -> None:
        with self._lock:
            out = self._outgoing.get(ticket.transfer_id)
        if out is not None:
            out.error = out.error or TransferError("aborted by the sender")
            self._put(ticket.kv_endpoint, AbortItem(out))

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.stop()

    def finished(self, out: Outgoing) -> None:
        """A channel settled `out`: it is no longer this sender's."""
        with self._lock:
            self._outgoing.pop(out.ticket.transfer_id, None)
            self.num_bytes_sent += out.num_bytes

    def take_corruption(self) -> bool:
        with self._lock:
            if self.num_corrupt_left > 0:
                self.num_corrupt_left -= 1
                return True
            return False

    @staticmethod
    def _check(ticket: KVTicket, kv: torch.Tensor) -> None:
        assert kv.shape == ticket.layer_shape, (tuple(kv.shape), ticket.layer_shape)
        assert str(kv.dtype) == f"torch.{ticket.dtype}", (kv.dtype, ticket.dtype)

    def _state(self, ticket: KVTicket) -> Outgoing:
        return self._states([ticket])[0]

    def _states(self, tickets: list[KVTicket]) -> list[Outgoing]:
        """Each ticket's transfer state, made on its first layer; under one lock for all."""
        with self._lock:
            return [self._outgoing.get(t.transfer_id) or self._outgoing.setdefault(t.transfer_id, Outgoing(t))
                    for t in tickets]

    def _put(self, endpoint: str, item, wake: bool = True) -> FrameChannel:
        """Queues `item` on `endpoint`'s channel (made if need be), under the lock that
        `retire` takes: an item never lands on a channel that is retiring."""
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = self._new_channel(endpoint)
            channel.put(item, wake)
            return channel

    def retire(self, channel: FrameChannel) -> bool:
        """A channel's thread, idle for `channel_idle_s`: whether it may end (it is forgotten
        here if so). Not while it has items queued or a transfer to its endpoint is unsettled."""
        with self._lock:
            busy = channel.has_items() or any(o.ticket.kv_endpoint == channel.endpoint for o in self._outgoing.values())
            if busy or self._channels.get(channel.endpoint) is not channel:
                return False
            del self._channels[channel.endpoint]
            log.info("kv sender: retiring the idle channel to %s", channel.endpoint)
            return True

    def _new_channel(self, endpoint: str) -> FrameChannel:
        return TcpChannel(self, endpoint)


class TcpChannel(FrameChannel):
    """Each layer as a KV frame: its 72-byte header, then its bytes, checksummed."""

    def send_layers(self, entries: list[LayerEntry]) -> None:
        for entry in entries:
            self._send_layer(entry)

    def _send_layer(self, entry: LayerEntry) -> None:
        out, layer, staged = entry.out, entry.layer, entry.staged
        entry.ready()
        payload = staged.view(-1).view(torch.uint8).numpy()
        header = kv_frame(out.ticket.transfer_key, layer, out.ticket.dtype, tuple(staged.shape), payload,
                          out.ticket.secret)
        out.layer_checksums[layer] = FrameHeader.unpack(header).payload_checksum
        if layer == 0 and self.sender.take_corruption():
            payload = payload.copy()
            payload[len(payload) // 2] ^= 0xFF
            log.warning("test hook: corrupting kv transfer %s", out.ticket.transfer_id)
        self._write(out.ticket, header, payload)
        out.num_bytes += HEADER_SIZE + payload.nbytes

    def send_done(self, out: Outgoing, first_token_id: int) -> None:
        if out.error is None:
            checksums = [out.layer_checksums.get(i, 0) for i in range(out.ticket.num_layers)]
            frame = done_frame(out.ticket.transfer_key, first_token_id, len(out.layer_checksums),
                               summary_checksum(checksums), out.ticket.secret)
            self._write(out.ticket, frame)
            out.num_bytes += len(frame)
        self.settle(out)
