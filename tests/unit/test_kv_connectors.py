"""The connector contract, for `tcp` and for `nccl` (on CPU: the same code over gloo): bytes
land exactly in the reserved blocks, transfers run concurrently, a peer that dies midway
fails its transfers within the timeout (real processes, killed), and pairs come and go with
their nodes. The oracle: the tensors pushed, compared with the receiver's cache."""

import itertools
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from engine.kv_pool import LayerSlabs, pool_rows
from kv_transfer.nccl import NcclKVSender, _joined, _layer_span
from kv_transfer.tcp import TcpKVReceiver

from .kv_peer import layer_data, make_sender, ticket_to_json
from .test_kv_transfer import (NUM_LAYERS, Waiter, assert_landed, make_caches, make_ticket, push,
                               random_layers)

CONNECTORS = ["tcp", "nccl", "nccl-from-caller"]  # the last: send_layers posts groups itself


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def receiver():
    caches = make_caches()
    receiver = TcpKVReceiver(caches, pair_timeout=10)
    yield receiver
    receiver.close()


def ticket(receiver, block_ids, connector, dtype="float32"):
    return make_ticket(receiver, block_ids, dtype, connector=connector)


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfers_land_in_reserved_blocks(connector, dtype):
    caches = make_caches(dtype)
    receiver, sender = TcpKVReceiver(caches), make_sender(connector)
    try:
        name = str(dtype).removeprefix("torch.")
        # scattered ids (staged and scattered), one block, one run of 20 (straight into the cache)
        tickets = [ticket(receiver, ids, connector, name) for ids in ([3, 9, 4], [0], list(range(10, 30)))]
        layers = [random_layers(t, dtype) for t in tickets]
        waiters = [Waiter() for _ in tickets]
        for t, w in zip(tickets, waiters):
            receiver.expect(t, w)
        futures = [push(sender, t, ls, first_token=i) for i, (t, ls) in enumerate(zip(tickets, layers))]
        for i, (t, ls, w, f) in enumerate(zip(tickets, layers, waiters, futures)):
            result = w.wait()
            assert result.ok and result.first_token_id == i, result
            assert f.result(10) == result.num_bytes
            assert_landed(caches, t, ls)
        untouched = torch.ones(len(caches[0][0]), dtype=torch.bool)
        untouched[[b for t in tickets for b in t.block_ids]] = False
        assert all(not k[untouched].any() and not v[untouched].any() for k, v in caches)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_concurrent_transfers_from_two_senders(connector, receiver):
    senders = [make_sender(connector), make_sender(connector)]
    tickets = [ticket(receiver, [2 * i, 2 * i + 1], connector) for i in range(16)]
    layers = [random_layers(t) for t in tickets]
    waiters = [Waiter() for _ in tickets]
    for t, w in zip(tickets, waiters):
        receiver.expect(t, w)

    def push_interleaved(sender, indices, batched):  # layer by layer across its transfers, as a batch would
        for layer in range(NUM_LAYERS):
            if batched:  # one call per layer with views of one gathered tensor, as a prefill node makes it
                gathered = torch.stack([layers[i][layer] for i in indices])
                sender.send_layers(layer, [(tickets[i], kv) for i, kv in zip(indices, gathered)])
                continue
            for i in indices:
                sender.send_layer(tickets[i], layer, layers[i][layer].clone())
        for i in indices:
            sender.finish(tickets[i], i)

    threads = [threading.Thread(target=push_interleaved, args=(s, range(k, 16, 2), k == 1))
               for k, s in enumerate(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (t, ls, w) in enumerate(zip(tickets, layers, waiters)):
        result = w.wait()
        assert result.ok and result.first_token_id == i, result
        assert_landed(receiver.kv_caches, t, ls)
    assert receiver.num_connections == 2
    assert receiver.num_pairs == (2 if connector != "tcp" else 0)
    for s in senders:
        s.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_sender_process_killed_midway_fails_the_ticket(connector, receiver):
    dead, alive = ticket(receiver, [1, 2, 3], connector), ticket(receiver, [8, 9], connector)
    waiter = Waiter()
    receiver.expect(dead, waiter)
    peer = subprocess.run([sys.executable, "-m", "tests.unit.kv_peer", "send", connector,
                           ticket_to_json(dead), "2"], capture_output=True, timeout=60)
    assert peer.returncode == 17, peer.stderr.decode()[-2000:]
    result = waiter.wait()  # two of three layers came, then the sender died
    assert not result.ok and "closed mid-transfer" in result.error
    for layer in range(2):  # what did arrive is what was sent
        kv = layer_data(dead, layer)
        assert torch.equal(receiver.kv_caches[layer][0][[1, 2, 3]], kv[0])
    # the receiver goes on serving others
    sender, waiter = make_sender(connector), Waiter()
    receiver.expect(alive, waiter)
    layers = random_layers(alive)
    push(sender, alive, layers)
    assert waiter.wait().ok
    assert_landed(receiver.kv_caches, alive, layers)
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_receiver_process_killed_fails_the_senders_transfers(connector):
    template = make_ticket(None, [0, 3], connector=connector)
    peer = subprocess.Popen([sys.executable, "-m", "tests.unit.kv_peer", "receive", ticket_to_json(template)],
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = peer.stdout.readline().strip()
        first = make_ticket(None, [0, 3], connector=connector, endpoint=endpoint,
                            transfer_id=template.transfer_id)
        sender = make_sender(connector)
        assert push(sender, first, random_layers(first)).result(20) > 0  # the pair works
        peer.kill()
        peer.wait()
        start = time.monotonic()
        later = make_ticket(None, [0, 3], connector=connector, endpoint=endpoint)
        with pytest.raises(ConnectionError):
            push(sender, later, random_layers(later)).result(20)
        assert time.monotonic() - start < 15
        sender.close()
    finally:
        peer.kill()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_pairs_come_and_go_with_their_nodes(connector):
    caches_a, caches_b = make_caches(), make_caches()
    a, b = TcpKVReceiver(caches_a), TcpKVReceiver(caches_b)
    sender = make_sender(connector)
    for receiver, caches in ((a, caches_a), (b, caches_b)):  # one sender, two decode nodes
        t, waiter = ticket(receiver, [4, 5], connector), Waiter()
        receiver.expect(t, waiter)
        layers = random_layers(t)
        push(sender, t, layers)
        assert waiter.wait().ok
        assert_landed(caches, t, layers)
    a.close()  # a decode node goes away: the sender's next transfer there fails, b's still land
    with pytest.raises(ConnectionError):
        push(sender, ticket(a, [1], connector), random_layers(ticket(a, [1], connector))).result(20)
    sender.close()  # the prefill node goes away: b drops its pair
    assert wait_until(lambda: b.num_connections == 0)
    restarted = make_sender(connector)  # and comes back: a new pair
    t, waiter = ticket(b, [6], connector), Waiter()
    b.expect(t, waiter)
    layers = random_layers(t)
    push(restarted, t, layers)
    assert waiter.wait().ok
    assert_landed(caches_b, t, layers)
    assert b.num_pairs == (1 if connector != "tcp" else 0)
    restarted.close()
    b.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_transfer_forgotten_midway_spares_the_next(connector, receiver):
    sender = make_sender(connector)
    gone, waiter_gone = ticket(receiver, [1, 2], connector), Waiter()
    receiver.expect(gone, waiter_gone)
    layers = random_layers(gone)
    sender.send_layer(gone, 0, layers[0].clone())
    assert wait_until(lambda: receiver.kv_caches[0][0][1].any())  # layer 0 landed
    receiver.forget(gone.transfer_id)  # the request was cancelled: its blocks get freed
    sender.send_layer(gone, 1, layers[1].clone())
    sender.abort(gone)
    nxt, waiter = ticket(receiver, [7, 8], connector), Waiter()
    receiver.expect(nxt, waiter)
    layers = random_layers(nxt)
    push(sender, nxt, layers).result(20)
    assert waiter.wait().ok and waiter_gone.result is None  # forgotten: never called back
    assert_landed(receiver.kv_caches, nxt, layers)
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_missing_layer_fails_at_done(connector, receiver):
    sender = make_sender(connector)
    t, waiter = ticket(receiver, [3], connector), Waiter()
    receiver.expect(t, waiter)
    sender.send_layer(t, 0, random_layers(t)[0])
    sender.finish(t, 1).result(10)
    assert not waiter.wait().ok and f"1 of {NUM_LAYERS} layers" in waiter.result.error
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("bad_layer", [0, NUM_LAYERS])  # sent twice (in one call: one group); beyond the ticket
def test_a_layer_the_ticket_does_not_take_fails_only_that_transfer(connector, receiver, bad_layer):
    """Checked against the ticket before any byte reaches a block (for nccl: while the group's
    bytes land in staging); the connection closes and the next transfer lands."""
    sender = make_sender(connector)
    bad, waiter = ticket(receiver, [5, 6], connector), Waiter()
    receiver.expect(bad, waiter)
    layers = random_layers(bad)
    if bad_layer == 0:  # layer 0 twice in one call: queued back to back, so (mostly) in one group
        sender.send_layers(0, [(bad, layers[0].clone()), (bad, layers[1].clone())])
    else:
        sender.send_layer(bad, 0, layers[0].clone())
        sender.send_layer(bad, bad_layer, layers[1].clone())
    sender.finish(bad, 1)
    result = waiter.wait()
    assert not result.ok and f"unexpected layer {bad_layer}" in result.error
    landed = receiver.kv_caches[0][0][[5, 6]]  # layer 0: its first copy or nothing, never a second
    assert torch.equal(landed, layers[0][0]) or not landed.any()
    # the ticket fails just before its connection closes: the next transfer goes on a new one
    assert wait_until(lambda: receiver.num_connections == 0)
    good, waiter = ticket(receiver, [7, 8], connector), Waiter()
    receiver.expect(good, waiter)
    layers = random_layers(good)
    push(sender, good, layers).result(20)
    assert waiter.wait().ok
    assert_landed(receiver.kv_caches, good, layers)
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_unreachable_receiver_fails_the_future(connector):
    receiver = TcpKVReceiver(make_caches())
    t = ticket(receiver, [1], connector)
    receiver.close()
    sender = make_sender(connector)
    with pytest.raises(ConnectionError):
        push(sender, t, random_layers(t)).result(10)
    sender.close()


def warm_up(receiver, sender, connector: str) -> None:
    """One whole transfer: the connection up, and the pair (a caller posts only on one that sent)."""
    warm = ticket(receiver, [20], connector)
    receiver.expect(warm, Waiter())
    push(sender, warm, random_layers(warm)).result(10)


def assert_all_landed(receiver, tickets, layers, waiters, futures) -> None:
    """Each transfer settled ok with its first token (its index) and its bytes in its blocks."""
    for i, (t, ls, w, f) in enumerate(zip(tickets, layers, waiters, futures)):
        result = w.wait()
        assert result.ok and result.first_token_id == i, result
        assert f.result(10) == result.num_bytes
        assert_landed(receiver.kv_caches, t, ls)


@pytest.mark.parametrize("connector", CONNECTORS)
def test_a_steps_layers_split_across_groups_all_land(connector, receiver, monkeypatch):
    """A prefill step hands each layer of all its prompts over in one call; a group that cannot
    take them all (3 layers, or bytes for 2 of these) leaves the rest for the next group:
    every layer lands once, in its own blocks, whichever thread posts the groups."""
    from kv_transfer.nccl import _PairChannel
    monkeypatch.setattr(_PairChannel, "max_batch", 3)
    tickets = [ticket(receiver, [2 * i, 2 * i + 1], connector) for i in range(5)]
    layers = [random_layers(t) for t in tickets]
    monkeypatch.setattr(_PairChannel, "max_batch_bytes", 2 * layers[0][0].nbytes)
    group_sizes, posters, done_posters = [], set(), set()
    send_group, send_done = _PairChannel._send_layers, _PairChannel._send_done

    def spy(self, group):
        group_sizes.append(len(group))
        posters.add(threading.current_thread() is threading.main_thread())
        send_group(self, group)

    def done_spy(self, out, first_token_id):
        done_posters.add(threading.current_thread() is threading.main_thread())
        send_done(self, out, first_token_id)
    monkeypatch.setattr(_PairChannel, "_send_layers", spy)
    monkeypatch.setattr(_PairChannel, "_send_done", done_spy)
    waiters = [Waiter() for _ in tickets]
    for t, w in zip(tickets, waiters):
        receiver.expect(t, w)
    sender = make_sender(connector)
    try:
        warm_up(receiver, sender, connector)
        group_sizes.clear()
        posters.clear()
        done_posters.clear()
        for layer in range(NUM_LAYERS):
            gathered = torch.stack([ls[layer] for ls in layers])  # one tensor a layer, a view per prompt
            sender.send_layers(layer, [(t, kv) for t, kv in zip(tickets, gathered)])
        futures = [sender.finish(t, i) for i, t in enumerate(tickets)]
        assert_all_landed(receiver, tickets, layers, waiters, futures)
        if connector != "tcp":
            assert sum(group_sizes) == len(tickets) * NUM_LAYERS and max(group_sizes) == 2, group_sizes
            # by the caller's thread (the channel's may win the lock now and then), or never;
            # the DONE frames too (with the layers still queued before them)
            assert (True in posters) == (connector == "nccl-from-caller"), posters
            assert (True in done_posters) == (connector == "nccl-from-caller"), done_posters
    finally:
        sender.close()


def test_layers_the_caller_leaves_queued_go_with_its_next_call_or_done(receiver, monkeypatch):
    """A caller that posts its own groups leaves the layers queued while the wire is busy and
    too few are queued (here: two calls in three), for its next call or, after the last, the
    DONE, which wakes the channel's thread: every layer lands once, none waits forever."""
    from kv_transfer.nccl import _PairChannel
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")
        decisions = itertools.cycle([False, False, True])
        monkeypatch.setattr(_PairChannel, "_may_post_here", lambda self, pair: next(decisions))
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
    import kv_transfer.nccl
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")  # ends with a DONE
        channel = next(iter(sender._channels.values()))
        monkeypatch.setattr(kv_transfer.nccl, "BURST_GAP_S", 0.0)  # every call comes apart
        assert not channel._may_post_here(channel.pair)  # the first layer after a DONE waits
        assert channel._may_post_here(channel.pair) and channel._may_post_here(channel.pair)
        with channel._lock:  # no other thread drains this stand-in DONE
            channel.put(("done", None, 0), wake=False)
            channel._items.clear()
        assert not channel._may_post_here(channel.pair)  # a new run
        monkeypatch.setattr(kv_transfer.nccl, "BURST_GAP_S", 3600.0)  # every call is in a burst
        assert not channel._may_post_here(channel.pair)
        with channel._lock:
            channel._items.append(("kv", [], channel.post_bytes - 1))
            assert not channel._may_post_here(channel.pair)
            channel._items.append(("kv", [], 1))
            assert channel._may_post_here(channel.pair)  # POST_BYTES queued
            channel._items.clear()
    finally:
        sender.close()


def test_a_run_of_layers_begins_with_a_frame_that_puts_the_receiver_on_watch(receiver, monkeypatch):
    """The first layer of a run waits for the next (`_may_post_here`); meanwhile a BEGIN frame
    wakes the receiver's reader, which then polls its socket (until `watch_until`) instead of
    sleeping in recv. The layers then land as usual."""
    import kv_transfer.tcp
    sender = make_sender("nccl-from-caller")
    try:
        warm_up(receiver, sender, "nccl")  # ends with a DONE
        [conn] = [c for c in receiver._connections if c.pair is not None]
        assert wait_until(lambda: conn.watch_until < time.monotonic())  # the reader sleeps in recv
        monkeypatch.setattr(kv_transfer.tcp, "WATCH_S", 3600.0)
        t, waiter = ticket(receiver, [3, 4], "nccl"), Waiter()
        layers = random_layers(t)
        receiver.expect(t, waiter)
        sender.send_layers(0, [(t, layers[0])])
        assert wait_until(lambda: conn.watch_until > time.monotonic() + 1000)  # woken by BEGIN
        assert not receiver._tickets[t.transfer_key].layer_checksums  # layer 0 still queued
        for layer, kv in enumerate(layers[1:], 1):
            sender.send_layers(layer, [(t, kv)])
        assert_all_landed(receiver, [t], [layers], [waiter], [sender.finish(t, 0)])
    finally:
        sender.close()


def test_a_begin_frame_on_a_plain_connection_closes_it(receiver):
    """BEGIN belongs to pair connections: anywhere else the stream cannot be trusted."""
    from kv_transfer.frame import BEGIN_FRAME
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
    receiver = TcpKVReceiver(caches, pair_timeout=10)
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
