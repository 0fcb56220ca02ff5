"""The `nccl` connector's receiving half: a pair connection's layers come over its process
group (the sender: nccl.py; the frames and their checks: receiver.py).

The receiver checks each GROUP entry against its ticket, receives the group into a staging
buffer, and writes every block of it with one copy into the KV pool (kernels/scatter_rows.py;
engine/kv_pool.py: the caches of all layers are views of one tensor, one row per block of K
or V). The usual group, consecutive layers of the same transfers, needs only the rows of one
layer, uploaded to the device at `expect`; any other group uploads a row for each of its
blocks. On CUDA that copy runs on a copy stream, so the next group's receive does not wait
for it, and nothing waits on the CPU until DONE: the receiver's `Completions` settles the
transfer once its copies have run, or fails it at its landing deadline.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pdserve.engine.host_copy import to_device
from pdserve.engine.kv_pool import layer_rows
from pdserve.engine.private_apis import tight_timer_slack

from .frame import GROUP_ENTRY, MAX_GROUP, FrameError, FrameHeader, GroupEntry, group_entries
from .nccl import GROUP_BYTES
from .pair import ProcessGroupPair
from .sockets import recv_exact

log = logging.getLogger(__name__)


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
        self.copy_stream = torch.cuda.Stream(receiver.device) if pair.stream is not None else None
        self._span_cache: dict[tuple, tuple[list, torch.Tensor]] = {}  # _span_rows

    @classmethod
    def join(cls, offer, receiver, conn) -> "PairPayloads":
        if receiver.pool_rows is None:
            raise ValueError("the nccl connector needs the KV caches as views of one pool "
                             "(engine.kv_pool.allocate_kv_caches)")
        pair = ProcessGroupPair.create(offer, 1, receiver.device, receiver.pair_timeout)
        pair.use_stream()  # the connection's reader thread posts every op of the pair
        tight_timer_slack()  # its polls (receiver.py `_serve`) end near their time
        log.info("kv pair from %s: %s group up", conn.addr, offer.backend)
        return cls(pair, receiver, conn)

    def on_layer(self, incoming, header: FrameHeader) -> None:
        raise FrameError("KV frame on a pair connection (its layers come in GROUP frames)")

    def on_group(self, header: FrameHeader) -> None:
        """A GROUP frame: N (transfer, layer, num_bytes, tag) entries, then their payloads as one
        group over the process group."""
        if header.num_bytes > MAX_GROUP * GROUP_ENTRY.size:
            raise FrameError("unexpected GROUP frame")
        conn = self.conn
        if len(conn.buffer) < header.num_bytes:  # a cache so small that the reader did not grow it
            conn.buffer = bytearray(header.num_bytes)
        payload = recv_exact(conn.sock, memoryview(conn.buffer)[:header.num_bytes], eof_ok=False)
        self.recv_group(group_entries(header, payload))  # entries copy out what they keep

    def recv_group(self, entries: list[GroupEntry]) -> None:
        """One GROUP's bytes in one receive into staging, then every block of its layers into
        the reserved blocks with one copy (a pool row per block of K or V: `_scatter`). `entries`:
        GroupEntry each (its tag proves its ticket's secret). The receive is posted first and each entry is
        checked against its ticket while the bytes move: nothing reaches a block before that.
        A transfer nobody expects any more has its bytes dropped."""
        if any(e.num_bytes % (2 * self.row_bytes) for e in entries):
            raise FrameError("a layer that is not K and V of whole blocks of this cache")
        num_rows = [e.num_bytes // self.row_bytes for e in entries]
        total_rows = sum(num_rows)
        if total_rows * self.row_bytes > max(GROUP_BYTES, self.receiver.max_frame_bytes):
            raise FrameError(f"a group of {total_rows * self.row_bytes} bytes")
        # [group rows, block_numel]: each layer's K blocks, then its V blocks, as sent. On the
        # pair's stream (this thread's): its memory is reused in that stream's order
        flat = torch.empty((total_rows, self.rows.shape[1]), dtype=self.rows.dtype, device=self.rows.device)
        self.pair.recv_many([flat])
        found = self.receiver.admit_entries(self.conn, entries)
        kept = [(incoming, e.layer) for incoming, e in zip(found, entries) if incoming is not None]
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
        (incoming.py `Incoming.device_slots`); joined once for the groups of the same transfers (a
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

    def settle_when_landed(self, incoming, result) -> None:
        """Settles once every layer of `incoming` is in its blocks: on CUDA, once the copy
        stream has run its scatters (each waited for its receive)."""
        # late: the pair is stuck, and its reader closes it
        self.receiver.settle_when_copied(self.copy_stream, incoming, result, on_late=self.conn.shutdown)

    def close(self) -> None:
        self.pair.close()
