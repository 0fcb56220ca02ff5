"""The chained block hash: one pure, torch-free function shared by the router and the nodes.

    root = sha256(b"pdserve/v1" | model_fingerprint | u32 block_size | cache_salt)
    h[i] = sha256(h[i-1] | token_ids of block i as u32 little-endian)[:16]

Only full blocks are hashed. `cache_salt` (per tenant or API key) keeps one tenant's prefix
cache apart from another's: the same tokens under another salt hash differently.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

HASH_VERSION = b"pdserve/v1"
BLOCK_HASH_BYTES = 16


def root_hash(model_fingerprint: str, block_size: int, cache_salt: str | None = None) -> bytes:
    """The parent of block 0, binding the hash chain to model, block size and tenant."""
    salt = (cache_salt or "").encode()
    return hashlib.sha256(HASH_VERSION + model_fingerprint.encode() + struct.pack("<I", block_size)
                          + salt).digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of one full block given its parent's hash."""
    tokens = array("I", token_ids)  # u32; 4 bytes on every platform CPython supports
    if sys.byteorder == "big":
        tokens.byteswap()
    return hashlib.sha256(parent_hash + tokens.tobytes()).digest()[:BLOCK_HASH_BYTES]


def block_hashes(token_ids: Sequence[int], block_size: int, model_fingerprint: str,
                 cache_salt: str | None = None, parent_hash: bytes | None = None,
                 start_block: int = 0) -> list[bytes]:
    """Hashes of every full block of `token_ids`, from block `start_block` on.

    `parent_hash` is the hash of block `start_block - 1` (the root when start_block is 0),
    which lets a request extend its chain as it grows without rehashing earlier blocks.
    """
    parent = parent_hash if parent_hash is not None else root_hash(model_fingerprint, block_size,
                                                                   cache_salt)
    hashes = []
    for start in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes

