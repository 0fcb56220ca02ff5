"""The `tcp` connector's receiving half: a plain connection's KV frames carry their bytes on
the socket (the sender: tcp_sender.py; the frames and their checks: receiver.py).

Host caches take a layer's bytes straight from the socket into the reserved blocks, one recv
per run of consecutive block ids. Device caches take them through pinned host staging: the
socket fills a pinned buffer, then the receiver's copy stream (never the stream the decode
steps run on) copies it to the device and into the blocks. A transfer settles once those
copies have run (an event, polled by the receiver's `Completions`), so the decode node
admits the request only when its KV is there, and no decode step waits for a landing.
"""

from __future__ import annotations

import torch

from .frame import HEADER_SIZE, FrameError, FrameHeader
from .sockets import recv_checksummed


class TcpPayloads:
    """One plain connection's payloads. Made on the connection's reader thread, whose current
    stream becomes the receiver's copy stream (CUDA)."""

    pair = None

    def __init__(self, receiver, conn):
        self.receiver, self.conn = receiver, conn
        self.caches = receiver.kv_caches
        self.copy_stream = receiver.copy_stream
        if self.copy_stream is not None:
            torch.cuda.set_stream(self.copy_stream)  # this thread's landings run on it

    def on_layer(self, incoming, header: FrameHeader) -> None:
        """A KV frame's payload, read off the socket into the reserved blocks of its layer."""
        if self.receiver.in_place:
            return self._recv_in_place(incoming, header)
        if self.copy_stream is not None:
            staging = torch.empty(header.num_bytes, dtype=torch.uint8, pin_memory=True)
            payload = memoryview(staging.numpy())
        else:  # the frame is proven (receiver.py `admit`): its bytes may have room
            if len(self.conn.buffer) < header.num_bytes:
                self.conn.buffer = bytearray(header.num_bytes)
            staging, payload = None, memoryview(self.conn.buffer)[:header.num_bytes]
        value = recv_checksummed(self.conn.sock, payload)
        incoming.num_bytes += HEADER_SIZE + header.num_bytes
        if value != header.payload_checksum:
            return self.receiver.fail(incoming, f"checksum mismatch in KV frame (layer {header.layer})")
        ticket = incoming.ticket
        dtype = self.caches[0][0].dtype
        if staging is None:
            staging = torch.frombuffer(self.conn.buffer, dtype=torch.uint8, count=header.num_bytes)
        kv = staging.view(dtype).view(ticket.layer_shape).to(self.caches[0][0].device, non_blocking=True)
        k_cache, v_cache = self.caches[header.layer]
        k_cache.index_copy_(0, incoming.block_ids, kv[0])
        v_cache.index_copy_(0, incoming.block_ids, kv[1])
        incoming.layer_checksums[header.layer] = header.payload_checksum

    def _recv_in_place(self, incoming, header: FrameHeader) -> None:
        """Host caches: the payload goes from the socket straight into the reserved blocks, one
        recv per run of consecutive block ids (K's runs, then V's, the payload's order),
        checksummed as it lands. A bad checksum leaves garbage only in blocks that this
        failed transfer owns, and the decode node frees them."""
        value = 0
        for cache in self.caches[header.layer]:
            rows = cache.view(cache.shape[0], -1).view(torch.uint8).numpy()  # [num_blocks, block bytes]
            for start, end in incoming.runs:
                value = recv_checksummed(self.conn.sock, memoryview(rows[start:end]).cast("B"), value)
        incoming.num_bytes += HEADER_SIZE + header.num_bytes
        if value != header.payload_checksum:
            return self.receiver.fail(incoming, f"checksum mismatch in KV frame (layer {header.layer})")
        incoming.layer_checksums[header.layer] = header.payload_checksum

    def on_group(self, header: FrameHeader) -> None:
        raise FrameError("GROUP frame on a connection without a process group")

    def settle_when_landed(self, incoming, result) -> None:
        """On CUDA once the copy stream has run this transfer's copies (queued by this thread,
        in order); on the host at once."""
        self.receiver.settle_when_copied(self.copy_stream, incoming, result)

    def close(self) -> None:
        pass
