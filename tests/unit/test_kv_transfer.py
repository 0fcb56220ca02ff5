"""What only the TCP connector does, on loopback: payloads straight off the socket or through a
buffer, corruption and malformed frames fail only their transfer, and random bytes do not
hurt the receiver. The contract both connectors keep: test_kv_connectors.py."""

import dataclasses
import os
import socket
import threading
import time
import uuid

import pytest
import torch

from pdserve.engine.kv_pool import allocate_kv_caches
from pdserve.kv_transfer.connector import KVTicket
from pdserve.kv_transfer.frame import (HEADER_SIZE, FrameError, FrameHeader, FrameType, group_entries, group_frame, kv_frame,
                               pair_frame)
from pdserve.kv_transfer.receiver import KVSocketReceiver
from pdserve.kv_transfer.tcp_sender import TcpKVSender

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 32, 4, 2, 8


class Waiter:
    def __init__(self):
        self.event, self.result = threading.Event(), None

    def __call__(self, result):
        assert self.result is None, "on_done called twice"
        self.result = result
        self.event.set()

    def wait(self):
        assert self.event.wait(10), "transfer never completed"
        return self.result


def make_caches(dtype=torch.float32):
    """As the engine allocates them: views of one pool."""
    return allocate_kv_caches(NUM_LAYERS, (BLOCK_SIZE, KV_HEADS, HEAD_DIM), NUM_BLOCKS, dtype, torch.device("cpu"))


def make_ticket(receiver, block_ids, dtype="float32", connector="tcp", endpoint=None, transfer_id=None):
    """`connector`: a name kv_peer.make_sender takes (nccl-from-caller is an nccl sender)."""
    return KVTicket(transfer_id or uuid.uuid4().hex, endpoint or (receiver.endpoint if receiver else ""),
                    tuple(block_ids), BLOCK_SIZE, NUM_LAYERS, KV_HEADS, HEAD_DIM, dtype,
                    time.time() + 30, "fp", connector.removesuffix("-from-caller"))


def push(sender, ticket, layers, first_token=7):
    for i, kv in enumerate(layers):
        sender.send_layer(ticket, i, kv.clone())
    return sender.finish(ticket, first_token)


def random_layers(ticket, dtype=torch.float32):
    return [torch.randn(ticket.layer_shape).to(dtype) for _ in range(ticket.num_layers)]


@pytest.fixture
def pair():
    caches = make_caches()
    receiver, sender = KVSocketReceiver(caches), TcpKVSender()
    yield caches, receiver, sender
    sender.close()
    receiver.close()


def closed_by_peer(sock) -> bool:
    """The receiver closed the connection (a reset when our bytes were still unread); False
    when it stays open past the socket's timeout (if it has one)."""
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionResetError, OSError):  # reset, or no longer connected at all
        return True


def assert_landed(caches, ticket, layers):
    ids = torch.tensor(ticket.block_ids)
    for (k, v), kv in zip(caches, layers):
        assert torch.equal(k[ids], kv[0]) and torch.equal(v[ids], kv[1])


def assert_next_transfer_lands(caches, receiver, sender, block_ids):
    """The receiver still serves: a new transfer into `block_ids` settles ok, byte-exact."""
    ticket, waiter = make_ticket(receiver, block_ids), Waiter()
    receiver.expect(ticket, waiter)
    layers = random_layers(ticket)
    push(sender, ticket, layers)
    assert waiter.wait().ok
    assert_landed(caches, ticket, layers)


def test_frame_header_round_trip_and_rejects():
    header = FrameHeader(FrameType.KV, os.urandom(16), 5, "bfloat16", (2, 3, 16, 4, 64), 1234, 99)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE and FrameHeader.unpack(packed) == header
    for i in (0, 10, 40, HEADER_SIZE - 1):  # any flipped byte is caught
        bad = bytearray(packed)
        bad[i] ^= 1
        with pytest.raises(FrameError):
            FrameHeader.unpack(bytes(bad))


def test_group_frame_round_trip_and_rejects():
    secret = os.urandom(16)
    entries = [(os.urandom(16), layer, 4096 * (layer + 1), secret) for layer in range(5)]
    frame = group_frame(entries)
    header = FrameHeader.unpack(frame[:HEADER_SIZE])
    assert header.type is FrameType.GROUP and header.layer == 5
    parsed = group_entries(header, frame[HEADER_SIZE:])
    assert [e[:3] for e in parsed] == [e[:3] for e in entries]
    assert all(e.proven_by(secret) and not e.proven_by(os.urandom(16)) for e in parsed)
    bad = bytearray(frame)
    bad[HEADER_SIZE + 20] ^= 1  # a layer number
    with pytest.raises(FrameError, match="checksum"):
        group_entries(header, bytes(bad[HEADER_SIZE:]))
    with pytest.raises(FrameError, match="4 layers"):  # the count does not fit the payload
        group_entries(dataclasses.replace(header, layer=4), frame[HEADER_SIZE:])


def test_readable_sees_bytes_and_eof_on_descriptors_past_1023():
    """The connectors look at sockets with poll: select refuses descriptors past 1023, which
    the sockets of a busy node reach."""
    import resource
    from pdserve.kv_transfer.sockets import readable
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2048)), hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1500))  # the limit must allow it: a test
    try:
        assert not readable(high)
        b.sendall(b"x")
        assert readable(high) and high.recv(1) == b"x"
        b.close()
        assert readable(high)  # EOF
    finally:
        high.close()
        a.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_ticket_must_fit_the_cache():
    receiver = KVSocketReceiver(make_caches(torch.float32))
    try:
        with pytest.raises(ValueError, match="bfloat16"):
            receiver.expect(make_ticket(receiver, [1], "bfloat16"), lambda result: None)
        with pytest.raises(ValueError, match="outside"):
            receiver.expect(make_ticket(receiver, [1, NUM_BLOCKS]), lambda result: None)
        with pytest.raises(ValueError, match=f"{NUM_LAYERS + 1} layers"):
            ticket = dataclasses.replace(make_ticket(receiver, [1]), num_layers=NUM_LAYERS + 1)
            receiver.expect(ticket, lambda result: None)
    finally:
        receiver.close()


@pytest.mark.parametrize("in_place", [True, False])  # False: the path of CUDA caches
def test_tcp_payloads_land_in_place_or_through_a_buffer(in_place):
    caches = make_caches()
    receiver, sender = KVSocketReceiver(caches, in_place=in_place), TcpKVSender()
    try:
        tickets = [make_ticket(receiver, ids) for ids in ([3, 9, 4], list(range(10, 30)))]
        layers = [random_layers(t) for t in tickets]
        waiters = [Waiter() for _ in tickets]
        for t, w in zip(tickets, waiters):
            receiver.expect(t, w)
        futures = [push(sender, t, ls) for t, ls in zip(tickets, layers)]
        for t, ls, w, f in zip(tickets, layers, waiters, futures):
            assert w.wait().ok
            assert f.result(10) == NUM_LAYERS * (HEADER_SIZE + t.layer_bytes) + HEADER_SIZE + 12
            assert_landed(caches, t, ls)
    finally:
        sender.close()
        receiver.close()


def test_corrupted_payload_fails_only_that_transfer(pair):
    caches, receiver, _ = pair
    sender = TcpKVSender(corrupt_transfers=1)
    bad, good = make_ticket(receiver, [1, 2]), make_ticket(receiver, [5, 6])
    w_bad, w_good = Waiter(), Waiter()
    receiver.expect(bad, w_bad)
    receiver.expect(good, w_good)
    push(sender, bad, random_layers(bad)).result(10)  # the sender cannot know
    layers = random_layers(good)
    push(sender, good, layers).result(10)
    assert not w_bad.wait().ok and "checksum" in w_bad.result.error
    assert w_good.wait().ok
    assert_landed(caches, good, layers)
    sender.close()


def test_mismatched_header_closes_connection_and_fails_transfer(pair):
    caches, receiver, sender = pair
    ticket = make_ticket(receiver, [1, 2])
    waiter = Waiter()
    receiver.expect(ticket, waiter)
    wrong = torch.zeros(2, 3, BLOCK_SIZE, KV_HEADS, HEAD_DIM)  # three blocks, the ticket has two
    payload = wrong.numpy().tobytes()
    with socket.create_connection(("127.0.0.1", receiver.port)) as s:
        s.sendall(kv_frame(ticket.transfer_key, 0, "float32", tuple(wrong.shape), payload, ticket.secret) + payload)
        assert closed_by_peer(s)
    assert not waiter.wait().ok and "does not match" in waiter.result.error
    assert_next_transfer_lands(caches, receiver, sender, [7])  # the receiver still serves others


def test_random_bytes_and_unknown_transfers_are_harmless(pair):
    caches, receiver, sender = pair
    for size in (10, HEADER_SIZE, 5000):
        with socket.create_connection(("127.0.0.1", receiver.port)) as s:
            try:
                s.sendall(os.urandom(size))
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the receiver already dropped the connection: what we check below
                pass
            assert closed_by_peer(s)
    # on a proven connection, a transfer nobody expects (any more) is read past and the next lands
    assert_next_transfer_lands(caches, receiver, sender, [5, 6])
    stray = make_ticket(receiver, [0, 1])
    push(sender, stray, random_layers(stray)).result(10)
    assert_next_transfer_lands(caches, receiver, sender, [4, 8])
    assert receiver.num_bad_connections == 3 and receiver.num_connections == 1


@pytest.mark.parametrize("frame", ["group", "pair"])
def test_frames_of_the_other_connector_out_of_place_close_only_their_connection(pair, frame):
    caches, receiver, sender = pair
    live = make_ticket(receiver, [9])
    receiver.expect(live, Waiter())
    frames = {"group": group_frame([(live.transfer_key, 0, 8, live.secret)] * 2),  # pair connections only
              "pair": pair_frame(b"nccl 127.0.0.1 notaport", live.transfer_key, live.secret)}  # does not parse
    bad_before = receiver.num_bad_connections
    with socket.create_connection(("127.0.0.1", receiver.port)) as s:
        s.sendall(frames[frame])
        assert closed_by_peer(s)
    assert receiver.num_bad_connections == bad_before + 1
    assert_next_transfer_lands(caches, receiver, sender, [2, 3])
