"""The engine's bookkeeping on the `tiny` dummy model: validation, prefix reuse, and block
pool invariants under a randomized workload with aborts and preemptions."""

import random

import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(model="dummy:tiny", num_kv_blocks=64, max_model_len=512)


@pytest.mark.parametrize("params,field", [
    (SamplingParams(temperature=-1), "temperature"),
    (SamplingParams(top_p=0), "top_p"),
    (SamplingParams(top_p=1.01), "top_p"),
    (SamplingParams(max_tokens=0), "max_tokens"),
])
def test_bad_params_raise_naming_the_field(engine, params, field):
    with pytest.raises(ValueError, match=field):
        engine.add_request([1, 2, 3], params)


@pytest.mark.parametrize("prompt", [[], [1, 512], [1, -1], [1, 2.0], list(range(1, 513))])
def test_bad_prompts_raise_naming_the_field(engine, prompt):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request(prompt, GREEDY)
    assert not engine.has_unfinished()


def test_shared_prefix_reuses_three_blocks_and_gives_the_same_output(engine):
    rng = random.Random(0)
    prefix = [rng.randrange(3, 512) for _ in range(48)]  # 3 blocks of 16
    first = prefix + [rng.randrange(3, 512) for _ in range(10)]
    second = prefix + [rng.randrange(3, 512) for _ in range(7)]
    engine.generate([first], GREEDY)
    before = engine.stats()["num_prompt_tokens_computed"]
    (result,) = engine.generate([second], GREEDY)
    computed = engine.stats()["num_prompt_tokens_computed"] - before
    assert result.num_cached_tokens == 48
    assert computed == len(second) - 48
    fresh = Engine(model="dummy:tiny", num_kv_blocks=64, enable_prefix_caching=False)
    (expected,) = fresh.generate([second], GREEDY)
    assert fresh.stats()["num_prompt_tokens_computed"] == len(second)
    assert result.token_ids == expected.token_ids
    assert engine.stats()["num_free_blocks"] == 64


def test_salted_requests_do_not_share_blocks(engine):
    prompt = list(range(3, 3 + 40))
    engine.generate([prompt], GREEDY, cache_salt="tenant-a")
    (same,) = engine.generate([prompt], GREEDY, cache_salt="tenant-a")
    (other,) = engine.generate([prompt], GREEDY, cache_salt="tenant-b")
    assert same.num_cached_tokens == 32 and other.num_cached_tokens == 0
    assert same.token_ids == other.token_ids


def test_fully_cached_prompt_still_computes_its_last_token(engine):
    prompt = list(range(100, 132))  # exactly 2 blocks
    (a,) = engine.generate([prompt], GREEDY)
    (b,) = engine.generate([prompt], GREEDY)
    assert b.num_cached_tokens == 16 and a.token_ids == b.token_ids


def check_invariants(engine):
    pool, tables = engine.kv.pool, engine.kv.block_tables
    holders = {}
    held = {f"held-{i}": table for i, table in enumerate(engine.kv.held or [])}  # freed, a step in flight
    for request_id, table in {**tables, **held}.items():
        for index, block in enumerate(table):
            holders.setdefault(block.block_id, []).append((request_id, index))
    for block in pool.blocks:
        assert block.ref_count >= 0
        users = holders.get(block.block_id, [])
        assert block.ref_count == len(users), f"block {block.block_id}: ref {block.ref_count}, {users}"
        assert (block.ref_count == 0) == (block.block_id in pool.free_queue)
        if len(users) > 1:  # only prefix-cached blocks may sit in two tables, at one position
            assert block.block_hash is not None
            assert len({index for _, index in users}) == 1


def test_randomized_workload_with_aborts_and_preemption():
    rng = random.Random(7)
    # a cache far too small for the load: requests are preempted and recomputed
    engine = Engine(model="dummy:tiny", num_kv_blocks=40, max_num_seqs=24, max_num_batched_tokens=96)
    roomy = Engine(model="dummy:tiny", num_kv_blocks=2000, max_num_seqs=256, max_num_batched_tokens=4096)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts, params = [], []
    for i in range(220):
        body = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 120))]
        prompts.append((shared[:rng.choice([0, 16, 40])] + body)[:300])
        params.append(SamplingParams(temperature=0, max_tokens=rng.randrange(1, 40), ignore_eos=True))
    ids, outputs, aborted = [], {}, set()
    pending = list(range(len(prompts)))
    num_steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(0, 6)):  # requests arrive over time
            if pending:
                i = pending.pop(0)
                ids.append(engine.add_request(prompts[i], params[i], request_id=f"r{i}"))
        if rng.random() < 0.1 and engine.requests:
            victim = rng.choice(sorted(engine.requests))
            assert engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        check_invariants(engine)
        num_steps += 1
    assert engine.kv.num_free_blocks == 40 and not engine.kv.block_tables
    assert engine.scheduler.num_preempted > 0, "the workload must exercise preemption"
    assert len(aborted) > 5

    # every finished request produced exactly its tokens: the same as with a roomy cache
    done = [i for i in range(len(prompts)) if f"r{i}" not in aborted]
    expected = roomy.generate([prompts[i] for i in done], [params[i] for i in done])
    for i, result in zip(done, expected):
        assert outputs[f"r{i}"] == result.token_ids, f"request r{i}"
    assert roomy.kv.num_free_blocks == 2000
