"""Optional TLS on every port: the gRPC servers and the channels between components, the
gateway's HTTP, /metrics, and the KV receiver's sockets. Off unless set; set from the
environment, the same on every component (the Helm chart mounts a Secret and sets these):

    PDSERVE_TLS_CERT, PDSERVE_TLS_KEY  this component's certificate chain and key (PEM files):
                                       every port it listens on serves TLS with them
    PDSERVE_TLS_CA                     the CA that signed the cluster's certificates (PEM file):
                                       what a component dialling another checks it against
                                       (else the system's roots); alone, it makes a client
                                       (`pdserve generate`, the benchmarks) speak TLS
    PDSERVE_TLS_SERVER_NAME            the name every peer's certificate is checked against
                                       instead of the host dialled (nodes are dialled by the
                                       address they registered, often a pod IP)
    PDSERVE_TLS_KV=off                 leaves the KV connector's sockets plain text (its frames
                                       stay authenticated, not private): TLS costs the KV path
                                       throughput (benchmarks/kv_auth_cost.py --tls measures it)

TLS here keeps the wire private and proves the servers' identity; who may call is still the
cluster secret's and the API keys' business (service/cluster_auth.py), so a non-loopback bind
needs the secret with or without TLS. The nccl connector's process group (NCCL or gloo) has no
TLS: its control socket is TLS, its KV bytes are not; the tcp connector encrypts everything.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path

import grpc

from pdserve.kv_transfer.sockets import ClientTls

CERT_ENV, KEY_ENV, CA_ENV, SERVER_NAME_ENV, KV_ENV = ("PDSERVE_TLS_CERT", "PDSERVE_TLS_KEY", "PDSERVE_TLS_CA",
                                                      "PDSERVE_TLS_SERVER_NAME", "PDSERVE_TLS_KV")


@dataclasses.dataclass(frozen=True)
class Tls:
    cert_file: str = ""  # empty: this component serves plain text
    key_file: str = ""
    ca_file: str = ""  # empty: peers are checked against the system's roots
    server_name: str = ""  # empty: against the host dialled
    kv: bool = True  # the KV connector's sockets too

    @classmethod
    def from_env(cls) -> "Tls":
        kv = os.environ.get(KV_ENV, "on").lower()
        if kv not in ("on", "off"):
            raise ValueError(f"${KV_ENV} must be on or off, got {kv!r}")
        tls = cls(*(os.environ.get(name, "") for name in (CERT_ENV, KEY_ENV, CA_ENV, SERVER_NAME_ENV)), kv == "on")
        if bool(tls.cert_file) != bool(tls.key_file):
            raise ValueError(f"TLS needs both ${CERT_ENV} and ${KEY_ENV} (or neither)")
        for name in (tls.cert_file, tls.key_file, tls.ca_file):
            if name and not Path(name).is_file():
                raise ValueError(f"TLS: no file {name!r}")
        if tls.serves:
            tls.server_context()  # a key that does not fit its certificate fails here, at start
        return tls

    def env(self) -> dict[str, str]:
        """The environment that gives a child process this TLS set-up."""
        values = (self.cert_file, self.key_file, self.ca_file, self.server_name, "on" if self.kv else "off")
        return dict(zip((CERT_ENV, KEY_ENV, CA_ENV, SERVER_NAME_ENV, KV_ENV), values, strict=True))

    @property
    def serves(self) -> bool:
        """Whether this component's ports speak TLS."""
        return bool(self.cert_file)

    @property
    def dials(self) -> bool:
        """Whether this component speaks TLS to the others (a cluster is all TLS or none)."""
        return self.serves or bool(self.ca_file)

    @property
    def scheme(self) -> str:
        return "https" if self.serves else "http"

    # ---- gRPC ---------------------------------------------------------------------------

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if not self.serves:
            return server.add_insecure_port(address)
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return server.add_secure_port(address, grpc.ssl_server_credentials([pair]))

    def channel(self, address: str, options: list | None = None, aio: bool = True) -> grpc.Channel:
        """A channel to another component: TLS checked against the CA when `dials`."""
        grpc_ = grpc.aio if aio else grpc
        options = list(options or [])
        if not self.dials:
            return grpc_.insecure_channel(address, options=options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc_.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=options)

    # ---- sockets: HTTP, /metrics, KV ----------------------------------------------------

    def server_context(self) -> ssl.SSLContext | None:
        if not self.serves:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        # no session tickets: a KV sender reads its socket only to see the receiver close it
        context.num_tickets = 0
        return context

    def client_context(self) -> ssl.SSLContext | None:
        if not self.dials:
            return None
        return ssl.create_default_context(cafile=self.ca_file or None)

    def kv_server(self) -> ssl.SSLContext | None:
        """What a KV receiver wraps its connections in (None: plain text)."""
        return self.server_context() if self.kv else None

    def kv_client(self) -> ClientTls | None:
        """How a KV sender dials receivers (None: plain text)."""
        context = self.client_context() if self.kv else None
        return None if context is None else ClientTls(context, self.server_name or None)
