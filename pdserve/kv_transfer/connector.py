"""The connector interface: a sender on the prefill node, a receiver on the decode node.

Like vLLM's KVConnectorBase_V1, a connector has two sides that never share memory:

* The decode node reserves blocks for a prompt and registers a `KVTicket` with its
  `KVReceiver` (`expect`). The ticket travels to the prefill node inside the Prefill RPC.
* The prefill node's engine thread hands each layer's K/V of the prompt's blocks to its
  `KVSender` (`send_layers`) as soon as that layer has run on the last prefill chunk, so the
  transfer overlaps the layers still to run; then `finish` sends the first sampled token and
  a checksum summary. `send_layer` and `finish` never block on the network.
* The receiver writes each layer into the reserved blocks, checks every checksum, and calls
  the ticket's callback once: success with the first token, or failure with a reason. Only
  that transfer fails; the receiver keeps serving the others.

Who frees what: the receiver never frees blocks; the decode node frees a reservation when
the callback reports failure, when the deadline passes, or when the request is cancelled
(`forget` then makes the receiver drop that transfer's late frames).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from .frame import DTYPE_SIZES
from .proof import new_secret


@dataclass(frozen=True)
class KVTicket:
    """A decode node's reservation, as the prefill node needs it to push the KV."""

    transfer_id: str  # 32 hex characters
    kv_endpoint: str  # host:port of the receiver
    block_ids: tuple[int, ...]  # the blocks to fill, in prompt order: those after the cached ones
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16
    deadline: float  # unix time
    model_fingerprint: str
    connector: str = "tcp"
    num_cached_blocks: int = 0  # the prompt's leading blocks the decode node holds: not sent
    # what the sender proves on the KV channel (kv_transfer/proof.py); made by the decode node
    secret: bytes = field(default_factory=new_secret, repr=False)
    # the issuing decode node's signature under the cluster secret (service/cluster_auth.py):
    # a prefill node sends KV only to endpoints that a member of its cluster named
    signature: bytes = field(default=b"", repr=False)
    # the `ipc` connector: the decode node's KV pool, for a prefill node on its host to open
    # and write in place (shared_pool.py); b"" otherwise
    ipc: bytes = field(default=b"", repr=False)

    def signed_part(self) -> bytes:
        """Every field but the signature, in a fixed encoding: what the signature covers."""
        fields = self.as_json_dict()
        del fields["signature"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def as_json_dict(self) -> dict:
        """The fields as JSON takes them (bytes as hex): for peers in other processes (tests,
        benchmarks); the nodes send tickets as protobuf."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "block_ids": list(self.block_ids), "secret": self.secret.hex(),
                "signature": self.signature.hex(), "ipc": self.ipc.hex()}

    @classmethod
    def from_json_dict(cls, fields: dict) -> "KVTicket":
        return cls(**{**fields, "block_ids": tuple(fields["block_ids"]), "secret": bytes.fromhex(fields["secret"]),
                      "signature": bytes.fromhex(fields["signature"]), "ipc": bytes.fromhex(fields.get("ipc", ""))})

    @cached_property  # read for every layer sent and received
    def transfer_key(self) -> bytes:
        return bytes.fromhex(self.transfer_id)

    @cached_property
    def layer_shape(self) -> tuple[int, ...]:
        """One layer's payload: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""
        return (2, len(self.block_ids), self.block_size, self.num_kv_heads, self.head_dim)

    @cached_property
    def layer_bytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.layer_shape:
            n *= d
        return n


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    ok: bool
    first_token_id: int | None = None
    error: str | None = None
    num_bytes: int = 0
    timed_out: bool = False  # failed at a deadline (not by a bad frame or a broken connection)
    in_place: bool = False  # the ipc connector's sender wrote the blocks itself


class KVSender(abc.ABC):
    """Prefill side. Thread-safe; called from the engine thread."""

    @abc.abstractmethod
    def send_layer(self, ticket: KVTicket, layer: int, kv) -> None:
        """Queues one layer, `kv` a tensor of `ticket.layer_shape` gathered from the cache (so
        not a view of it). A CUDA tensor is staged to pinned host memory in stream order; a
        host tensor is sent as is, so the caller must not modify it afterwards."""

    def send_layers(self, layer: int, items: list[tuple[KVTicket, object]]) -> None:
        """One layer of several transfers at once (the requests of one prefill batch): as
        `send_layer` for each (ticket, kv), with less host time per transfer where the
        connector can."""
        for ticket, kv in items:
            self.send_layer(ticket, layer, kv)

    @abc.abstractmethod
    def finish(self, ticket: KVTicket, first_token_id: int) -> concurrent.futures.Future:
        """Queues the DONE frame. The future resolves to the bytes sent once every frame of the
        transfer is on the wire, or raises ConnectionError/TransferError."""

    @abc.abstractmethod
    def abort(self, ticket: KVTicket) -> None:
        """Gives up on a transfer: drops its queued frames and tells the receiver."""

    @abc.abstractmethod
    def close(self) -> None: ...


class KVReceiver(abc.ABC):
    """Decode side: owns a listening endpoint and writes into the node's KV cache."""

    endpoint: str

    @abc.abstractmethod
    def expect(self, ticket: KVTicket, on_done: Callable[[TransferResult], None]) -> None:
        """Registers a ticket; `on_done` is called exactly once, from a receiver thread."""

    @abc.abstractmethod
    def forget(self, transfer_id: str, then: Callable[[], None] | None = None) -> None:
        """Drops a ticket without calling back; later frames for it are read and discarded.
        `then()` runs (on any thread) once no sender may write its blocks any more: the
        caller frees them only then."""

    @abc.abstractmethod
    def close(self) -> None: ...


class TransferError(RuntimeError):
    """A transfer that failed on the sender side."""
