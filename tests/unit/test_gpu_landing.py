"""On a GPU: the receiver lands KV on a stream of its own, and calls a transfer done only once
its copies have run. So a decode step (on the engine's stream) that runs the moment the
request is admitted reads the KV that came, and a long decode step in flight does not hold a
landing back. Both fail if the receiver settled at DONE, or landed on the current stream."""

import threading

import pytest
import torch

from pdserve.engine.kv_pool import allocate_kv_caches
from pdserve.kv_transfer.receiver import KVSocketReceiver
from pdserve.kv_transfer.tcp_sender import TcpKVSender

from .test_kv_transfer import BLOCK_SIZE, HEAD_DIM, KV_HEADS, NUM_LAYERS, make_ticket, push, random_layers

pytestmark = pytest.mark.gpu
SLEEP_CYCLES = 2_000_000_000  # torch.cuda._sleep: about a second at H100/H200 clocks


@pytest.fixture
def receiver():
    device = torch.device("cuda:0")
    caches = allocate_kv_caches(NUM_LAYERS, (BLOCK_SIZE, KV_HEADS, HEAD_DIM), 64, torch.bfloat16, device)
    receiver = KVSocketReceiver(caches)
    yield receiver
    receiver.close()


def test_admitted_kv_is_never_read_before_it_landed(receiver):
    """The copy stream is busy for about a second before the frames come: a read on another
    stream at the callback sees the sent KV only if the callback waited for the copies."""
    ticket = make_ticket(receiver, [5, 9, 10, 40], "bfloat16")
    layers = random_layers(ticket, torch.bfloat16)
    seen, done = [], threading.Event()

    def on_done(result):  # as the decode node admits: the next step reads the blocks at once
        assert result.ok, result
        blocks = list(ticket.block_ids)
        seen.extend(torch.stack([k[blocks], v[blocks]]).cpu() for k, v in receiver.kv_caches)
        done.set()

    receiver.expect(ticket, on_done)
    with torch.cuda.stream(receiver.copy_stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    sender = TcpKVSender()
    try:
        push(sender, ticket, layers).result(30)
        assert done.wait(30)
    finally:
        sender.close()
    for got, want in zip(seen, layers):
        assert torch.equal(got, want)


def test_a_long_decode_step_does_not_hold_a_landing_back(receiver):
    """A second of work queued on the engine's stream (as a long decode step): the transfer
    lands and settles while it still runs."""
    ticket = make_ticket(receiver, [1, 2, 3], "bfloat16")
    settled = threading.Event()
    receiver.expect(ticket, lambda result: settled.set())
    torch.cuda._sleep(SLEEP_CYCLES)  # on this thread's current stream, as the engine's steps run
    step_done = torch.cuda.current_stream().record_event()
    sender = TcpKVSender()
    try:
        push(sender, ticket, random_layers(ticket, torch.bfloat16)).result(30)
        assert settled.wait(30)
        assert not step_done.query()  # the "decode step" is still running
    finally:
        sender.close()
