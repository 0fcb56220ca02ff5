"""Only the missing blocks move: a decode node's reservation adopts the prompt's leading blocks
from its own prefix cache, and the prefill node sends only the blocks after them. A multi-turn
chat over real processes (one prefill and one decode node, tcp, `dummy:tiny`): from turn 2 on,
the bytes the decode node's receiver counts are exactly those of the new blocks, and every
turn's tokens equal the in-process engine's."""

import random

import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.frame import DONE, HEADER_SIZE

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
