"""Aggregated serving: decode nodes that prefill their prompts themselves (no prefill node, or
`--disaggregation never`), with real processes on loopback serving `dummy:tiny`. The oracle is
the in-process Engine on the same prompts; every block comes back."""

import concurrent.futures
import random

import grpc
import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb

from .serving import GREEDY, all_blocks_free, generate, health, metric, random_prompts as prompts, generate_killing_its_decode_node, wait_for

NODE_ARGS = ["--num-kv-blocks", "160", "--max-num-batched-tokens", "256"]
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    """Two decode nodes and no prefill node: `pdserve up --num-prefill 0`."""
    with Cluster("dummy:tiny", num_prefill=0, num_decode=2, node_args=NODE_ARGS,
                 router_args=["--policy", "load", "--health-interval-s", "0.2"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return Engine(model="dummy:tiny", num_kv_blocks=512, max_model_len=2048)


def test_tokens_equal_the_engine_at_block_edges_and_with_a_cache_salt(cluster, reference):
    cases = prompts(0, [1, 16, 17, 300, 45])  # one token; a block edge; many blocks (19)
    params = [GREEDY] * 4 + [SamplingParams(temperature=0.8, top_k=50, seed=3, max_tokens=12, ignore_eos=True)]
    expected = [c.token_ids for c in reference.generate(cases, params)]
    for prompt, p, want in zip(cases, params, expected):
        tokens, last, _ = generate(cluster.router_address, prompt, p)
        assert tokens == want
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == 12
        assert last.timings.num_attempts == 1
        salted, _, _ = generate(cluster.router_address, prompt, p, cache_salt="tenant-a")
        assert salted == want
    assert health(cluster.router_address) == "SERVING"
    assert wait_for(lambda: all_blocks_free(cluster))


def test_a_repeated_prompt_is_served_from_the_decode_node_cache(cluster, reference):
    """The same prompt twice on an idle pair: the load policy alternates, so one node sees it
    twice in four requests; its second time comes from its own prefix cache, same tokens."""
    (prompt,) = prompts(1, [100])
    want = reference.generate([prompt], GREEDY)[0].token_ids
    results = [generate(cluster.router_address, prompt) for _ in range(4)]
    assert all(tokens == want for tokens, _, _ in results)
    assert max(last.usage.cached_tokens for _, last, _ in results) == 96  # 6 whole blocks of 16
    assert wait_for(lambda: all_blocks_free(cluster))


def test_32_concurrent_streams_all_complete_correctly(cluster, reference):
    cases = prompts(2, [random.Random(i).randrange(5, 120) for i in range(32)])
    expected = [c.token_ids for c in reference.generate(cases, GREEDY)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: generate(cluster.router_address, p)[0], cases))
    assert results == expected
    assert wait_for(lambda: all_blocks_free(cluster))


def test_bad_input_is_invalid_argument(cluster):
    with pytest.raises(grpc.RpcError) as info:
        generate(cluster.router_address, [600])  # outside dummy:tiny's 512-token vocabulary
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_decode_node_killed_mid_stream_resumes_without_gap_or_duplicate(reference):
    """Its own cluster: the test kills a node. The survivor prefills the prompt plus the tokens
    already streamed and goes on."""
    (prompt,) = prompts(3, [50])
    want = reference.generate([prompt], LONG)[0].token_ids
    with Cluster("dummy:tiny", num_prefill=0, num_decode=2, node_args=NODE_ARGS,
                 router_args=["--policy", "round_robin", "--health-interval-s", "0.2"]) as cluster:
        tokens, last, _ = generate_killing_its_decode_node(cluster, prompt, LONG)
        assert tokens == want
        assert last.timings.num_attempts == 2 and last.usage.completion_tokens == 300
        assert wait_for(lambda: all_blocks_free(cluster))


def test_never_disaggregate_leaves_the_prefill_node_idle(reference):
    """`--disaggregation never` with a prefill node up: the decode node prefills every prompt."""
    cases = prompts(4, [20, 40])
    expected = [c.token_ids for c in reference.generate(cases, GREEDY)]
    with Cluster("dummy:tiny", num_prefill=1, num_decode=1, node_args=NODE_ARGS,
                 router_args=["--disaggregation", "never"]) as cluster:
        assert [generate(cluster.router_address, p)[0] for p in cases] == expected
        assert metric(cluster.prefill[0], "pdserve_requests_total", role="prefill") == 0
        # counted once the stream's last message is out, so maybe just after the client has it
        assert wait_for(lambda: metric(cluster.decode[0], "pdserve_requests_total", role="decode", outcome="ok") == 2)
        assert wait_for(lambda: all_blocks_free(cluster))


def test_auto_leaves_prompts_the_decode_node_does_not_hold_to_an_idle_prefill_node(reference):
    """`--prefill-here-max-tokens 64`: a 30-token prompt the decode node has never seen would
    cost it as much as the idle prefill node, so it goes there (only a prompt the decode node
    mostly holds is prefilled on it: test_cached_blocks.py); with no prefill node it is
    prefilled on the decode node. Tokens equal the engine's."""
    (short,) = prompts(5, [30])
    want = reference.generate([short], GREEDY)[0].token_ids
    with Cluster("dummy:tiny", num_prefill=1, num_decode=1, node_args=NODE_ARGS,
                 router_args=["--disaggregation", "auto", "--prefill-here-max-tokens", "64"]) as cluster:
        assert generate(cluster.router_address, short)[0] == want
        assert metric(cluster.prefill[0], "pdserve_requests_total", role="prefill", outcome="ok") == 1
        assert metric(cluster.router, "pdserve_route_decisions_total", reason="prefill_on_decode") == 0
        cluster.prefill[0].popen.kill()
        cluster.prefill[0].popen.wait(30)
        assert wait_for(lambda: generate(cluster.router_address, short)[0] == want, timeout=30)
        assert metric(cluster.router, "pdserve_route_decisions_total", reason="prefill_on_decode") >= 1
        assert wait_for(lambda: all_blocks_free(cluster))
