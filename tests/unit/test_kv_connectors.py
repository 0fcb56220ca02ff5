"""The connector contract, for `tcp` and for `nccl` (on CPU: the same code over gloo): bytes
land exactly in the reserved blocks, transfers run concurrently, a peer that dies midway
fails its transfers within the timeout (real processes, killed), and pairs come and go with
their nodes. The oracle: the tensors pushed, compared with the receiver's cache."""

import dataclasses
import subprocess
import sys
import threading
import time

import pytest
import torch

from pdserve.kv_transfer.receiver import KVSocketReceiver

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


def ticket(receiver, block_ids, connector, dtype="float32"):
    return make_ticket(receiver, block_ids, dtype, connector=connector)


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfers_land_in_reserved_blocks(connector, dtype):
    caches = make_caches(dtype)
    receiver, sender = KVSocketReceiver(caches), make_sender(connector)
    try:
        name = str(dtype).removeprefix("torch.")
        # scattered ids (staged and scattered), one block, one run of 20 (straight into the cache)
        tickets = [ticket(receiver, ids, connector, name) for ids in ([3, 9, 4], [0], list(range(10, 30)))]
        layers = [random_layers(t, dtype) for t in tickets]
        assert_all_landed(receiver, tickets, layers, *expect_and_push(receiver, sender, tickets, layers))
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
        first = dataclasses.replace(template, kv_endpoint=endpoint)  # its secret is the peer's ticket's
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
    a, b = KVSocketReceiver(caches_a), KVSocketReceiver(caches_b)
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
    assert_carries(receiver, sender, ticket(receiver, [7, 8], connector))
    assert waiter_gone.result is None  # forgotten: never called back
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_a_new_connection_that_opens_with_a_transfer_just_ended_still_carries_the_next(connector, receiver):
    """A sender (re)connects with the first item it has queued, which may belong to a transfer
    the receiver forgot a moment ago: that ticket's secret still proves the connection, so the
    nccl connector's PAIR is accepted (refused, the sender waited for a peer that never joined,
    up to its pair timeout of 10 s here, and every transfer behind it missed its deadline)."""
    sender = make_sender(connector)
    gone = ticket(receiver, [1, 2], connector)
    receiver.expect(gone, Waiter())
    receiver.forget(gone.transfer_id)  # cancelled before its first layer left
    start = time.monotonic()
    sender.send_layer(gone, 0, random_layers(gone)[0])
    assert_carries(receiver, sender, ticket(receiver, [7, 8], connector))
    assert time.monotonic() - start < 5
    assert not receiver.kv_caches[0][0][[1, 2]].any()  # the forgotten transfer's bytes were dropped
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
    assert_carries(receiver, sender, ticket(receiver, [7, 8], connector))
    sender.close()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_unreachable_receiver_fails_the_future(connector):
    receiver = KVSocketReceiver(make_caches())
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


def assert_carries(receiver, sender, t) -> None:
    """`t` expected and its layers pushed: it settles ok, its bytes in its blocks."""
    waiter, layers = Waiter(), random_layers(t)
    receiver.expect(t, waiter)
    push(sender, t, layers).result(20)
    assert waiter.wait().ok
    assert_landed(receiver.kv_caches, t, layers)


def expect_and_push(receiver, sender, tickets, layers) -> tuple[list, list]:
    """Each ticket expected, then its layers pushed with its index as the first token: the
    waiters and the senders' futures."""
    waiters = [Waiter() for _ in tickets]
    for t, w in zip(tickets, waiters):
        receiver.expect(t, w)
    return waiters, [push(sender, t, ls, first_token=i) for i, (t, ls) in enumerate(zip(tickets, layers))]


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
    from pdserve.kv_transfer.nccl import PairChannel
    monkeypatch.setattr(PairChannel, "max_batch", 3)
    tickets = [ticket(receiver, [2 * i, 2 * i + 1], connector) for i in range(5)]
    layers = [random_layers(t) for t in tickets]
    monkeypatch.setattr(PairChannel, "max_batch_bytes", 2 * layers[0][0].nbytes)
    group_sizes, posters, done_posters = [], set(), set()
    send_group, send_done = PairChannel.send_layers, PairChannel.send_done

    def spy(self, group):
        group_sizes.append(len(group))
        posters.add(threading.current_thread() is threading.main_thread())
        send_group(self, group)

    def done_spy(self, out, first_token_id):
        done_posters.add(threading.current_thread() is threading.main_thread())
        send_done(self, out, first_token_id)
    monkeypatch.setattr(PairChannel, "send_layers", spy)
    monkeypatch.setattr(PairChannel, "send_done", done_spy)
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
