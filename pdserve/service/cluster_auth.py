"""The cluster secret: how router, prefill and decode nodes (and the gateway) know each other.

One secret, the same in every component (`$PDSERVE_CLUSTER_SECRET`; `pdserve up` makes one,
the Helm chart keeps it in a Secret). With it:
- every call between components carries it in the `pdserve-cluster-secret` metadata, and the
  nodes' services refuse a call without it (UNAUTHENTICATED); health checks stay open, for
  Kubernetes probes;
- a decode node signs each ticket it issues (a keyed BLAKE2b under a key made from the secret),
  and a prefill node sends KV only to a ticket that a member of its cluster signed: nobody can
  make it connect to an endpoint of their choosing.

Without a secret the internal channels are open to whoever reaches them, so a component
refuses to bind anything but loopback without one (`check_exposure`). Comparisons are constant
time; the secret is never logged or put on a command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os

from pdserve.kv_transfer import proof
from pdserve.kv_transfer.connector import KVTicket

ENV = "PDSERVE_CLUSTER_SECRET"
METADATA_KEY = "pdserve-cluster-secret"
MIN_SECRET_CHARS = 16


@dataclasses.dataclass(frozen=True)
class ClusterAuth:
    secret: str = ""  # empty: no authentication between components (loopback only)

    @classmethod
    def from_env(cls) -> "ClusterAuth":
        secret = os.environ.get(ENV, "")
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"${ENV} must have at least {MIN_SECRET_CHARS} characters")
        return cls(secret)

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a call to another component carries."""
        return ((METADATA_KEY, self.secret),) if self.secret else ()

    def admits(self, metadata) -> bool:
        """Whether a call's invocation metadata carries the secret (always, without one)."""
        if not self.secret:
            return True
        given = next((value for key, value in metadata or () if key == METADATA_KEY), "")
        return hmac.compare_digest(str(given).encode(), self.secret.encode())

    @property
    def _signing_key(self) -> bytes:
        return hashlib.sha256(b"pdserve ticket signature\0" + self.secret.encode()).digest()

    def sign(self, ticket: KVTicket) -> KVTicket:
        if not self.secret:
            return ticket
        return dataclasses.replace(ticket, signature=proof.tag(self._signing_key, ticket.signed_part()))

    def issued_by_member(self, ticket: KVTicket) -> bool:
        """Whether a decode node of this cluster signed `ticket` (always, without a secret)."""
        return not self.secret or proof.proves(self._signing_key, ticket.signed_part(), ticket.signature)


def check_exposure(host: str, auth: ClusterAuth, what: str) -> None:
    """Refuses (ValueError) to bind a non-loopback `host` without a cluster secret."""
    if auth.enabled or _loopback(host):
        return
    raise ValueError(f"{what} would listen on {host} with no cluster secret: anyone who reaches it could "
                     f"use it. Set ${ENV} (the same value, {MIN_SECRET_CHARS}+ characters, on every "
                     f"component), or bind 127.0.0.1")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
