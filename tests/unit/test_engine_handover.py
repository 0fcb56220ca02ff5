"""The engine mechanics of disaggregation, in one process: a prefill engine runs prompts
prefill-only and hands each layer's K/V to a hook, which copies it into blocks a second
engine reserved; that engine admits the request with the first token and decodes. The
tokens must equal one engine's, greedy and seeded, and every block must come back."""

import random

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

KW = dict(model="dummy:tiny", num_kv_blocks=96, max_model_len=512, max_num_batched_tokens=40)


@pytest.fixture(scope="module")
def engines():
    return Engine(**KW), Engine(**KW), Engine(**KW)  # reference, prefill, decode


def run_disaggregated(prefill: Engine, decode: Engine, prompts, params):
    """Returns {index: token ids} after prefill on one engine and decode on the other."""
    tables, tokens = {}, {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        tables[rid] = decode.reserve(prompt, p, request_id=rid)
        assert tables[rid] is not None
        prefill.add_request(prompt, p, request_id=rid, prefill_only=True)

    def push_layer(layer, scheduled):
        for s in scheduled.scheduled:
            if not s.samples:
                continue
            rid = s.request.request_id
            start = tables[rid].num_cached_blocks  # the decode engine holds those already: not copied
            src = torch.tensor(prefill.kv.block_ids(rid)[start:])
            dst = torch.tensor(tables[rid].block_ids[start:])
            for side in range(2):  # K, V
                decode.runner.kv_caches[layer][side][dst] = prefill.runner.kv_caches[layer][side][src]

    while prefill.has_unfinished():
        for out in prefill.step(on_layer=push_layer):
            assert out.finished
            tokens[out.request_id] = list(out.new_token_ids)
            admitted = decode.admit(out.request_id, out.new_token_ids[0])
            assert admitted is not None and admitted.new_token_ids == []
            assert admitted.finished == (out.finish_reason is not None)
    while decode.has_unfinished():
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def test_handover_gives_the_same_tokens_as_one_engine(engines):
    reference, prefill, decode = engines
    rng = random.Random(1)
    lengths = [1, 15, 16, 17, 33, 70, 120, 5]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    params[4] = SamplingParams(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    params[5] = SamplingParams(temperature=0, max_tokens=1)  # ends on the prefill node
    expected = [c.token_ids for c in reference.generate(prompts, params)]
    assert run_disaggregated(prefill, decode, prompts, params) == expected
    for engine in engines:
        assert engine.stats()["num_free_blocks"] == KW["num_kv_blocks"]
        assert engine.stats()["num_reserved"] == 0


def test_reservation_without_room_and_abort(engines):
    _, _, decode = engines
    prompt = list(range(3, 503))  # 32 blocks: the cache holds three
    for i in range(3):
        assert len(decode.reserve(prompt, SamplingParams(max_tokens=4), request_id=f"big{i}").block_ids) == 32
    assert decode.reserve(prompt, SamplingParams(max_tokens=4), request_id="no-room") is None
    with pytest.raises(ValueError, match="prompt_token_ids"):
        decode.reserve([], SamplingParams())
    for i in range(3):
        assert decode.abort_request(f"big{i}")
    assert decode.admit("big0", 5) is None  # the reservation is gone
    assert decode.stats()["num_free_blocks"] == KW["num_kv_blocks"]


def test_a_reservation_adopts_cached_blocks_and_only_the_rest_is_copied(engines):
    """A second turn (the first turn's prompt and answer, then more): the decode engine holds
    the first turn's blocks, so its reservation adopts them and only the new blocks are
    copied over; the tokens still equal one engine's."""
    reference, prefill, decode = engines
    rng = random.Random(2)
    first = [rng.randrange(3, 512) for _ in range(40)]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    (answer,) = run_disaggregated(prefill, decode, [first], [params])
    second = first + answer + [rng.randrange(3, 512) for _ in range(30)]  # 79 tokens: 4 full blocks
    reservation = decode.reserve(second, params, request_id="peek")
    assert reservation.num_cached_blocks == 3  # the first turn's 49 tokens: 3 full blocks
    decode.abort_request("peek")
    # prompt logprobs make the node that computes the prompt skip its cache, not a reservation
    logprob_params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, prompt_logprobs=1)
    assert decode.reserve(second, logprob_params, request_id="peek2").num_cached_blocks == 3
    decode.abort_request("peek2")
    expected = reference.generate([second], params)[0].token_ids
    assert run_disaggregated(prefill, decode, [second], [params]) == [expected]
    for engine in engines:
        assert engine.stats()["num_free_blocks"] == KW["num_kv_blocks"]


def test_a_first_token_that_is_no_token_fails_its_request_alone(engines):
    """A transfer's DONE frame names the first token; 2**32 - 1 once crashed the decode step of
    every request on the node. Now admit refuses it, and the others decode on."""
    reference, prefill, decode = engines
    prompts = [list(range(3, 40)), list(range(50, 70))]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 2
    want = [c.token_ids for c in reference.generate(prompts[1:], params[1:])]
    decode.reserve(prompts[0], params[0], request_id="bad")
    for token_id in (2**32 - 1, -1, decode.model_config.vocab_size):
        with pytest.raises(ValueError, match="first_token_id"):
            decode.admit("bad", token_id)
    assert run_disaggregated(prefill, decode, prompts[1:], params[1:]) == want
    assert decode.abort_request("bad")
    assert decode.stats()["num_free_blocks"] == KW["num_kv_blocks"]
