"""The KV connector over TLS (service/tls.py gives the contexts): transfers land byte-exact on
one connection after another; a sender that speaks plain text to a TLS receiver, or checks a
name the certificate lacks, fails its transfer at once instead of hanging; a sender tells
TLS records without data (session tickets) from the receiver closing the connection."""

import socket
import ssl
import threading

import pytest
import trustme

from pdserve.kv_transfer.receiver import KVSocketReceiver
from pdserve.kv_transfer.sockets import ClientTls, peer_closed, readable
from pdserve.kv_transfer.tcp_sender import TcpKVSender

from .test_kv_connectors import wait_until
from .test_kv_transfer import Waiter, assert_next_transfer_lands, make_caches, make_ticket, push, random_layers


@pytest.fixture(scope="module")
def contexts():
    """(CA, server context, client context); the server's sends TLS 1.3 session tickets, as
    Python's default does (service/tls.py turns them off: one reason fewer to read a socket)."""
    ca = trustme.CA()
    server, client = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), ssl.create_default_context()
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(client)
    return ca, server, client


def test_transfers_land_over_tls(contexts):
    _, server, client = contexts
    caches = make_caches()
    receiver, sender = KVSocketReceiver(caches, tls=server), TcpKVSender(tls=ClientTls(client))
    try:
        for block_ids in ([1, 2, 3], [4], [5, 6]):  # one connection, kept between transfers
            assert_next_transfer_lands(caches, receiver, sender, block_ids)
        assert receiver.num_connections == 1 and receiver.num_bad_connections == 0
    finally:
        sender.close()
        receiver.close()


def test_a_plain_text_sender_is_hung_up_on(contexts):
    """Its frames are no TLS handshake: the receiver closes the connection and lands nothing
    (the transfer then fails by its deadline, as any that never arrives)."""
    _, server, _ = contexts
    caches = make_caches()
    receiver, sender = KVSocketReceiver(caches, tls=server), TcpKVSender()
    try:
        ticket, waiter = make_ticket(receiver, [1, 2]), Waiter()
        receiver.expect(ticket, waiter)
        push(sender, ticket, random_layers(ticket))
        assert wait_until(lambda: receiver.num_bad_connections == 1 and receiver.num_connections == 0)
        assert waiter.result is None and receiver.num_bytes_received == 0
    finally:
        sender.close()
        receiver.close()


def test_a_sender_checking_another_name_fails_its_transfer(contexts):
    _, server, client = contexts
    receiver = KVSocketReceiver(make_caches(), tls=server)
    sender = TcpKVSender(tls=ClientTls(client, "someone.else"))
    try:
        ticket = make_ticket(receiver, [1, 2])
        receiver.expect(ticket, Waiter())
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            push(sender, ticket, random_layers(ticket)).result(timeout=30)
    finally:
        sender.close()
        receiver.close()


def test_session_tickets_are_not_a_close(contexts):
    _, server, client = contexts
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        sock, _ = listener.accept()
        accepted.append(server.wrap_socket(sock, server_side=True))

    thread = threading.Thread(target=accept)
    thread.start()
    sock = client.wrap_socket(socket.create_connection(listener.getsockname(), timeout=10), server_hostname="127.0.0.1")
    thread.join(10)
    assert wait_until(lambda: readable(sock))  # the session tickets came
    assert not peer_closed(sock)
    accepted[0].close()
    assert wait_until(lambda: peer_closed(sock))
    sock.close()
    listener.close()
