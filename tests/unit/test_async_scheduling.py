"""Async scheduling (engine.py): a decode step is launched before the previous step's tokens
are read. Against the same engine one step at a time: the same tokens and finish reasons
while requests stop, run out of length, sample with seeds and get preempted; under aborts
landing while a step is in flight, every block stays accounted for and none is reused early."""

import random

import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams
from tests.unit.test_engine_core import check_invariants


def count_launches(engine) -> list[bool]:
    """For every later `runner.launch`: whether it followed a step still in flight."""
    followed, launch = [], engine.runner.launch
    engine.runner.launch = lambda out, tables, after=None: followed.append(after is not None) or launch(
        out, tables, after)
    return followed


def _workload(rng: random.Random, num: int, vocab: int = 512):
    prompts, params = [], []
    for i in range(num):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 16, 17, 40, 140]))])
        kind = i % 3
        if kind == 0:  # greedy to max_tokens (or to max_model_len, for the long prompts)
            params.append(SamplingParams(temperature=0, max_tokens=rng.randrange(1, 30), ignore_eos=True))
        elif kind == 1:  # seeded sampling: its tokens must not depend on the schedule
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=rng.randrange(1, 30),
                                         ignore_eos=True))
        else:  # stops early on tokens it is likely to produce (frequent in a greedy probe run)
            params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    return prompts, params


def _stop_on_frequent_tokens(prompts, params, **engine_kw):
    probe = Engine(async_scheduling=False, **engine_kw).generate(prompts, params)
    for p, result in zip(params, probe):
        if p.temperature == 0 and p.max_tokens == 30 and len(result.token_ids) > 4:
            p.stop_token_ids = [result.token_ids[len(result.token_ids) // 2]]


def check_async_matches_sync(**device_kw) -> None:
    rng = random.Random(3)
    prompts, params = _workload(rng, 36)
    kw = dict(model="dummy:tiny", max_model_len=160, num_kv_blocks=24, max_num_seqs=12,
              max_num_batched_tokens=160, **device_kw)  # small: preemptions, a waiting queue, uneven ends
    _stop_on_frequent_tokens(prompts, params, **kw)
    sync_engine = Engine(async_scheduling=False, **kw)
    expected = sync_engine.generate(prompts, params)
    engine = Engine(**kw)
    followed = count_launches(engine)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.finish_reason for r in results] == [r.finish_reason for r in expected]
    reasons = {r.finish_reason for r in results}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}, reasons
    assert engine.scheduler.num_preempted > 0 and sync_engine.scheduler.num_preempted > 0
    assert sum(followed) >= 10, "steps must have been launched behind steps in flight"
    assert engine.kv.num_free_blocks == 24 and engine.kv.held is None and not engine.kv.block_tables


def test_async_gives_the_tokens_of_one_step_at_a_time():
    check_async_matches_sync()


def test_aborts_while_a_step_is_in_flight_free_every_block_once():
    """Requests are aborted between steps, mostly while a launched step still writes their KV:
    their blocks are held until it has run, the block pool's invariants hold after every step,
    and every request streamed a prefix of (finished: exactly) its tokens run alone."""
    rng = random.Random(11)
    prompts, params = _workload(rng, 60)
    kw = dict(model="dummy:tiny", max_model_len=160, num_kv_blocks=120, max_num_seqs=64,
              max_num_batched_tokens=256)
    engine = Engine(**kw)
    followed = count_launches(engine)
    streamed, finished, aborted = {}, set(), set()
    num_aborted_in_flight = num_held = 0
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished():
        if rng.random() < 0.3 and pending:  # arrivals now and then: the batch often stays the same
            for _ in range(rng.randrange(1, 6)):
                if pending:
                    i = pending.pop(0)
                    engine.add_request(prompts[i], params[i], request_id=f"r{i}")
        if rng.random() < 0.15 and engine.requests:
            victim = rng.choice(sorted(engine.requests))
            num_aborted_in_flight += engine._in_flight is not None
            assert engine.abort_request(victim)
            aborted.add(victim)
            num_held += bool(engine.kv.held)  # its blocks wait for the step in flight
            check_invariants(engine)
        for out in engine.step():
            assert out.request_id not in aborted, "no output after an abort"
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        check_invariants(engine)  # held blocks count as used
        num_held += bool(engine.kv.held)
    assert engine.kv.num_free_blocks == 120 and engine.kv.held is None and not engine.kv.block_tables
    assert num_aborted_in_flight > 3 and sum(followed) > 30 and num_held > 3, (
        num_aborted_in_flight, sum(followed), num_held)
    alone = Engine(async_scheduling=False, **kw).generate(prompts, params)
    for i, result in enumerate(alone):
        got = streamed.get(f"r{i}", [])
        if f"r{i}" in finished:
            assert got == result.token_ids, f"r{i}"
        else:
            assert f"r{i}" in aborted and got == result.token_ids[:len(got)], f"r{i}"


def test_a_failed_step_leaves_no_block_held():
    """A step that raises while another is in flight (the engine loop then aborts everything):
    nothing stays in flight or held, and every block returns to the pool."""
    engine = Engine(model="dummy:tiny", num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [engine.add_request([5, 6, 7 + i], params) for i in range(3)]
    while engine._in_flight is None:
        engine.step()
    engine.abort_request(ids[0])
    assert engine.kv.held, "freed while a step is in flight: held"

    def lost(*args):
        raise RuntimeError("device lost")
    engine.runner.launch = lost
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert engine._in_flight is None and engine.kv.held is None
    for request_id in ids[1:]:
        assert engine.abort_request(request_id)
    assert engine.kv.num_free_blocks == 32 and not engine.has_unfinished()


PENALTIES = dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4)


def test_logprobs_and_penalties_keep_the_look_ahead():
    check_logprobs_and_penalties_keep_the_look_ahead()


def check_logprobs_and_penalties_keep_the_look_ahead(tolerance: float = 1e-5, **device_kw) -> None:
    """Logprobs and penalties keep the look-ahead on (logprobs are copied back with the tokens;
    penalties count the token a step is behind on the device): tokens and logprobs equal those
    of one step at a time, rows with and without either mixed."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.choice([5, 17, 40]))] for _ in range(12)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=rng.randrange(8, 24),
                             ignore_eos=True, logprobs=None if i % 3 == 0 else i % 4,
                             **(PENALTIES if i % 4 < 2 else {})) for i in range(12)]
    kw = dict(model="dummy:tiny", num_kv_blocks=64, **device_kw)
    expected = Engine(async_scheduling=False, **kw).generate(prompts, params)
    engine = Engine(**kw)
    followed = count_launches(engine)
    results = engine.generate(prompts, params)
    assert sum(followed) >= 10, "steps with logprobs and penalties must be launched behind steps in flight"
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids
        assert len(got.logprobs) == len(want.logprobs)
        for a, b in zip(got.logprobs, want.logprobs):
            assert (a.token_id, [t for t, _ in a.top]) == (b.token_id, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=tolerance)
    assert any(r.logprobs for r in results) and not results[0].logprobs
