"""The nccl connector's own parts (on CPU: gloo, the same code): how the caller posts the
layers it hands over (at once, in large groups, or left for the next call), the BEGIN frame
that wakes the receiver, how a group's views are joined and its rows found, and the pool
layout the receiver needs. The contract it shares with `tcp`: test_kv_connectors.py."""

import itertools
import socket
import time

import numpy as np
import pytest
import torch

from pdserve.engine.kv_pool import LayerSlabs, pool_rows
from pdserve.kv_transfer.channel import DoneItem, LayersItem
from pdserve.kv_transfer.nccl import NcclKVSender, _joined
from pdserve.kv_transfer.nccl_receiver import _layer_span
from pdserve.kv_transfer.receiver import KVSocketReceiver

from .kv_peer import make_sender
from .test_kv_connectors import assert_all_landed, ticket, wait_until, warm_up
from .test_kv_transfer import Waiter, assert_landed, make_caches, push, random_layers


def test_layers_the_caller_leaves_queued_go_with_its_next_call_or_done(receiver, monkeypatch):
    """A caller that posts its own groups leaves the layers queued while the wire is busy and
    too few are queued (here: two calls in three), for its next call or, after the last, the
    DONE, which wakes the channel's thread: every layer lands once, none waits forever."""
    from pdserve.kv_transfer.nccl import PairChannel
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")
        decisions = itertools.cycle([False, False, True])
        monkeypatch.setattr(PairChannel, "_may_post_here", lambda self, pair: next(decisions))
        tickets = [ticket(receiver, [2 * i, 2 * i + 1], "nccl") for i in range(4)]
        layers = [random_layers(t) for t in tickets]
        waiters = [Waiter() for _ in tickets]
        for t, w in zip(tickets, waiters):
            receiver.expect(t, w)
        for t, ls in zip(tickets, layers):  # 12 calls: the last two leave their layers queued
            for layer, kv in enumerate(ls):
                sender.send_layers(layer, [(t, kv)])
        futures = [sender.finish(t, i) for i, t in enumerate(tickets)]
        assert_all_landed(receiver, tickets, layers, waiters, futures)
    finally:
        sender.close()


def test_a_group_sends_views_lying_back_to_back_as_one_view():
    gathered = torch.randn(7, 5)
    views, other = list(gathered.split([1, 4, 2])), torch.randn(3, 5)
    joined = _joined(views)
    assert joined.data_ptr() == gathered.data_ptr() and torch.equal(joined, gathered.view(-1))  # no copy
    mixed = [views[1], other, views[2], views[0]]
    assert torch.equal(_joined(mixed), torch.cat([t.view(-1) for t in mixed]))
    # back to back in memory but two storages (one view over both would pass the first's end)
    memory = np.arange(12, dtype=np.float32)
    apart = [torch.from_numpy(memory[:5]), torch.from_numpy(memory[5:])]
    assert apart[1].data_ptr() == apart[0].data_ptr() + 20
    assert torch.equal(_joined(apart), torch.arange(12, dtype=torch.float32))
    # a step's layers, gathered into slabs: a run of them is one view, across a slab's end two
    slabs = LayerSlabs(6, (3, 4), torch.float32, torch.device("cpu"), slab_bytes=4 * 3 * 4 * 4)
    pieces = [slabs.layer(layer)[i] for layer in range(6) for i in range(3)]
    for piece in pieces:
        piece.copy_(torch.randn(4))
    assert _joined(pieces[:12]).data_ptr() == pieces[0].data_ptr()
    assert torch.equal(_joined(pieces), torch.cat(pieces))


def test_the_caller_posts_layers_that_come_apart_at_once_and_a_burst_in_large_groups(receiver, monkeypatch):
    """`_may_post_here` on a real pair (gloo: no send stays in flight)."""
    from pdserve.kv_transfer import nccl
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")  # ends with a DONE
        channel = next(iter(sender._channels.values()))
        monkeypatch.setattr(nccl, "BURST_GAP_S", 0.0)  # every call comes apart
        assert not channel._may_post_here(channel.pair)  # the first layer after a DONE waits
        assert channel._may_post_here(channel.pair) and channel._may_post_here(channel.pair)
        with channel._lock:  # no other thread drains this stand-in DONE
            channel.put(DoneItem(None, 0), wake=False)
            channel._items.clear()
        assert not channel._may_post_here(channel.pair)  # a new run
        monkeypatch.setattr(nccl, "BURST_GAP_S", 3600.0)  # every call is in a burst
        assert not channel._may_post_here(channel.pair)
        with channel._lock:
            channel._items.append(LayersItem([], channel.post_bytes - 1))
            assert not channel._may_post_here(channel.pair)
            channel._items.append(LayersItem([], 1))
            assert channel._may_post_here(channel.pair)  # POST_BYTES queued
            channel._items.clear()
    finally:
        sender.close()


def test_a_run_of_layers_begins_with_a_frame_that_puts_the_receiver_on_watch(receiver, monkeypatch):
    """The first layer of a run waits for the next (`_may_post_here`); meanwhile a BEGIN frame
    wakes the receiver's reader, which then polls its socket (until `watch_until`) instead of
    sleeping in recv. The layers then land as usual."""
    from pdserve.kv_transfer import receiver as receiver_module
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")  # ends with a DONE
        [conn] = [c for c in receiver._connections if c.pair is not None]
        assert wait_until(lambda: conn.watch_until < time.monotonic())  # the reader sleeps in recv
        monkeypatch.setattr(receiver_module, "WATCH_S", 3600.0)
        t, waiter = ticket(receiver, [3, 4], "nccl"), Waiter()
        layers = random_layers(t)
        receiver.expect(t, waiter)
        sender.send_layers(0, [(t, layers[0])])
        assert wait_until(lambda: conn.watch_until > time.monotonic() + 1000)  # woken by BEGIN
        assert not receiver._tickets.get(t.transfer_key).layer_checksums  # layer 0 still queued
        for layer, kv in enumerate(layers[1:], 1):
            sender.send_layers(layer, [(t, kv)])
        assert_all_landed(receiver, [t], [layers], [waiter], [sender.finish(t, 0)])
    finally:
        sender.close()


def test_a_begin_frame_on_a_plain_connection_closes_it(receiver):
    """BEGIN belongs to pair connections: anywhere else the stream cannot be trusted."""
    from pdserve.kv_transfer.frame import BEGIN_FRAME
    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.sendall(BEGIN_FRAME)
        assert wait_until(lambda: receiver.num_bad_connections == 1)
        assert sock.recv(1) == b""  # closed by the receiver


def test_layer_span_finds_consecutive_layers_of_the_same_transfers():
    a, b, c = object(), object(), object()
    assert _layer_span([(a, 3), (b, 3), (a, 4), (b, 4)]) == (3, 2, [a, b])
    assert _layer_span([(a, 5), (a, 6), (a, 7)]) == (5, 3, [a])
    assert _layer_span([(a, 0)]) == (0, 1, [a])
    for group in ([(a, 3), (b, 3), (a, 4)],  # a layer cut short
                  [(a, 3), (b, 3), (b, 4), (a, 4)],  # another order
                  [(a, 3), (b, 3), (a, 5), (b, 5)],  # a layer skipped
                  [(a, 3), (b, 3), (a, 4), (c, 4)],  # other transfers
                  [(a, 3), (a, 5)]):
        assert _layer_span(group) is None, group


def test_pool_rows_address_each_block_of_each_layer():
    caches = make_caches()
    rows = pool_rows(caches)
    num_blocks = caches[0][0].shape[0]
    for layer, (k, v) in enumerate(caches):
        for kv, cache in enumerate((k, v)):
            rows[(2 * layer + kv) * num_blocks + 5] = 100 * layer + kv + 1
            assert torch.equal(cache[5].flatten(), rows[(2 * layer + kv) * num_blocks + 5])
    assert sum(int((c != 0).sum()) for pair in caches for c in pair) == 2 * len(caches) * rows.shape[1]  # nothing else
    assert pool_rows([(k.clone(), v.clone()) for k, v in caches]) is None  # separate tensors


def test_nccl_pair_refused_by_caches_that_are_not_one_pool():
    """The nccl receive needs the pool layout; separate tensors get a closed connection (so
    a failed transfer), and the TCP connector still serves them."""
    caches = [(k.clone(), v.clone()) for k, v in make_caches()]
    receiver = KVSocketReceiver(caches, pair_timeout=10)
    try:
        bad, waiter = ticket(receiver, [1, 2], "nccl"), Waiter()
        receiver.expect(bad, waiter)
        nccl = NcclKVSender("cpu", connect_timeout=5, transfer_timeout=2)  # its pair never forms
        with pytest.raises(ConnectionError):
            push(nccl, bad, random_layers(bad)).result(20)
        nccl.close()
        good = ticket(receiver, [3, 4], "tcp")
        layers, waiter = random_layers(good), Waiter()
        receiver.expect(good, waiter)
        tcp = make_sender("tcp")
        push(tcp, good, layers).result(10)
        assert waiter.wait().ok
        assert_landed(caches, good, layers)
        tcp.close()
    finally:
        receiver.close()
