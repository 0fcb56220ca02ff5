"""The `nccl` connector: the TCP connector's frames for control, the KV bytes over a two-rank
process group per (prefill node, decode node) pair (kv_transfer/pair.py): NCCL between GPUs,
gloo between CPU processes (the same code, so CI runs it).

A sender's connection to a receiver starts with a PAIR frame; both ends then join the pair's
process group. Layers go in groups: whatever layers are queued when they are posted, up to
GROUP_BYTES. On CUDA the thread that hands them over posts them itself once the pair is up
(`_PairChannel.post_queued`): at once while the wire is idle and the layers come apart (a
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
not per tensor (each NCCL op costs tens of microseconds of host time: `benchmarks/nccl_ops.py`). The
pair's stream does not wait for a send, so the next group's copy, if any, overlaps it.

The receiver checks each entry against its ticket, receives the group into a staging buffer,
and writes every block of it with one copy into the KV pool (kernels/scatter_rows.py;
engine/kv_pool.py: the caches of all layers are views of one tensor, one row per block of K
or V). The usual group, consecutive layers of the same transfers, needs only the rows of one
layer, uploaded to the device at `expect`; any other group uploads a row for each of its
blocks. On CUDA that copy runs on a copy stream, so the next group's receive does not wait
for it, and nothing waits on the CPU until DONE: a completion thread settles the transfer
once its copies have run, or fails it at the ticket's deadline.

Who frees what is as for `tcp` (kv_transfer/connector.py). A pair that timed out or whose
connection broke is aborted and forgotten; the next transfer makes a new one.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pdserve.engine.host_copy import stream_event, to_device
from pdserve.engine.kv_pool import layer_rows

from .connector import KVTicket, TransferResult
from .frame import BEGIN_FRAME, GROUP_ENTRY, MAX_GROUP, FrameError, done_frame, group_frame, pair_frame, summary_checksum
from .pair import Completions, ProcessGroupPair
from .tcp_sender import TcpKVSender, _Channel, _Outgoing

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
    (`_PairChannel.post_queued`); on gloo that blocks the caller until the peer took them, so
    only tests ask for it there."""

    def __init__(self, device: torch.device | str, connect_timeout: float = 5.0,
                 transfer_timeout: float = 30.0, post_from_caller: bool | None = None):
        super().__init__(connect_timeout)
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
        by_endpoint: dict[str, list] = {}
        for out, kv in zip(self._states([ticket for ticket, _ in items]), staged):
            by_endpoint.setdefault(out.ticket.kv_endpoint, []).append((out, layer, kv, ready))
        for endpoint, layers in by_endpoint.items():
            self._hand_over(endpoint, ("kv", layers, sum(kv.nbytes for _, _, kv, _ in layers)))

    def _hand_over(self, endpoint: str, item) -> None:
        """With `post_from_caller`, this thread writes the item (and those queued before it)
        itself when it can (`_PairChannel.post_queued`), else wakes the channel's thread."""
        channel = self._channel(endpoint)
        channel.put(item, wake=not self.post_from_caller)
        if self.post_from_caller and not channel.post_queued():
            channel.wake()

    def _new_channel(self, endpoint: str) -> _Channel:
        return _PairChannel(self, endpoint)


class _PairChannel(_Channel):
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
        if item is not None and item[0] == "done":
            self._last_put_at = None  # the next layer starts a new run
        super().put(item, wake)

    def _run(self) -> None:
        super()._run()
        self.completions.close()

    def _connect(self) -> None:
        super()._connect()
        offer, store = ProcessGroupPair.offer(self.sock.getsockname()[0], self.sender.device)
        self.sock.sendall(pair_frame(offer.pack()))
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
            if last is not None and last[0] == "kv":
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
        return sum(item[2] for item in list(self._items) if item and item[0] == "kv") >= self.post_bytes

    def _begin_run(self) -> None:
        """A BEGIN frame: the receiver's reader, which may have slept in recv for long, wakes
        and watches the connection (tcp.py `WATCH_S`, sockets.py `await_readable`) while this
        thread hands over the layers of the first group, instead of waking late for it. A write
        error surfaces at the next frame."""
        if self._connected():
            try:
                self.sock.sendall(BEGIN_FRAME)
            except OSError:
                pass

    def _connected(self) -> bool:
        return self.pair is not None and not self.broken and super()._connected()

    def _write(self, *parts) -> None:
        if self.broken:  # a transfer timed out on this pair: every frame goes on a new one
            self._disconnect()
        super()._write(*parts)

    def _send_layers(self, layers: list[tuple]) -> None:
        """One GROUP frame with an entry per layer, then the group's bytes as one message: layers
        lying back to back as one view, others concatenated on the pair's stream. That device copy
        costs far less than the host time of an NCCL op per tensor, which bounds throughput."""
        if not layers:
            return
        self._write(group_frame([(out.ticket.transfer_key, layer, out.ticket.layer_bytes)
                                 for out, layer, _, _ in layers]))
        waited = None
        for *_, ready in layers:
            if ready is not None and ready is not waited:  # layers sent together share one
                self.pair.stream.wait_event(ready)
                waited = ready
        flat = _joined([staged for _, _, staged, _ in layers])
        self.pair.send_many([flat])
        now = time.monotonic()
        for out, layer, staged, _ in layers:
            out.layer_checksums[layer] = 0
            out.num_bytes += GROUP_ENTRY.size + out.ticket.layer_bytes
            out.first_layer_at = out.first_layer_at or now
            out.staged += (staged, flat)  # alive until the pair's stream is past the send

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


def _rows_of(kept: list[tuple], num_blocks: int) -> np.ndarray:
    """The pool rows of (incoming, layer) each, in order, made on the host from each ticket's
    slots with a few numpy calls for the whole group, not a Python loop over its entries."""
    slots = [incoming.slots for incoming, _ in kept]
    layers = np.repeat(np.fromiter((layer for _, layer in kept), np.int64, len(kept)), [len(s) for s in slots])
    return layer_rows(np.concatenate(slots), layers, num_blocks)


def _layer_span(kept: list[tuple]) -> tuple[int, int, list] | None:
    """(first layer, number of layers, transfers) when `kept` is layers first, first + 1, ... of
    the same transfers in the same order each (as a sender hands over a prefill step's
    prompts, a layer at a time); None for any other group."""
    first = kept[0][1]
    width = next((i for i, (_, layer) in enumerate(kept) if layer != first), len(kept))
    if len(kept) % width:
        return None
    transfers = [incoming for incoming, _ in kept[:width]]
    for i, (incoming, layer) in enumerate(kept):
        if incoming is not transfers[i % width] or layer != first + i // width:
            return None
    return first, len(kept) // width, transfers


class PairPayloads:
    """Receiver side of one pair connection: takes KV payloads off the process group. On CUDA
    a group's scatter into the blocks runs on a copy stream, so the next group's receive
    (on the pair's stream) need not wait for it."""

    def __init__(self, pair: ProcessGroupPair, receiver, conn):
        self.pair, self.receiver, self.conn = pair, receiver, conn
        self.rows = receiver.pool_rows  # [num_layers * 2 * num_blocks, block_numel]: engine/kv_pool.py
        self.row_bytes = self.rows.shape[1] * self.rows.element_size()
        self.num_blocks = receiver.kv_caches[0][0].shape[0]
        cuda = pair.stream is not None
        self.copy_stream = torch.cuda.Stream(receiver.device) if cuda else None
        self.completions = Completions("kv-pair-landed") if cuda else None
        self._span_cache: dict[tuple, tuple[list, torch.Tensor]] = {}  # _span_rows

    @classmethod
    def join(cls, offer, receiver, conn) -> "PairPayloads":
        if receiver.pool_rows is None:
            raise ValueError("the nccl connector needs the KV caches as views of one pool "
                             "(engine.kv_pool.allocate_kv_caches)")
        pair = ProcessGroupPair.create(offer, 1, receiver.device, receiver.pair_timeout)
        pair.use_stream()  # the connection's reader thread posts every op of the pair
        log.info("kv pair from %s: %s group up", conn.addr, offer.backend)
        return cls(pair, receiver, conn)

    def recv_group(self, entries: list[tuple[bytes, int, int]]) -> None:
        """One GROUP's bytes in one receive into staging, then every block of its layers into
        the reserved blocks with one copy (a pool row per block of K or V: `_scatter`). `entries`:
        (transfer id, layer, num_bytes) each. The receive is posted first and each entry is
        checked against its ticket while the bytes move: nothing reaches a block before that.
        A transfer nobody expects any more has its bytes dropped."""
        if any(num_bytes % (2 * self.row_bytes) for *_, num_bytes in entries):
            raise FrameError("a layer that is not K and V of whole blocks of this cache")
        num_rows = [num_bytes // self.row_bytes for *_, num_bytes in entries]
        total_rows = sum(num_rows)
        if total_rows * self.row_bytes > max(GROUP_BYTES, self.receiver.max_frame_bytes):
            raise FrameError(f"a group of {total_rows * self.row_bytes} bytes")
        # [group rows, block_numel]: each layer's K blocks, then its V blocks, as sent. On the
        # pair's stream (this thread's): its memory is reused in that stream's order
        flat = torch.empty((total_rows, self.rows.shape[1]), dtype=self.rows.dtype, device=self.rows.device)
        self.pair.recv_many([flat])
        found = self.receiver._admit_entries(self.conn, entries)
        kept = [(incoming, layer) for incoming, (_, layer, _) in zip(found, entries) if incoming is not None]
        if not kept:
            return
        if len(kept) < len(entries):
            flat = torch.cat([chunk for incoming, chunk in zip(found, flat.split(num_rows)) if incoming is not None])
        span = _layer_span(kept)
        if span is None:  # any mix of layers and transfers: a row index for each block
            rows = _rows_of(kept, self.num_blocks)  # one copy to the device, in this stream's order
            return self._scatter(flat[None], to_device(rows, torch.int64, self.rows.device), 0, 0)
        first, num_layers, transfers = span  # a row index a block of one layer, for every layer
        self._scatter(flat.view(num_layers, -1, flat.shape[1]), self._span_rows(transfers),
                      layer_rows(0, first, self.num_blocks), layer_rows(0, 1, self.num_blocks))

    def _span_rows(self, transfers: list) -> torch.Tensor:
        """The pool rows of `transfers`' blocks within a layer (K's, then V's, for each), on the
        device, in this (the pair's) stream's order: each transfer's were uploaded at `expect`
        (tcp.py `_Incoming.device_slots`); joined once for the groups of the same transfers (a
        prefill step's)."""
        key = tuple(map(id, transfers))  # the cache keeps them alive: no id is reused while cached
        if key not in self._span_cache:
            if len(self._span_cache) >= 8:
                del self._span_cache[next(iter(self._span_cache))]
            uploaded = [incoming.device_slots for incoming in transfers]
            for slots, ready in uploaded:
                if ready is not None:  # made on the stream of the thread that called expect
                    self.pair.stream.wait_event(ready)
                    slots.record_stream(self.pair.stream)
            rows = uploaded[0][0] if len(uploaded) == 1 else torch.cat([slots for slots, _ in uploaded])
            self._span_cache[key] = (transfers, rows)
        return self._span_cache[key][1]

    def _scatter(self, staged: torch.Tensor, slots: torch.Tensor, first_row: int, rows_a_layer: int) -> None:
        """Pool row `first_row + l * rows_a_layer + slots[s]` <- `staged[l, s]`, for `staged`
        `[num_layers, num_slots, block_numel]` (kernels/scatter_rows.py); on CUDA on the copy
        stream, after the receive. CPU nodes may lack Triton: its reference's `index_copy_`."""
        if self.copy_stream is None:
            layers = torch.arange(len(staged))[:, None]
            rows = (first_row + layers * rows_a_layer + slots).reshape(-1)
            self.rows.index_copy_(0, rows, staged.reshape(-1, staged.shape[-1]))
            return
        from pdserve.kernels.scatter_rows import scatter_rows  # Triton: what a CUDA node runs anyway
        self.copy_stream.wait_event(self.pair.stream.record_event())
        torch.cuda.set_stream(self.copy_stream)  # cheaper than a stream context; this thread's own
        try:
            scatter_rows(staged, self.rows, slots, first_row, rows_a_layer)
        finally:
            torch.cuda.set_stream(self.pair.stream)
        staged.record_stream(self.copy_stream)  # made on the pair's stream, read on this one
        slots.record_stream(self.copy_stream)

    def settle_when_landed(self, incoming, result: TransferResult) -> None:
        """Settles once every layer of `incoming` is in its blocks: on CUDA, once the copy
        stream has run its scatters (each waited for its receive)."""
        if self.copy_stream is None:
            return self.receiver._settle(incoming, result)
        event = self.copy_stream.record_event()
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
