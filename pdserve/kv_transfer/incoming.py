"""What the KV receiver (receiver.py) keeps per ticket (`Incoming`) and per sender's
connection (`Connection`), and the checks of a frame against its ticket."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from pdserve.engine.host_copy import stream_event, to_device
from pdserve.engine.kv_pool import kv_slots

from .connector import KVTicket, TransferResult
from .frame import DONE, FrameError, FrameHeader, FrameType


@dataclass(eq=False)
class Incoming:
    """A ticket being received. Its blocks' addresses are made on first use, in the form that
    the path carrying it needs (a transfer takes one of the three), not for every request."""

    ticket: KVTicket
    on_done: Callable[[TransferResult], None]
    device: torch.device  # the cache's
    num_blocks: int  # the cache's
    layer_checksums: dict[int, int] = field(default_factory=dict)
    num_bytes: int = 0
    started_at: float | None = None  # time.monotonic() of its first frame: `transfer_timeout` runs from it
    conn: "Connection | None" = None  # where its first frame came

    @cached_property
    def block_ids(self) -> torch.Tensor:
        """On the cache's device: tcp frames into device caches."""
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


@dataclass(eq=False)
class Connection:
    """One sender's connection: its frames, and how its payloads come (`payloads`)."""

    sock: socket.socket
    addr: tuple
    payloads: object = None  # TcpPayloads, or PairPayloads once a PAIR frame came
    buffer: bytearray = field(default_factory=bytearray)  # reused for payloads read off the socket
    transfers: set[bytes] = field(default_factory=set)  # transfer keys that had frames here
    watch_until: float = 0.0  # time.monotonic(): a pair connection's reader polls until then
    opened_at: float = field(default_factory=time.monotonic)
    proven: bool = False  # a frame here proved a live ticket's secret (receiver.py `proven`)

    @property
    def pair(self):
        """The connection's process group (ProcessGroupPair), or None."""
        return getattr(self.payloads, "pair", None)

    def handshake(self, timeout: float) -> None:
        """Over TLS, the handshake (within `timeout`, as a proof must be); nothing otherwise."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(timeout)
            self.sock.do_handshake()
            self.sock.settimeout(None)

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
        self.payloads.close()
        self.sock.close()


def _runs(block_ids) -> list[tuple[int, int]]:
    """[3, 4, 5, 9, 10] -> [(3, 6), (9, 11)]."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def check_frame(incoming: Incoming, header: FrameHeader) -> None:
    """Raises FrameError for a KV, DONE, LANDED or ABORT frame that does not fit its ticket."""
    ticket = incoming.ticket
    if header.type is FrameType.KV:
        if header.dtype != ticket.dtype or header.shape != ticket.layer_shape:
            raise FrameError(f"frame {header.dtype} {header.shape} does not match the ticket's "
                             f"{ticket.dtype} {ticket.layer_shape}")
        error = layer_error(incoming, header.layer, header.num_bytes)
        if error is not None:
            raise FrameError(error)
    elif header.type in (FrameType.DONE, FrameType.LANDED) and header.num_bytes != DONE.size:
        raise FrameError(f"{header.type.name} frame of {header.num_bytes} bytes")
    elif header.type is FrameType.ABORT and header.num_bytes:
        raise FrameError("ABORT frame with a payload")


def layer_error(incoming: Incoming, layer: int, num_bytes: int) -> str | None:
    """Why a KV frame or GROUP entry for `layer` does not fit its ticket, or None."""
    ticket = incoming.ticket
    if not 0 <= layer < ticket.num_layers or layer in incoming.layer_checksums:
        return f"unexpected layer {layer}"
    if num_bytes != ticket.layer_bytes:
        return f"frame of {num_bytes} bytes, the ticket expects {ticket.layer_bytes}"
    return None
