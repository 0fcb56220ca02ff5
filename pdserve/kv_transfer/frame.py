"""The KV wire format: a fixed 88-byte binary header, then `num_bytes` raw bytes.

    magic "PDKV" | u16 version | u8 type | u8 dtype | 16 bytes transfer id | u32 layer |
    u8 ndim | 3 pad | 6 x u32 shape | u64 num_bytes | u32 payload CRC32C |
    16 bytes tag | u32 header CRC32C

All little-endian. The tag proves that the sender holds the named transfer's ticket secret
(kv_transfer/proof.py): a keyed BLAKE2b of the 68 bytes before it, on every frame that names a
transfer (KV, DONE, ABORT, and PAIR, which names the transfer that opened the connection);
zero on BEGIN and GROUP, whose entries carry tags of their own.

A KV frame's payload is one layer of a transfer: K and V of every block of the prompt,
`[2, num_blocks, block_size, num_kv_heads, head_dim]`. The DONE frame ends a transfer; its payload is `u32 first_token_id | u32 num_layers | u32 CRC32C of the KV frames'
checksums in layer order`. ABORT (no payload) says the sender gave up. PAIR opens a connection
of the `nccl` connector (kv_transfer/pair.py): its payload is the sender's process-group offer,
and its layers then go in GROUP frames instead of KV frames.
GROUP announces N layers whose payloads come over the process group as one message (`layer`
holds N): its payload is N entries of `16 bytes transfer id | u32 layer | u64 num_bytes |
16 bytes tag` (the tag over the entry's first 28 bytes), and the layers' bytes move as one
message, concatenated in entry order. Dtype and shape are the ticket's (the sender checked
them), so an entry is 44 bytes, not an 88-byte header. BEGIN (no payload, zero transfer id) says a run of layers starts on a PAIR connection: its receiver
watches the connection closely from then on (kv_transfer/receiver.py `WATCH_S`).
The `ipc` connector writes the blocks in place (ipc_sender.py) and sends only frames without
payload bytes for the layers: CLAIM (no payload) asks to write a transfer's blocks, and the
receiver answers on the same connection with GRANT or DENY (no payload, tagged under the same
ticket's secret); LANDED ends a transfer whose writes have all run (its payload is DONE's, with a
summary over zero checksums).
Nothing here is ever unpickled: the receiver checks the header against its ticket, then reads
plain numbers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import crc32c as _crc32c

from . import proof
from .proof import NO_TAG, TAG_BYTES

MAGIC = b"PDKV"
VERSION = 2
MAX_NDIM = 6
HEADER = struct.Struct("<4sHBB16sIB3x6IQI16sI")
HEADER_SIZE = HEADER.size  # 88
SIGNED_SIZE = HEADER_SIZE - TAG_BYTES - 4  # what a header's tag covers: the bytes before it
DONE = struct.Struct("<III")
GROUP_ENTRY = struct.Struct("<16sIQ16s")  # transfer id, layer, num_bytes, tag
ENTRY_SIGNED_SIZE = GROUP_ENTRY.size - TAG_BYTES
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_GROUP = 256  # layers one GROUP frame may announce


class FrameType(enum.IntEnum):
    KV = 1
    DONE = 2
    ABORT = 3
    PAIR = 4  # the nccl connector: payloads of this connection go over a process group
    GROUP = 5  # the nccl connector: `layer` layers whose payloads move as one group
    BEGIN = 6  # the nccl connector: a run of layers starts (no payload)
    CLAIM = 7  # the ipc connector: may this sender write the transfer's blocks in place?
    GRANT = 8  # the receiver's answer: yes (until its LANDED or ABORT)
    DENY = 9  # the receiver's answer: no (nobody expects the transfer any more)
    LANDED = 10  # the ipc connector: the writes of every layer have run (DONE's payload)


class FrameError(ValueError):
    """A header that is not a valid pdserve KV frame (or does not match its ticket)."""


def checksum(data, value: int = 0) -> int:
    """CRC32C (hardware accelerated, releases the GIL on large buffers)."""
    return _crc32c.crc32c(data, value)


@dataclass(frozen=True)
class FrameHeader:
    type: FrameType
    transfer_id: bytes  # 16 bytes
    layer: int = 0
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    num_bytes: int = 0
    payload_checksum: int = 0
    tag: bytes = NO_TAG
    signed: bytes = field(default=b"", compare=False, repr=False)  # the bytes `tag` covers (unpack)

    def pack(self, secret: bytes = b"") -> bytes:
        """The header, tagged under `secret` (a ticket's) when one is given."""
        if len(self.shape) > MAX_NDIM:
            raise FrameError(f"shape {self.shape} has more than {MAX_NDIM} dimensions")
        dims = tuple(self.shape) + (0,) * (MAX_NDIM - len(self.shape))
        dtype = DTYPE_CODES[self.dtype] if self.dtype else 0
        body = HEADER.pack(MAGIC, VERSION, self.type, dtype, self.transfer_id, self.layer,
                           len(self.shape), *dims, self.num_bytes, self.payload_checksum, NO_TAG, 0)
        signed = body[:SIGNED_SIZE]
        body = signed + (proof.tag(secret, signed) if secret else self.tag)
        return body + struct.pack("<I", checksum(body))

    def proven_by(self, secret: bytes) -> bool:
        """Whether this (unpacked) header's tag is the one `secret` makes."""
        return proof.proves(secret, self.signed, self.tag)

    @classmethod
    def unpack(cls, data: bytes) -> "FrameHeader":
        """Parses and checks a header; raises FrameError on anything malformed."""
        if len(data) != HEADER_SIZE:
            raise FrameError(f"header of {len(data)} bytes, expected {HEADER_SIZE}")
        (magic, version, type_, dtype, transfer_id, layer, ndim, *rest) = HEADER.unpack(data)
        dims, (num_bytes, payload_checksum, given_tag, header_checksum) = rest[:MAX_NDIM], rest[MAX_NDIM:]
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}")
        if checksum(data[:-4]) != header_checksum:
            raise FrameError("header checksum mismatch")
        if version != VERSION:
            raise FrameError(f"unsupported frame version {version}")
        if type_ not in FrameType._value2member_map_:
            raise FrameError(f"unknown frame type {type_}")
        if ndim > MAX_NDIM or (dtype and dtype not in DTYPE_NAMES):
            raise FrameError(f"bad ndim {ndim} or dtype code {dtype}")
        return cls(FrameType(type_), transfer_id, layer, DTYPE_NAMES.get(dtype),
                   tuple(dims[:ndim]), num_bytes, payload_checksum, given_tag, data[:SIGNED_SIZE])


class GroupEntry(NamedTuple):
    """One layer of one transfer in a GROUP frame."""

    transfer_id: bytes
    layer: int
    num_bytes: int
    tag: bytes = NO_TAG

    def proven_by(self, secret: bytes) -> bool:
        return proof.proves(secret, GROUP_ENTRY.pack(*self)[:ENTRY_SIGNED_SIZE], self.tag)


def kv_frame(transfer_id: bytes, layer: int, dtype: str, shape: tuple[int, ...], payload,
             secret: bytes = b"") -> bytes:
    """The header of a KV frame for `payload` (a bytes-like object of the whole layer)."""
    nbytes = memoryview(payload).nbytes
    return FrameHeader(FrameType.KV, transfer_id, layer, dtype, tuple(shape), nbytes,
                       checksum(payload)).pack(secret)


def done_frame(transfer_id: bytes, first_token_id: int, num_layers: int, summary: int,
               secret: bytes = b"", kind: FrameType = FrameType.DONE) -> bytes:
    """A whole DONE (or LANDED) frame: header and its 12-byte payload."""
    payload = DONE.pack(first_token_id, num_layers, summary)
    header = FrameHeader(kind, transfer_id, num_bytes=len(payload),
                         payload_checksum=checksum(payload)).pack(secret)
    return header + payload


def pair_frame(offer: bytes, transfer_id: bytes = bytes(16), secret: bytes = b"") -> bytes:
    """A PAIR frame, proven by the ticket of the transfer that opens the connection."""
    header = FrameHeader(FrameType.PAIR, transfer_id, num_bytes=len(offer), payload_checksum=checksum(offer))
    return header.pack(secret) + offer


def group_frame(entries: list[tuple[bytes, int, int, bytes]]) -> bytes:
    """A whole GROUP frame for `entries`: (transfer id, layer, num_bytes, its ticket's secret)
    each; every entry tagged under its secret."""
    assert 0 < len(entries) <= MAX_GROUP, len(entries)
    signed = [struct.pack("<16sIQ", transfer_id, layer, num_bytes) for transfer_id, layer, num_bytes, _ in entries]
    payload = b"".join(part + (proof.tag(entry[3], part) if entry[3] else NO_TAG)
                       for part, entry in zip(signed, entries))
    header = FrameHeader(FrameType.GROUP, bytes(16), layer=len(entries), num_bytes=len(payload),
                         payload_checksum=checksum(payload))
    return header.pack() + payload


def group_entries(header: FrameHeader, payload) -> list[GroupEntry]:
    """The entries of a GROUP frame's payload; raises FrameError on a bad count or checksum."""
    if not 0 < header.layer <= MAX_GROUP or header.num_bytes != header.layer * GROUP_ENTRY.size:
        raise FrameError(f"GROUP frame of {header.layer} layers and {header.num_bytes} bytes")
    if checksum(payload) != header.payload_checksum:
        raise FrameError("checksum mismatch in GROUP frame")
    return [GroupEntry(*entry) for entry in GROUP_ENTRY.iter_unpack(payload)]


BEGIN_FRAME = FrameHeader(FrameType.BEGIN, bytes(16)).pack()


def bare_frame(kind: FrameType, transfer_id: bytes, secret: bytes = b"") -> bytes:
    """A frame of a transfer without payload: ABORT, CLAIM, GRANT, DENY."""
    return FrameHeader(kind, transfer_id).pack(secret)


def abort_frame(transfer_id: bytes, secret: bytes = b"") -> bytes:
    return bare_frame(FrameType.ABORT, transfer_id, secret)


def summary_checksum(layer_checksums: list[int]) -> int:
    """What the DONE frame carries: a CRC32C over the KV frames' checksums in layer order."""
    return checksum(struct.pack(f"<{len(layer_checksums)}I", *layer_checksums))
