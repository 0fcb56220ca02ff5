"""The `nccl` connector's sender: the TCP connector's frames for control, the KV bytes over a
two-rank process group per (prefill node, decode node) pair (kv_transfer/pair.py): NCCL
between GPUs, gloo between CPU processes (the same code, so CI runs it). The receiving half is
nccl_receiver.py.

A sender's connection to a receiver starts with a PAIR frame; both ends then join the pair's
process group. Layers go in groups: whatever layers are queued when they are posted, up to
GROUP_BYTES. On CUDA the thread that hands them over posts them itself once the pair is up
(`PairChannel.post_queued`): at once while the wire is idle and the layers come apart (a
live prefill; the first layer after a DONE waits for the next, which tells, and sends a
BEGIN frame meanwhile, so that the receiver's reader is awake for the first group), else once
POST_BYTES are queued (a burst); at a transfer's DONE, whatever is still queued and the DONE
frame. (The channel's thread, woken, would first wait for the GIL that thread holds:
milliseconds.) The channel's thread connects, writes ABORT frames, and everything on CPU,
where a gloo send blocks until the peer took it.

A group is a GROUP frame on the socket (a 28-byte entry per layer: transfer id, layer, byte
count; no payload checksum: NCCL/gloo carry their own integrity), then all its bytes as one
message on the process group, concatenated on the pair's stream where they do not lie back
to back already (a prefill step gathers its layers into slabs, engine/kv_pool.py
`LayerSlabs`, so a group of them usually does): one NCCL op and one Python round per group,
not per tensor (each NCCL op costs tens of microseconds of host time: `benchmarks/nccl_ops.py`).
The pair's stream does not wait for a send, so the next group's copy, if any, overlaps it.

Who frees what is as for `tcp` (kv_transfer/connector.py). A pair that timed out or whose
connection broke is aborted and forgotten; the next transfer makes a new one.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.engine.host_copy import stream_event

from .channel import DoneItem, FrameChannel, LayerEntry, LayersItem, Outgoing
from .completions import Completions
from .connector import KVTicket
from .frame import BEGIN_FRAME, GROUP_ENTRY, MAX_GROUP, done_frame, group_frame, pair_frame, summary_checksum
from .pair import ProcessGroupPair
from .sockets import ClientTls
from .tcp_sender import TcpKVSender

log = logging.getLogger(__name__)

GROUP_BYTES = 128 << 20  # KV bytes in one group (or one layer if larger): the receiver stages them
# the caller posts a group once this much is queued (or the wire is idle between layers that
# come apart): below this size a group's host time on each side outweighs its time on NVLink
# (docs/architecture.md, "Measured figures behind the connectors")
POST_BYTES = 128 << 20
BURST_GAP_S = 0.5e-3  # layers handed over closer than this come in a burst: they wait for POST_BYTES


class NcclKVSender(TcpKVSender):
    """Prefill side. `device`: where the engine's KV cache lives (cuda:N, or cpu for gloo).
    `connect_timeout`: for the socket and for the peer to join the group; `transfer_timeout`:
    from a transfer's DONE until its bytes have left. `post_from_caller` (default: on CUDA):
    `send_layers` and `finish` write what they queue themselves when they can
    (`PairChannel.post_queued`); on gloo that blocks the caller until the peer took them, so
    only tests ask for it there."""

    def __init__(self, device: torch.device | str, connect_timeout: float = 5.0,
                 transfer_timeout: float = 30.0, post_from_caller: bool | None = None,
                 tls: ClientTls | None = None):
        super().__init__(connect_timeout, tls=tls)
        self.device = torch.device(device)
        self.transfer_timeout = transfer_timeout
        self.post_from_caller = self.device.type == "cuda" if post_from_caller is None else post_from_caller

    def send_layer(self, ticket: KVTicket, layer: int, kv: torch.Tensor) -> None:
        self.send_layers(layer, [(ticket, kv)])

    def send_layers(self, layer: int, items: list[tuple[KVTicket, torch.Tensor]]) -> None:
        """The tensors stay where they are (a view is made contiguous first); on CUDA one event
        marks when the work that made all of them is done. One queue item per receiver: a
        prefill step's prompts are handed over in one put, not one each."""
        for ticket, kv in items:
            self._check(ticket, kv)
            assert kv.device == self.device, (kv.device, self.device)
        # is_contiguous first: contiguous() releases the GIL, which the channel thread then holds
        staged = [kv if kv.is_contiguous() else kv.contiguous() for _, kv in items]
        ready = stream_event(self.device) if self.device.type == "cuda" else None
        by_endpoint: dict[str, list[LayerEntry]] = {}
        for out, kv in zip(self._states([ticket for ticket, _ in items]), staged):
            by_endpoint.setdefault(out.ticket.kv_endpoint, []).append(LayerEntry(out, layer, kv, ready))
        for endpoint, entries in by_endpoint.items():
            self._hand_over(endpoint, LayersItem(entries, sum(e.staged.nbytes for e in entries)))

    def _hand_over(self, endpoint: str, item) -> None:
        """With `post_from_caller`, this thread writes the item (and those queued before it)
        itself when it can (`PairChannel.post_queued`), else wakes the channel's thread."""
        channel = self._put(endpoint, item, wake=not self.post_from_caller)
        if self.post_from_caller and not channel.post_queued():
            channel.wake()

    def _new_channel(self, endpoint: str) -> FrameChannel:
        return PairChannel(self, endpoint)


class PairChannel(FrameChannel):
    """One receiver: the socket for frames and the process group for the bytes."""

    max_batch = MAX_GROUP
    max_batch_bytes = GROUP_BYTES
    post_bytes = POST_BYTES

    def __init__(self, sender: NcclKVSender, endpoint: str):
        self.pair: ProcessGroupPair | None = None
        self.completions = Completions(f"kv-pair-sent-{endpoint}")
        self.broken = False  # set by the completion thread when the pair timed out
        # time.monotonic() of the last KV item the caller may post; None after a DONE: _may_post_here
        self._last_put_at: float | None = None
        super().__init__(sender, endpoint)

    def put(self, item, wake: bool = True) -> None:
        if isinstance(item, DoneItem):
            self._last_put_at = None  # the next layer starts a new run
        super().put(item, wake)

    def _run(self) -> None:
        super()._run()
        self.completions.close()

    def _connect(self, ticket: KVTicket) -> None:
        super()._connect(ticket)
        offer, store = ProcessGroupPair.offer(self.sock.getsockname()[0], self.sender.device)
        self.sock.sendall(pair_frame(offer.pack(), ticket.transfer_key, ticket.secret))
        self.pair = ProcessGroupPair.create(offer, 0, self.sender.device, self.sender.transfer_timeout,
                                            store=store)
        self.pair.use_stream()  # this channel's thread posts every op of the pair
        log.info("kv pair with %s: %s group up", self.endpoint, offer.backend)

    def post_queued(self) -> bool:
        """The caller's thread, which just queued an item: writes the queued items itself when
        the pair is up and no other thread is writing: KV items when `_may_post_here` says so
        (else they wait for the next call, or the DONE after the last), and everything up to a
        DONE that was just queued. False when the channel's thread must write them: the pair is
        not up or has not sent yet, another thread is writing, or an ABORT is next. (That
        thread would wait for the GIL while the caller hands over layer after layer, or goes on
        with its next step after DONE: milliseconds.)"""
        if self.pair is None or not self._lock.acquire(blocking=False):
            return False
        try:
            pair = self.pair
            if pair is None or pair.num_sends == 0:  # NCCL's first op makes its communicator: it
                return False  # waits for the peer, which the caller must not (the thread's work)
            last = self._items[-1] if self._items else None
            if isinstance(last, LayersItem):
                starts_run = self._last_put_at is None
                if not self._may_post_here(pair):
                    if starts_run:
                        self._begin_run()
                    return True
            previous = pair.use_stream()
            try:
                self._drain(caller=True)
            finally:
                pair.use_stream(previous)
            return not self._items
        finally:
            self._lock.release()

    def _may_post_here(self, pair: ProcessGroupPair) -> bool:
        """At once while the wire is idle, if the layers come apart (a live prefill: each goes
        as it is computed); else once `post_bytes` are queued, so that layers handed over in a
        burst go in a few large groups (each group costs both sides host time). The
        first layer after a DONE cannot tell yet: it waits for the next one (in a live prefill a
        layer's compute time, which the wire makes up at once)."""
        now, last = time.monotonic(), self._last_put_at
        self._last_put_at = now
        if last is not None and now - last >= BURST_GAP_S and pair.num_sends_in_flight() == 0:
            return True
        return sum(item.num_bytes for item in list(self._items) if isinstance(item, LayersItem)) >= self.post_bytes

    def _begin_run(self) -> None:
        """A BEGIN frame: the receiver's reader, which may have slept in recv for long, wakes
        and watches the connection (receiver.py `WATCH_S`, sockets.py `await_readable`) while this
        thread hands over the layers of the first group, instead of waking late for it. A write
        error surfaces at the next frame."""
        if self._connected():
            try:
                self.sock.sendall(BEGIN_FRAME)
            except OSError:
                pass

    def _connected(self) -> bool:
        return self.pair is not None and not self.broken and super()._connected()

    def _write(self, ticket: KVTicket, *parts) -> None:
        if self.broken:  # a transfer timed out on this pair: every frame goes on a new one
            self._disconnect()
        super()._write(ticket, *parts)

    def send_layers(self, entries: list[LayerEntry]) -> None:
        """One GROUP frame with an entry per layer, then the group's bytes as one message: layers
        lying back to back as one view, others concatenated on the pair's stream. That device copy
        costs far less than the host time of an NCCL op per tensor, which bounds throughput."""
        if not entries:
            return
        self._write(entries[0].out.ticket, group_frame([
            (e.out.ticket.transfer_key, e.layer, e.out.ticket.layer_bytes, e.out.ticket.secret) for e in entries]))
        waited = None
        for e in entries:
            if e.ready is not None and e.ready is not waited:  # layers sent together share one
                self.pair.stream.wait_event(e.ready)
                waited = e.ready
        flat = _joined([e.staged for e in entries])
        self.pair.send_many([flat])
        now = time.monotonic()
        for out, layer, staged, _ in entries:
            out.layer_checksums[layer] = 0
            out.num_bytes += GROUP_ENTRY.size + out.ticket.layer_bytes
            out.first_layer_at = out.first_layer_at or now
            out.staged += (staged, flat)  # alive until the pair's stream is past the send

    def send_done(self, out: Outgoing, first_token_id: int) -> None:
        if out.error is not None or self.pair is None:
            return self.settle(out)
        checksums = [0] * out.ticket.num_layers
        frame = done_frame(out.ticket.transfer_key, first_token_id, len(out.layer_checksums),
                           summary_checksum(checksums), out.ticket.secret)
        self._write(out.ticket, frame)
        out.num_bytes += len(frame)
        done_at = time.monotonic()
        deadline = done_at + self.sender.transfer_timeout
        self.completions.add(self.pair.done_event(), deadline, lambda error: self._sent(out, error, done_at))

    def _sent(self, out: Outgoing, error: BaseException | None, done_at: float) -> None:
        """Completion thread: every byte of `out` has left, or the peer stopped taking them."""
        log.debug("kv transfer %s: layers queued over %.1f ms, then the bytes left %.1f ms after DONE",
                  out.ticket.transfer_id, 1e3 * (done_at - (out.first_layer_at or done_at)),
                  1e3 * (time.monotonic() - done_at))
        if error is not None:
            self.broken = True  # the channel thread aborts the pair before its next frame
            out.error = ConnectionError(f"kv pair with {self.endpoint}: {error}")
        out.staged.clear()
        self.settle(out)

    def _disconnect(self) -> None:
        if self.pair is not None:
            self.pair.close()
            self.pair = None
        self.broken = False
        super()._disconnect()


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The bytes of `tensors` (contiguous) as one flat tensor: a view over those that lie back to
    back in one storage (a prefill step gathers its layers into slabs and sends a view per
    prompt and layer: prefill_node/service.py), joined by a copy on the current stream where
    they do not. Run for every group, so a tensor costs a few attribute reads."""
    spans = []  # [first tensor, elements from it on, its root tensor]
    end = None  # the address right after the last span
    for t in tensors:
        start, root = t.data_ptr(), t._base if t._base is not None else t
        span = spans[-1] if start == end else None
        if span is not None and t.dtype == span[0].dtype and (
                root is span[2] or t.untyped_storage().data_ptr() == span[0].untyped_storage().data_ptr()):
            span[1] += t.numel()
        else:
            spans.append([t, t.numel(), root])
        end = start + t.nbytes
    flats = [first.as_strided((numel,), (1,)) for first, numel, _ in spans]
    return flats[0] if len(flats) == 1 else torch.cat(flats)
