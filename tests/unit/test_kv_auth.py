"""Who may write on the KV port (issue 32): only a sender that proves a live ticket's secret;
the receiver allocates nothing for a stranger, closes connections that prove nothing, caps how
many are open, and a decode node's ticket signature tells a prefill node where it may send."""

import dataclasses
import os
import socket
import threading
import tracemalloc

import pytest
import torch

from pdserve.engine.kv_pool import allocate_kv_caches
from pdserve.kv_transfer.frame import (HEADER_SIZE, FrameError, FrameHeader, FrameType, GroupEntry, group_entries,
                                       group_frame, kv_frame)
from pdserve.kv_transfer.incoming import Connection
from pdserve.kv_transfer.receiver import KVSocketReceiver
from pdserve.kv_transfer.tcp_sender import TcpKVSender
from pdserve.service.cluster_auth import ClusterAuth, check_exposure

from .test_kv_connectors import wait_until
from .test_kv_transfer import Waiter, assert_next_transfer_lands, closed_by_peer, make_caches, make_ticket


@pytest.fixture
def pair():
    caches = make_caches()
    receiver, sender = KVSocketReceiver(caches, proof_timeout=0.5, max_connections=4), TcpKVSender()
    yield caches, receiver, sender
    sender.close()
    receiver.close()


def test_a_frame_without_the_tickets_secret_is_refused_and_fails_nothing(pair):
    caches, receiver, sender = pair
    ticket, waiter = make_ticket(receiver, [1, 2]), Waiter()
    receiver.expect(ticket, waiter)
    layer = torch.randn(ticket.layer_shape).numpy().tobytes()
    for secret in (b"", os.urandom(16)):  # no tag, and a tag under another secret
        with socket.create_connection(("127.0.0.1", receiver.port)) as s:
            s.sendall(kv_frame(ticket.transfer_key, 0, "float32", ticket.layer_shape, layer, secret) + layer)
            assert closed_by_peer(s)
    assert waiter.result is None and receiver.num_bad_connections == 2  # the ticket still waits for its sender
    layers = [torch.randn(ticket.layer_shape) for _ in range(ticket.num_layers)]
    for i, kv in enumerate(layers):
        sender.send_layer(ticket, i, kv)
    sender.finish(ticket, 7)
    assert waiter.wait().ok and torch.equal(caches[0][0][torch.tensor([1, 2])], layers[0][0])


def test_headers_for_unknown_transfers_allocate_nothing():
    """The attack seen: 72 bytes naming an unknown transfer made the receiver allocate the
    frame's claimed size (up to two layers of cache) and hold it while the connection idled."""
    caches = allocate_kv_caches(2, (16, 4, 64), 256, torch.float32, torch.device("cpu"))  # 4 MiB a layer of K
    receiver = KVSocketReceiver(caches, proof_timeout=60)
    try:
        header = FrameHeader(FrameType.KV, os.urandom(16), 0, "float32", (2, 256, 16, 4, 64),
                             receiver.max_frame_bytes).pack()
        tracemalloc.start()
        sockets = [socket.create_connection(("127.0.0.1", receiver.port), timeout=10) for _ in range(20)]
        for s in sockets:
            s.sendall(header)
        assert all(closed_by_peer(s) for s in sockets)  # before any proven frame: closed at once
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < receiver.max_frame_bytes, peak
        assert wait_until(lambda: receiver.num_connections == 0)
    finally:
        receiver.close()


def test_connections_that_prove_nothing_are_closed_and_their_threads_end(pair):
    caches, receiver, sender = pair
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", receiver.port), timeout=10) for _ in range(3)]
    assert wait_until(lambda: receiver.num_connections == 3)
    assert all(closed_by_peer(s) for s in idle)  # after proof_timeout
    assert wait_until(lambda: receiver.num_connections == 0 and threading.active_count() <= threads_before)
    assert_next_transfer_lands(caches, receiver, sender, [3, 4])


def test_connections_past_the_cap_are_refused(pair):
    caches, receiver, sender = pair
    held = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(4)]
    assert wait_until(lambda: receiver.num_connections == 4)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as extra:
        assert closed_by_peer(extra)
    assert receiver.num_refused_connections == 1
    for s in held:
        s.close()
    assert wait_until(lambda: receiver.num_connections == 0)
    assert_next_transfer_lands(caches, receiver, sender, [5])


def test_group_entries_must_prove_their_tickets(pair):
    caches, receiver, sender = pair
    ticket = make_ticket(receiver, [6])
    receiver.expect(ticket, Waiter())
    conn = Connection(None, ("test", 0))
    good = GroupEntry(ticket.transfer_key, 0, ticket.layer_bytes)
    with pytest.raises(FrameError, match="not proven"):
        receiver.admit_entries(conn, [good])
    frame = group_frame([(ticket.transfer_key, 0, ticket.layer_bytes, ticket.secret)])
    (proven,) = group_entries(FrameHeader.unpack(frame[:HEADER_SIZE]), frame[HEADER_SIZE:])
    assert receiver.admit_entries(conn, [proven])[0].ticket is ticket


def test_ticket_signatures():
    auth, other = ClusterAuth("s" * 32), ClusterAuth("t" * 32)
    ticket = auth.sign(make_ticket(None, [1, 2], endpoint="10.0.0.1:9000"))
    assert auth.issued_by_member(ticket)
    assert not other.issued_by_member(ticket)  # another cluster's
    assert not auth.issued_by_member(dataclasses.replace(ticket, kv_endpoint="attacker:1"))
    assert not auth.issued_by_member(dataclasses.replace(ticket, secret=os.urandom(16)))
    assert not auth.issued_by_member(dataclasses.replace(ticket, signature=b""))
    assert ClusterAuth().issued_by_member(ticket)  # no secret: nothing to check (loopback only)


def test_an_exposed_bind_needs_a_cluster_secret():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, ClusterAuth(), "x")
    check_exposure("0.0.0.0", ClusterAuth("s" * 32), "x")
    with pytest.raises(ValueError, match="PDSERVE_CLUSTER_SECRET"):
        check_exposure("0.0.0.0", ClusterAuth(), "x")
    with pytest.raises(ValueError, match="at least"):
        os.environ["PDSERVE_CLUSTER_SECRET"] = "short"
        try:
            ClusterAuth.from_env()
        finally:
            del os.environ["PDSERVE_CLUSTER_SECRET"]


def test_channels_to_receivers_gone_quiet_are_retired():
    """A prefill node keeps a thread and a connection per decode node it sent to; those of
    nodes it no longer sends to (gone, or just quiet) end after `channel_idle_s`, and a later
    transfer to one of them opens a new channel."""
    threads_before = threading.active_count()
    receivers = [KVSocketReceiver(make_caches()) for _ in range(8)]
    sender = TcpKVSender(channel_idle_s=0.2)
    try:
        for receiver in receivers:
            assert_next_transfer_lands(receiver.kv_caches, receiver, sender, [1, 2])
        receivers.pop().close()  # one goes away for good
        assert wait_until(lambda: not sender._channels and receivers[0].num_connections == 0)
        assert_next_transfer_lands(receivers[0].kv_caches, receivers[0], sender, [3])
    finally:
        sender.close()
        for receiver in receivers:
            receiver.close()
    assert wait_until(lambda: threading.active_count() <= threads_before)
