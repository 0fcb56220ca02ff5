"""The `ipc` connector on CPU, where a decode node's pool lives in a memfd that a sender on the
same host maps (on CUDA the same code opens a CUDA IPC handle: tests/integration/test_gpu_pipeline.py):
the layers land in the reserved blocks written by the sender itself, a pool it cannot open goes
over TCP, and the blocks of a transfer that a sender may still write are freed only once it is
done with them (its ABORT, or its process gone), never while it could write. The oracle: the
tensors pushed, compared with the receiver's cache; a sender in its own process where it dies."""

import dataclasses
import json
import subprocess
import sys
import threading

import pytest
import torch

from pdserve.engine.kv_pool import allocate_kv_caches
from pdserve.kv_transfer.connector import TransferError
from pdserve.kv_transfer.receiver import KVSocketReceiver
from pdserve.kv_transfer.shared_pool import SharedPools

from .kv_peer import layer_data, make_sender, ticket_to_json
from .test_kv_connectors import assert_all_landed, assert_carries, expect_and_push, wait_until
from .test_kv_transfer import (BLOCK_SIZE, HEAD_DIM, KV_HEADS, NUM_BLOCKS, NUM_LAYERS, Waiter, assert_landed,
                               make_ticket, push, random_layers)


def shared_receiver(dtype=torch.float32) -> KVSocketReceiver:
    caches = allocate_kv_caches(NUM_LAYERS, (BLOCK_SIZE, KV_HEADS, HEAD_DIM), NUM_BLOCKS, dtype,
                                torch.device("cpu"), shared=True)
    return KVSocketReceiver(caches, ipc=True)


@pytest.fixture
def receiver():
    receiver = shared_receiver()
    yield receiver
    receiver.close()


def ipc_ticket(receiver, block_ids, dtype="float32", descriptor=None):
    ticket = make_ticket(receiver, block_ids, dtype, connector="ipc")
    return dataclasses.replace(ticket, ipc=receiver.ipc_descriptor if descriptor is None else descriptor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfers_written_in_place_land_in_reserved_blocks(dtype):
    receiver, sender = shared_receiver(dtype), make_sender("ipc")
    try:
        name = str(dtype).removeprefix("torch.")
        tickets = [ipc_ticket(receiver, ids, name) for ids in ([3, 9, 4], [0], list(range(10, 30)))]
        layers = [random_layers(t, dtype) for t in tickets]
        waiters, futures = expect_and_push(receiver, sender, tickets, layers)
        assert_all_landed(receiver, tickets, layers, waiters, futures)
        for t, w in zip(tickets, waiters):  # written in place, and what moved is counted
            assert w.result.in_place and w.result.num_bytes >= NUM_LAYERS * t.layer_bytes
        untouched = torch.ones(NUM_BLOCKS, dtype=torch.bool)
        untouched[[b for t in tickets for b in t.block_ids]] = False
        assert all(not k[untouched].any() and not v[untouched].any() for k, v in receiver.kv_caches)
        assert sender.num_in_place == 3 and len(receiver.claims) == 0
    finally:
        sender.close()
        receiver.close()


def test_a_pool_the_sender_cannot_open_goes_over_tcp(receiver):
    """Another host's pool (its boot id differs), and a pool not in shared memory at all: the
    same tickets land, over TCP frames."""
    elsewhere = json.loads(receiver.ipc_descriptor)
    elsewhere["boot_id"] = "another-host"
    plain = KVSocketReceiver(receiver.kv_caches)  # no descriptor to offer
    assert plain.ipc_descriptor == b""
    sender = make_sender("ipc")
    try:
        for r, descriptor in ((receiver, json.dumps(elsewhere).encode()), (plain, b"")):
            t, waiter = ipc_ticket(r, [5, 6], descriptor=descriptor), Waiter()
            r.expect(t, waiter)
            layers = random_layers(t)
            push(sender, t, layers).result(10)
            result = waiter.wait()
            assert result.ok and not result.in_place
            assert_landed(r.kv_caches, t, layers)
        assert sender.num_in_place == 0
    finally:
        sender.close()
        plain.close()


def test_a_forgotten_transfer_is_freed_only_once_its_writer_is_done(receiver):
    """The request is cancelled while the sender holds its claim: the blocks' free waits for
    the sender's ABORT (sent once its writes have run); the next transfer still lands."""
    sender = make_sender("ipc")
    gone, freed = ipc_ticket(receiver, [1, 2]), threading.Event()
    receiver.expect(gone, Waiter())
    layers = random_layers(gone)
    sender.send_layer(gone, 0, layers[0].clone())
    assert wait_until(lambda: receiver.kv_caches[0][0][1].any())  # claimed, and layer 0 written
    receiver.forget(gone.transfer_id, then=freed.set)
    assert not freed.is_set()  # the sender may still write: the blocks stay its own
    sender.send_layer(gone, 1, layers[1].clone())
    sender.abort(gone)
    assert freed.wait(10) and len(receiver.claims) == 0
    assert_carries(receiver, sender, ipc_ticket(receiver, [7, 8]))
    sender.close()


def test_a_transfer_forgotten_before_its_claim_is_freed_at_once_and_never_written(receiver):
    """Its CLAIM is DENYed (here on a connection an earlier transfer proved; on a fresh one the
    claim proves itself with the ticket that just ended)."""
    sender = make_sender("ipc")
    first = ipc_ticket(receiver, [9])
    receiver.expect(first, Waiter())
    push(sender, first, random_layers(first)).result(10)
    gone, freed = ipc_ticket(receiver, [3, 4]), threading.Event()
    receiver.expect(gone, Waiter())
    receiver.forget(gone.transfer_id, then=freed.set)
    assert freed.is_set()  # nobody holds a claim: free at once
    with pytest.raises(TransferError, match="does not expect"):  # its CLAIM is DENYed
        push(sender, gone, random_layers(gone)).result(10)
    assert not receiver.kv_caches[0][0][[3, 4]].any()  # and nothing was written
    assert len(receiver.claims) == 0
    sender.close()


def test_a_writer_that_dies_midway_ends_its_claim(receiver):
    """A sender process killed after two layers: the transfer fails, and the blocks' free
    waits only the grace after its connection closed."""
    dead, waiter, freed = ipc_ticket(receiver, [1, 2, 3]), Waiter(), threading.Event()
    receiver.expect(dead, waiter)
    peer = subprocess.run([sys.executable, "-m", "tests.unit.kv_peer", "send", "ipc", ticket_to_json(dead), "2"],
                          capture_output=True, timeout=60)
    assert peer.returncode == 17, peer.stderr.decode()[-2000:]
    result = waiter.wait()
    assert not result.ok and "closed mid-transfer" in result.error
    for layer in range(2):  # written in place by the other process before it died
        assert torch.equal(receiver.kv_caches[layer][0][[1, 2, 3]], layer_data(dead, layer)[0])
    receiver.forget(dead.transfer_id, then=freed.set)
    assert freed.wait(10) and len(receiver.claims) == 0


def test_a_pool_stays_mapped_only_while_its_node_serves_the_endpoint(receiver):
    """A mapping keeps a pool's memory alive after its node died: a sender drops the pool
    when the endpoint names another (the node restarted) and when its connection there ends."""
    restarted = shared_receiver()
    pools = SharedPools(torch.device("cpu"))
    first = pools.open(receiver.endpoint, receiver.ipc_descriptor)
    second = pools.open(receiver.endpoint, restarted.ipc_descriptor)
    assert second.data_ptr() != first.data_ptr() and receiver.endpoint in pools
    restarted.close()
    sender = make_sender("ipc")
    t = ipc_ticket(receiver, [2])
    receiver.expect(t, Waiter())
    push(sender, t, random_layers(t)).result(10)
    assert receiver.endpoint in sender.pools
    receiver.close()  # the decode node goes away: the sender's next transfer there fails
    with pytest.raises(ConnectionError):
        push(sender, ipc_ticket(receiver, [3]), random_layers(t)).result(20)
    assert receiver.endpoint not in sender.pools
    sender.close()
