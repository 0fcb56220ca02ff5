"""Proofs on the KV channel: each ticket carries a secret of its own, made by the decode node
that issued it (`new_secret`); every frame that names a transfer carries a tag, a keyed
BLAKE2b of the frame's header under that secret, and every GROUP entry one of its own. The
receiver checks the tag before it reads or allocates anything for the frame, so a stranger who
reaches the KV port but holds no ticket can write nothing (kv_transfer/receiver.py).

The tag covers the header, which holds the payload's CRC32C: a payload changed on the way
fails its checksum. It does not make the payload secret, nor stop someone who can both read
and rewrite the traffic (a CRC is not a MAC): TLS is the answer there (docs/architecture.md, "Trust boundaries")."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TAG_BYTES = 16
SECRET_BYTES = 16
NO_TAG = bytes(TAG_BYTES)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def tag(secret: bytes, data) -> bytes:
    """What proves that the writer of `data` holds `secret`."""
    return hashlib.blake2b(data, key=secret, digest_size=TAG_BYTES).digest()


def proves(secret: bytes, data, given: bytes) -> bool:
    """Whether `given` is `data`'s tag under `secret` (constant time)."""
    return bool(secret) and hmac.compare_digest(tag(secret, data), given)
