"""Socket helpers of the KV connectors: dialling (TLS optional), tuning, endpoints, exact and
checksummed reads, a sender's look for a closed peer, and a reader's close watch on a
connection that is expecting frames soon."""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import NamedTuple

from .frame import checksum

SOCKET_BUFFER = 4 << 20
CHECKSUM_CHUNK = 128 << 10  # a payload is checksummed as each chunk lands, still in the core's L2


class ClientTls(NamedTuple):
    """How a KV sender dials receivers over TLS (service/tls.py makes one)."""

    context: ssl.SSLContext
    server_name: str | None = None  # the name the receiver's certificate must carry (None: its host)


def dial(endpoint: str, timeout: float, tls: ClientTls | None = None) -> socket.socket:
    """A tuned connection to `endpoint` (host:port), TLS when `tls`; `timeout` bounds the
    connect and the handshake, and stays the socket's timeout."""
    host, port = split_endpoint(endpoint)
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is not None:
        try:
            sock = tls.context.wrap_socket(sock, server_hostname=tls.server_name or host)
        except BaseException:
            sock.close()
            raise
    tune_socket(sock)
    return sock


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"kv endpoint must be host:port, got {endpoint!r}")
    return host.strip("[]"), int(port)


def recv_checksummed(conn: socket.socket, view: memoryview, value: int = 0) -> int:
    """Fills `view` from the socket (EOF is an error) and returns the CRC32C of its bytes,
    continued from `value`. Each chunk is summed right after it lands, while it is still in
    the core's cache (docs/architecture.md, "Measured figures behind the connectors")."""
    for start in range(0, len(view), CHECKSUM_CHUNK):
        part = view[start:start + CHECKSUM_CHUNK]
        recv_exact(conn, part, eof_ok=False)
        value = checksum(part, value)
    return value


def recv_exact(conn: socket.socket, view: memoryview, eof_ok: bool = True):
    """Fills `view` from the socket. None on a clean EOF before the first byte (if eof_ok)."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0 and eof_ok:
                return None
            raise ConnectionError(f"connection closed after {got} of {len(view)} bytes")
        got += n
    return view


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer of a connection that never writes to us closed (or reset) it: anything
    readable means so. Over TLS, records without data (a session ticket) are not a close."""
    if not readable(sock):
        return False
    if not isinstance(sock, ssl.SSLSocket):
        return True
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def readable(sock: socket.socket) -> bool:
    """Whether a read from `sock` would not block: bytes, EOF or an error are waiting. (poll,
    not select: select refuses descriptors past 1023, which a busy node's sockets reach.)"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def await_readable(sock: socket.socket, until: float, poll_s: float) -> None:
    """Looks at `sock` every `poll_s` until it is readable or time.monotonic() passes `until`,
    then returns (the caller's blocking read follows). A reader that sleeps in recv instead is
    woken several times later after a long sleep than a polling one (docs/architecture.md,
    "Measured figures behind the connectors"); the calling thread's timer slack should be
    tight (kv_transfer/pair.py `tight_timer_slack`)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes wait in the TLS layer, where poll does not look
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while time.monotonic() < until:
        if poller.poll(0):
            return
        time.sleep(poll_s)
