"""Failures on real processes: a corrupted KV transfer, a decode node killed or hung mid-stream,
the only decode node restarted, a decode node drained by SIGTERM. Every request still returns
the engine's exact tokens. Each test breaks a cluster of its own (one prefill and two decode
nodes, unless it says otherwise), so none depends on what another did."""

import concurrent.futures
import random
import signal
import time

import pytest

from pdserve.client import generate_request, stream
from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

from .serving import (GREEDY, all_blocks_free, generate, generate_killing_its_decode_node, health, node_stats,
                      running_decode, wait_for)

LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


def start_cluster(prefill_args=(), router_args=()) -> Cluster:
    return Cluster("dummy:tiny", num_prefill=1, num_decode=2,
                   node_args=["--num-kv-blocks", "160", "--drain-timeout-s", "60"], prefill_args=prefill_args,
                   router_args=["--policy", "round_robin", "--health-interval-s", "0.2", *router_args])


@pytest.fixture
def cluster():
    with start_cluster() as c:
        yield c


@pytest.fixture
def corrupting_cluster():
    """Its prefill node corrupts its first transfer's payload (a test hook)."""
    with start_cluster(["--kv-test-corrupt-transfers", "1"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return Engine(model="dummy:tiny", num_kv_blocks=512, max_model_len=2048)


def prompt(seed: int, n: int):
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def test_corrupted_transfer_is_caught_and_the_request_resumed(corrupting_cluster, reference):
    cluster, p = corrupting_cluster, prompt(0, 70)
    tokens, last, _ = generate(cluster.router_address, p)
    assert tokens == reference.generate([p], GREEDY)[0].token_ids
    assert last.timings.num_attempts == 2
    assert sum(node_stats(d).num_kv_transfer_failures for d in cluster.decode) == 1
    tokens, last, _ = generate(cluster.router_address, p)  # the hook fired once only
    assert last.timings.num_attempts == 1
    assert wait_for(lambda: all_blocks_free(cluster))


def test_decode_node_killed_mid_stream_resumes_without_gap_or_duplicate(cluster, reference):
    p = prompt(1, 50)
    want = reference.generate([p], LONG)[0].token_ids
    tokens, last, _ = generate_killing_its_decode_node(cluster, p, LONG)
    assert tokens == want
    assert last.timings.num_attempts == 2 and last.usage.completion_tokens == 300


def test_a_stream_whose_only_decode_node_restarts_waits_for_it_and_resumes(reference):
    """One decode node, killed mid-stream and restarted by its supervisor: the stream has
    nowhere to resume until it is back, waits for it (`--resume-wait-s`) and continues there,
    with no gap or duplicate."""
    p = prompt(2, 50)
    want = reference.generate([p], LONG)[0].token_ids
    with Cluster("dummy:tiny", num_prefill=1, num_decode=1, node_args=["--num-kv-blocks", "160"],
                 router_args=["--health-interval-s", "0.2", "--resume-wait-s", "120"]) as cluster:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(generate, cluster.router_address, p, LONG)
            assert wait_for(lambda: running_decode(cluster), timeout=30, interval=0.01)
            cluster.restart("decode-0")  # kills it, then starts it on the same port
            tokens, last, _ = future.result(timeout=120)
        assert tokens == want and last.usage.completion_tokens == 300
        assert last.timings.num_attempts >= 2  # the killed attempt, then one on the node come back
        assert wait_for(lambda: all_blocks_free(cluster))


def test_a_resumed_stream_keeps_its_penalties_min_tokens_and_seed(cluster, reference):
    """The new decode node rebuilds the sampling state from the tokens already streamed: the
    penalties' counts, min_tokens and the seed's draws continue where the dead node left them."""
    p = prompt(3, 40)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=300, presence_penalty=0.6, frequency_penalty=0.4,
                            repetition_penalty=1.15, min_tokens=299, logit_bias={5: 2.0})
    want = reference.generate([p], params)[0].token_ids
    tokens, last, _ = generate_killing_its_decode_node(cluster, p, params)
    assert tokens == want and last.timings.num_attempts == 2


def test_a_hung_decode_node_is_left_after_the_stream_timeout_and_the_stream_resumes():
    """SIGSTOP (a hung node, not a dead one: its connections stay open) mid-stream: the stream
    goes silent, the router gives up on it after --stream-timeout-s and resumes the request on
    the other decode node; the tokens equal an undisturbed run and the gap stays within the
    bound plus a margin. (Before, the stream froze for as long as the node hung.)"""
    timeout_s = 2.0
    reference = Engine(model="dummy:tiny", num_kv_blocks=512, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    p = prompt(4, 40)
    want = reference.generate([p], params)[0].token_ids
    with start_cluster(router_args=["--stream-timeout-s", str(timeout_s)]) as cluster:
        times, tokens, stopped = [], [], None
        try:
            for response in stream(cluster.router_address, generate_request(p, params), timeout=120):
                times.append(time.monotonic())
                tokens += response.token_ids
                if stopped is None and len(tokens) > 20:
                    stopped = running_decode(cluster)
                    stopped.popen.send_signal(signal.SIGSTOP)
            assert stopped is not None and tokens == want
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert timeout_s <= max(gaps) < timeout_s + 3.0  # the silence, then the resume
            assert response.timings.num_attempts == 2
        finally:
            if stopped is not None:
                stopped.popen.send_signal(signal.SIGCONT)
        assert wait_for(lambda: all_blocks_free(cluster), timeout=30)  # the woken node frees its request


def test_draining_decode_node_finishes_its_stream_and_gets_no_new_work(cluster, reference):
    p = prompt(2, 30)
    want = reference.generate([p], LONG)[0].token_ids
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(generate, cluster.router_address, p, LONG)
        drained = wait_for(lambda: running_decode(cluster), timeout=30, interval=0.01)
        drained.popen.send_signal(signal.SIGTERM)
        assert wait_for(lambda: health(drained.address) == "NOT_SERVING", timeout=5, interval=0.02)
        tokens, last, _ = future.result(timeout=120)
    assert tokens == want and last.timings.num_attempts == 1  # drained gracefully, not resumed
    assert drained.popen.wait(30) == 0
    (survivor,) = [d for d in cluster.decode if d.popen.poll() is None]
    short = [prompt(10 + i, 20) for i in range(4)]
    expected = [c.token_ids for c in reference.generate(short, GREEDY)]
    assert [generate(cluster.router_address, s)[0] for s in short] == expected
    assert node_stats(survivor).num_free_blocks == node_stats(survivor).num_kv_blocks
    assert health(cluster.router_address) == "SERVING"


def test_a_prefill_queued_past_the_transfer_timeout_is_not_retried(reference):
    """The KV's deadline counts from its first bytes, not from the reservation: a prompt held
    on its prefill node (a test hook, as if queued behind others) for longer than the decode
    node's transfer timeout is prefilled once and served on the first attempt."""
    p = prompt(3, 60)
    with Cluster("dummy:tiny", num_prefill=1, num_decode=1, node_args=["--num-kv-blocks", "160"],
                 prefill_args=["--kv-test-hold-prefill-s", "3"],
                 decode_args=["--kv-transfer-timeout-s", "1", "--reservation-timeout-s", "60"]) as cluster:
        tokens, last, _ = generate(cluster.router_address, p)
        assert tokens == reference.generate([p], GREEDY)[0].token_ids
        assert last.timings.num_attempts == 1
        assert node_stats(cluster.decode[0]).num_kv_transfer_failures == 0
        assert wait_for(lambda: all_blocks_free(cluster))
