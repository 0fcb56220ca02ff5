"""Only the missing blocks move: a decode node's reservation adopts the prompt's leading blocks
from its own prefix cache, and the prefill node sends only the blocks after them. A multi-turn
chat over real processes (one prefill and one decode node, tcp, `dummy:tiny`): from turn 2 on,
the bytes the decode node's receiver counts are exactly those of the new blocks, and every
turn's tokens equal the in-process engine's."""

import concurrent.futures
import random

import grpc
import pytest

from pdserve.client import generate_request
from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.frame import DONE, HEADER_SIZE
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

from .serving import all_blocks_free, generate, metric, wait_for

BLOCK_SIZE = 16
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    return Engine(model="dummy:tiny", num_kv_blocks=512, max_model_len=2048)


def received(cluster) -> float:
    return metric(cluster.decode[0], "pdserve_kv_transfer_bytes_total", direction="received")


def test_each_turn_of_a_chat_sends_only_its_new_blocks(reference):
    cfg = reference.model_config
    block_bytes = 2 * cfg.num_layers * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32
    overhead = cfg.num_layers * HEADER_SIZE + HEADER_SIZE + DONE.size  # a KV frame a layer, then DONE
    rng = random.Random(0)
    history, held = [], 0  # the conversation so far; full blocks of it the decode node computed
    with Cluster("dummy:tiny", 1, 1, node_args=["--num-kv-blocks", "160"]) as cluster:
        for turn in range(5):
            prompt = history + [rng.randrange(3, 512) for _ in range(rng.randrange(10, 40))]
            before = received(cluster)
            tokens, last, _ = generate(cluster.router_address, prompt, PARAMS)
            assert tokens == reference.generate([prompt], PARAMS)[0].token_ids
            cached = min(held, (len(prompt) - 1) // BLOCK_SIZE)  # one token is always computed
            new_blocks = -(-len(prompt) // BLOCK_SIZE) - cached
            assert received(cluster) - before == new_blocks * block_bytes + overhead, f"turn {turn}"
            assert last.timings.num_attempts == 1
            history = prompt + tokens
            held = (len(history) - 1) // BLOCK_SIZE  # the last token's KV is never computed
            assert turn == 0 or cached > 0
        assert wait_for(lambda: all_blocks_free(cluster))


def test_a_cache_salt_keeps_tenants_blocks_apart(reference):
    """The same extended prompt from another tenant (`cache_salt`) adopts none of the first
    tenant's blocks: all its blocks travel; the first tenant's own next turn sends only the
    new ones. Tokens equal the engine's every time, block edges included (a 64-token prompt)."""
    cfg = reference.model_config
    block_bytes = 2 * cfg.num_layers * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 4
    overhead = cfg.num_layers * HEADER_SIZE + HEADER_SIZE + DONE.size
    rng = random.Random(2)
    first = [rng.randrange(3, 512) for _ in range(64)]
    second = first + [rng.randrange(3, 512) for _ in range(40)]  # 104 tokens: 7 blocks
    with Cluster("dummy:tiny", 1, 1, node_args=["--num-kv-blocks", "160"]) as cluster:
        for prompt, salt, num_sent_blocks in ((first, "a", 4), (second, "a", 3), (second, "b", 7)):
            before = received(cluster)
            tokens, _, _ = generate(cluster.router_address, prompt, PARAMS, cache_salt=salt)
            assert tokens == reference.generate([prompt], PARAMS)[0].token_ids
            assert received(cluster) - before == num_sent_blocks * block_bytes + overhead, salt
        assert wait_for(lambda: all_blocks_free(cluster))


def test_a_chat_turn_whose_history_the_decode_node_holds_is_prefilled_there(reference):
    """Conditional disaggregation (`--prefill-here-max-tokens 48`, prefix policy over Redis): a
    150-token first turn goes to the prefill node; the second turn (its history plus 30 tokens)
    has at most 48 tokens the decode node lacks, so the decode node prefills it itself, from its
    own cache, and no KV moves."""
    rng = random.Random(1)
    first = [rng.randrange(3, 512) for _ in range(150)]
    with Cluster("dummy:tiny", 1, 1, redis="local", node_args=["--num-kv-blocks", "160"],
                 router_args=["--prefill-here-max-tokens", "48"]) as cluster:
        answer, _, _ = generate(cluster.router_address, first, PARAMS)
        assert answer == reference.generate([first], PARAMS)[0].token_ids
        assert metric(cluster.prefill[0], "pdserve_requests_total", role="prefill", outcome="ok") == 1
        before = received(cluster)
        second = first + answer + [rng.randrange(3, 512) for _ in range(30)]
        tokens, last, _ = generate(cluster.router_address, second, PARAMS)
        assert tokens == reference.generate([second], PARAMS)[0].token_ids
        assert metric(cluster.prefill[0], "pdserve_requests_total", role="prefill", outcome="ok") == 1
        assert received(cluster) == before and last.usage.cached_tokens >= 144
        assert wait_for(lambda: all_blocks_free(cluster))


def test_a_random_mix_of_routes_with_aborts_gives_every_block_back(reference):
    """Conditional routing over Redis (`--prefill-here-max-tokens 40`): 36 requests, 6 at a
    time, mixing short prompts (prefilled on the decode node), long ones (on the prefill node)
    and prompts that extend earlier ones (only their missing blocks sent), a third of them
    cancelled after their first tokens. Those not cancelled equal the engine's tokens; in the
    end both nodes have every block back and nothing running, waiting or reserved."""
    rng = random.Random(3)
    bases = [[rng.randrange(3, 512) for _ in range(rng.randrange(40, 120))] for _ in range(4)]
    work = []
    for i in range(36):
        kind = i % 3
        if kind == 0:
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        elif kind == 1:
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(60, 200))]
        else:
            prompt = rng.choice(bases) + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 50))]
        work.append((prompt, rng.random() < 1 / 3))
    long_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with Cluster("dummy:tiny", 1, 1, redis="local", node_args=["--num-kv-blocks", "160"],
                 router_args=["--prefill-here-max-tokens", "40"]) as cluster:

        def run(item):
            prompt, cancel = item
            if not cancel:
                return generate(cluster.router_address, prompt, long_params)[0]
            with grpc.insecure_channel(cluster.router_address) as channel:
                call = pb_grpc.RouterServiceStub(channel).Generate(generate_request(prompt, long_params))
                next(call)
                call.cancel()
            return None

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(run, work))
        for (prompt, cancel), tokens in zip(work, results):
            if not cancel:
                assert tokens == reference.generate([prompt], long_params)[0].token_ids
        assert metric(cluster.prefill[0], "pdserve_requests_total", role="prefill") > 0  # both routes ran
        assert metric(cluster.router, "pdserve_route_decisions_total", reason="prefill_on_decode") > 0
        assert wait_for(lambda: all_blocks_free(cluster), timeout=30)
