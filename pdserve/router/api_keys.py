"""Client API keys, for the HTTP gateway and the router's gRPC API alike (torch-free).

A key goes as `Authorization: Bearer <key>` (HTTP header, or gRPC metadata `authorization`),
the scheme in any case. `--api-key` takes one key or several separated by commas; each is
compared in constant time. Without a key the API is open (to whoever reaches the port).

Prefix-cache isolation: by default every client shares the prefix cache, so one client's
time to first token can tell whether another sent the same prefix lately (the field's default,
as vLLM's; a client that wants its own sends `cache_salt`). `per-key` salts each key's cache
apart: requests made with different keys never share a cached block, whatever their salt.
"""

from __future__ import annotations

import hashlib
import hmac

CACHE_ISOLATION = ("shared", "per-key")


class ApiKeys:
    def __init__(self, keys: str | None = None, cache_isolation: str = "shared"):
        if cache_isolation not in CACHE_ISOLATION:
            raise ValueError(f"--cache-isolation must be one of {', '.join(CACHE_ISOLATION)}, got {cache_isolation!r}")
        self.keys = [k.strip().encode() for k in (keys or "").split(",") if k.strip()]
        self.cache_isolation = cache_isolation

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def valid(self, key: str | None) -> bool:
        """Whether `key` is one of the keys (every key compared: no early exit)."""
        given = (key or "").encode()
        return any([hmac.compare_digest(given, k) for k in self.keys])

    def cache_salt(self, salt: str, key: str | None) -> str:
        """The salt a request's blocks are hashed with: its own, and with per-key isolation a
        digest of the key it came with (never the key itself: salts reach the nodes and Redis)."""
        if self.cache_isolation != "per-key" or not key:
            return salt
        digest = hashlib.sha256(b"pdserve cache isolation\0" + key.encode()).hexdigest()[:32]
        return f"key:{digest}/{salt}"


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (the scheme in any case), or None."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def metadata_key(metadata) -> str | None:
    """The Bearer key in gRPC metadata (`authorization`), or None."""
    return bearer_key(next((value for name, value in metadata or () if name == "authorization"), None))
