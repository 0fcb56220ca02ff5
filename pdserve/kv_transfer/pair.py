"""A two-rank process group between one prefill node (rank 0, the sender) and one decode node
(rank 1, the receiver), made on demand for the `nccl` connector. No global world: each pair
has its own TCPStore, hosted by the sender, whose address travels in the PAIR frame over the
TCP control connection. The pair lives exactly as long as that connection.

`ProcessGroupNCCL` moves CUDA tensors (over NVLink between GPUs of one host); the same code
runs `ProcessGroupGloo` on CPU tensors, which is what CI tests.

Waiting: gloo's `work.wait()` blocks until the bytes moved (or the group's timeout raises);
NCCL's only makes the pair's stream wait, so completion is an event polled against a
deadline (completions.py). A stuck peer therefore fails the transfer, and the owner aborts the
pair, instead of hanging a node. NCCL's own watchdog is kept from killing the process: our
deadlines fire first and `close` aborts the communicator.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed

from pdserve.engine.private_apis import current_stream

log = logging.getLogger(__name__)

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
MAX_OFFER_BYTES = 256
NCCL_WATCHDOG_S = 24 * 3600  # far beyond any transfer deadline: we abort first


@dataclass(frozen=True)
class PairOffer:
    """What a PAIR frame carries: the sender's backend and the address of its TCPStore."""

    backend: str  # nccl | gloo
    store_host: str
    store_port: int

    def pack(self) -> bytes:
        return f"{self.backend} {self.store_host} {self.store_port}".encode()

    @classmethod
    def unpack(cls, data: bytes) -> "PairOffer":
        """Raises ValueError on anything but `backend host port` in ASCII."""
        parts = bytes(data).decode("ascii").split(" ")
        if len(parts) != 3 or parts[0] not in BACKENDS.values() or not parts[2].isdigit():
            raise ValueError(f"bad PAIR offer {bytes(data)[:64]!r}")
        return cls(parts[0], parts[1], int(parts[2]))


class ProcessGroupPair:
    """One process group of two ranks, its store, and (on CUDA) the stream its ops run after."""

    def __init__(self, group, store, rank: int, device: torch.device):
        self.group, self.store, self.rank, self.device = group, store, rank, device
        self.peer = 1 - rank
        self.closed = False
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # NCCL: the work of the last send, which the stream has not waited for; done_event waits
        # on it even once done (_sends drops done works, a failed one too)
        self._last_send = None
        self._sends = collections.deque()  # NCCL: the work of each send that may still run, oldest first
        self.num_sends = 0  # posted; from the first on, NCCL's communicator is up (the first op waits for the peer)

    @classmethod
    def offer(cls, host: str, device: torch.device) -> tuple[PairOffer, object]:
        """Rank 0: starts the pair's TCPStore on `host` (any free port)."""
        store = torch.distributed.TCPStore(host, 0, 2, True, wait_for_workers=False)
        return PairOffer(backend_for(device), host, store.port), store

    @classmethod
    def create(cls, offer: PairOffer, rank: int, device: torch.device, timeout_s: float,
               store=None) -> "ProcessGroupPair":
        """Both ranks: blocks until the other rank joins (gloo) or returns at once (NCCL
        connects on the first op). Raises RuntimeError/ValueError after `timeout_s`."""
        if offer.backend != backend_for(device):
            raise ValueError(f"the peer offers {offer.backend}, this node's {device} needs "
                             f"{backend_for(device)}")
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = torch.distributed.TCPStore(offer.store_host, offer.store_port, 2, False,
                                               timeout=timeout)
        prefixed = torch.distributed.PrefixStore("pdkv", store)
        if offer.backend == "gloo":
            group = torch.distributed.ProcessGroupGloo(prefixed, rank, 2, timeout)
        else:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # never kill the node
            options = torch.distributed.ProcessGroupNCCL.Options()
            options._timeout = datetime.timedelta(seconds=NCCL_WATCHDOG_S)
            group = torch.distributed.ProcessGroupNCCL(prefixed, rank, 2, options)
        return cls(group, store, rank, device)

    def use_stream(self, stream=None):
        """Makes the pair's stream (or `stream`) the calling thread's current stream (CUDA;
        current streams are per thread): the ops and buffers this thread makes from now on are
        ordered on it. A thread that posts the pair's ops calls it once, instead of a stream
        context around each op (which costs tens of microseconds of host time). Returns the
        stream that was current (None on CPU)."""
        if self.stream is None:
            return None
        previous = current_stream(self.device)
        torch.cuda.set_stream(stream or self.stream)
        return previous

    def send_many(self, tensors: list[torch.Tensor]) -> None:
        """Queues `tensors` (contiguous, made on or waited for by the pair's stream) to the peer
        as one group, from a thread whose current stream is the pair's (`use_stream`), one
        thread at a time (the nccl sender's channel lock). gloo: returns once they have left.
        NCCL: the pair's stream does not wait for the send (the next group's copy overlaps it);
        `done_event` does. NCCL keeps the tensors alive until the send has run."""
        work = self._group(self.group.send, tensors)
        self.num_sends += 1
        if work is not None:
            self.num_sends_in_flight()  # drops the done ones: a work may hold its tensors
            self._last_send = work
            self._sends.append(work)

    def num_sends_in_flight(self) -> int:
        """Sends not yet done (NCCL runs them in order; counted since the last `done_event`);
        0 on gloo, whose sends return done. Under the same lock as `send_many`."""
        while self._sends and self._sends[0].is_completed():
            self._sends.popleft()
        return len(self._sends)

    def recv_many(self, tensors: list[torch.Tensor]) -> None:
        """Receives into `tensors`, matching one `send_many` of the same sizes, from the thread
        that called `use_stream`. gloo: returns once they have landed; NCCL: later work on the
        pair's stream runs after them."""
        work = self._group(self.group.recv, tensors)
        if work is not None:
            work.wait()

    def _group(self, op, tensors: list[torch.Tensor]):
        """NCCL: one coalesced launch for all of `tensors` (their transfers pipeline instead of
        each paying its own handshake), after the work queued on the current stream; returns
        its work. gloo has no coalescing: one blocking op each (raises on error or timeout),
        and returns None."""
        if not self.group.supports_coalescing:
            for tensor in tensors:
                op([tensor], self.peer, 0).wait()
            return None
        if len(tensors) == 1:
            return op(tensors, self.peer, 0)
        self.group._start_coalescing()
        try:
            for tensor in tensors:
                op([tensor], self.peer, 0)
        finally:
            work = self.group._end_coalescing()
        return work

    def done_event(self):
        """An event after everything queued on the pair's stream and every send, or None on
        CPU (done). From the thread that called `use_stream`."""
        if self.stream is None:
            return None
        if self._last_send is not None:  # NCCL runs its ops in order: the last covers the others
            self._last_send.wait()
            self._last_send = None
            self._sends.clear()
        return self.stream.record_event()

    def close(self) -> None:
        """Aborts the group (once): a pending op on a broken pair ends instead of hanging."""
        if self.closed:
            return
        self.closed = True
        for name in ("abort", "shutdown"):
            method = getattr(self.group, name, None)
            if method is not None:
                try:
                    method()
                    return
                except RuntimeError as e:  # already broken: nothing more to free
                    log.debug("pair %s failed: %s", name, e)


def backend_for(device: torch.device) -> str:
    if device.type not in BACKENDS:
        raise ValueError(f"the nccl connector needs cuda or cpu tensors, not {device.type}")
    return BACKENDS[device.type]
