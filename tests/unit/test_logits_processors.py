"""Penalties, logit_bias, min_tokens, bad words and logprobs against their oracles: transformers'
logits processors on the real SmolLM2 model (fp32, greedy, token for token), a pure-torch
statement of OpenAI's presence and frequency penalties, and log_softmax of transformers' logits."""

import pytest
import torch
import transformers

from pdserve.engine.engine import Engine
from pdserve.engine.hf_reference import hf_model
from pdserve.engine.logits_processors import LogitsProcessors
from pdserve.engine.sampling_params import SamplingParams

NUM_TOKENS = 16


@pytest.fixture(scope="module")
def engine():
    return Engine(model="smollm2-135m", num_kv_blocks=256)


@pytest.fixture(scope="module")
def hf(engine):
    return hf_model(engine.source, engine.model_config)


@pytest.fixture(scope="module")
def prompts(engine):
    chats = ["What is 2+2? Answer with a number only.", "Say hi.",  # the first ends in 8 tokens
             "Write a short poem about the sea, the sea, the sea."]
    return [engine.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in chats]


class PresenceFrequency:
    """OpenAI's definition: logit -= frequency * count(token in output) + presence * [count > 0]."""

    def __init__(self, num_prompt_tokens: int, presence: float, frequency: float):
        self.start, self.presence, self.frequency = num_prompt_tokens, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.start:], minlength=scores.shape[-1]).float()
        return scores - self.frequency * counts - self.presence * (counts > 0)


def hf_greedy(hf, prompt, processors, eos_ids, num_tokens=NUM_TOKENS):
    """Greedy decoding with transformers' processors applied in order; (tokens, raw logits)."""
    ids, raw = list(prompt), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
            raw.append(logits[0])
            scores = logits.clone()
            for p in processors:
                scores = p(torch.tensor([ids]), scores)
            ids.append(int(scores.argmax(-1)))
            if ids[-1] in eos_ids:
                break
    return ids[len(prompt):], raw


def oracle_processors(case, prompt, eos_ids, tokenizer):
    n = len(prompt)
    return {
        "repetition": [transformers.RepetitionPenaltyLogitsProcessor(1.3)],
        "min_tokens": [transformers.MinNewTokensLengthLogitsProcessor(n, 12, list(eos_ids))],
        "logit_bias": [transformers.SequenceBiasLogitsProcessor([[[tokenizer.encode(" the")[0]], -8.0],
                                                                 [[tokenizer.encode(" sea")[0]], 4.0]])],
        "bad_words": [transformers.NoBadWordsLogitsProcessor([tokenizer.encode(" Apple"),
                                                              tokenizer.encode("Hello"), tokenizer.encode(" sea")])],
        "presence_frequency": [PresenceFrequency(n, 0.8, 0.6)],
        "all": [transformers.MinNewTokensLengthLogitsProcessor(n, 10, list(eos_ids)),
                transformers.SequenceBiasLogitsProcessor([[[tokenizer.encode(" the")[0]], -3.0]]),
                transformers.RepetitionPenaltyLogitsProcessor(1.2), PresenceFrequency(n, 0.5, 0.4)],
    }[case]


def our_params(case, tokenizer) -> SamplingParams:
    fields = {
        "repetition": dict(repetition_penalty=1.3),
        "min_tokens": dict(min_tokens=12),
        "logit_bias": dict(logit_bias={tokenizer.encode(" the")[0]: -8.0, tokenizer.encode(" sea")[0]: 4.0}),
        "bad_words": dict(bad_words_token_ids=[tokenizer.encode(" Apple"), tokenizer.encode("Hello"),
                                               tokenizer.encode(" sea")]),
        "presence_frequency": dict(presence_penalty=0.8, frequency_penalty=0.6),
        "all": dict(min_tokens=10, logit_bias={tokenizer.encode(" the")[0]: -3.0}, repetition_penalty=1.2,
                    presence_penalty=0.5, frequency_penalty=0.4),
    }[case]
    return SamplingParams(temperature=0, max_tokens=NUM_TOKENS, logprobs=3, **fields)


@pytest.mark.parametrize("case", ["repetition", "min_tokens", "logit_bias", "bad_words", "presence_frequency", "all"])
def test_greedy_tokens_and_logprobs_equal_transformers(engine, hf, prompts, case):
    tok, eos_ids = engine.tokenizer, engine.model_config.eos_token_ids
    params = our_params(case, tok)
    results = engine.generate(prompts, [params] * len(prompts))  # batched together
    plain = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NUM_TOKENS))
    assert [r.token_ids for r in results] != [p.token_ids for p in plain]  # the case changes something
    for prompt, result in zip(prompts, results):
        expected, raw = hf_greedy(hf, prompt, oracle_processors(case, prompt, eos_ids, tok), eos_ids)
        assert result.token_ids == expected
        assert [lp.token_id for lp in result.logprobs] == expected
        for lp, logits in zip(result.logprobs, raw):
            ref = logits.log_softmax(-1)
            assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
            top_ids = [t for t, _ in lp.top]
            assert top_ids == ref.topk(3).indices.tolist()
            assert max(abs(v - ref[t].item()) for t, v in lp.top) < 1e-4
    assert engine.stats()["num_free_blocks"] == 256
    assert not engine.runner.sampler.processors.penalty_counts.slots  # every request's slot is given back


def test_min_tokens_holds_back_stop_tokens_and_logprobs_can_be_zero(engine, prompts):
    stop = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30))[0]
    assert stop.finish_reason.value == "stop"
    first = stop.token_ids[0]
    held = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30, min_tokens=4,
                                                        stop_token_ids=[first], logprobs=0))[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4
    assert all(lp.top == () for lp in held.logprobs) and len(held.logprobs) == len(held.token_ids)


def reference(logits, params, prompts, outputs, eos_ids):
    """The processors stated row by row, on plain lists."""
    out = logits.clone()
    for row, (p, prompt, output) in enumerate(zip(params, prompts, outputs)):
        output = prompt[len(prompt) - p.num_resumed_tokens:] + output
        for word in p.bad_words_token_ids:
            if len(word) == 1 or output[len(output) - len(word) + 1:] == word[:-1]:
                out[row, word[-1]] = float("-inf")
        if len(output) - p.num_resumed_tokens < p.min_tokens:
            for t in list(p.stop_token_ids) + list(eos_ids):
                out[row, t] = float("-inf")
        for t, bias in p.logit_bias.items():
            out[row, t] += bias
        for t in range(out.shape[1]):
            if t in prompt or t in output:
                x = out[row, t]
                out[row, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            n = output.count(t)
            out[row, t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_processors_equal_their_statement_over_steps(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, num_rows = int(torch.randint(20, 60, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
    rand = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731
    prompts = [rand(int(torch.randint(2, 12, (1,), generator=gen))) for _ in range(num_rows)]
    params = [SamplingParams(
        presence_penalty=uniform(-2, 2), frequency_penalty=uniform(-2, 2), repetition_penalty=uniform(0.5, 2),
        logit_bias={t: uniform(-5, 5) for t in rand(3)}, min_tokens=int(torch.randint(0, 4, (1,), generator=gen)),
        stop_token_ids=rand(1), bad_words_token_ids=[rand(1), rand(2), rand(3)],
        num_resumed_tokens=int(torch.randint(0, len(pr), (1,), generator=gen))) for pr in prompts]
    processors = LogitsProcessors(torch.device("cpu"), eos_token_ids=(0,))
    outputs = [[] for _ in range(num_rows)]
    for step in range(6):  # the counts grow step by step: each step must equal a fresh statement
        logits = torch.randn(num_rows, vocab, generator=gen)
        histories = [type("H", (), {"prompt_token_ids": pr, "output_token_ids": out})
                     for pr, out in zip(prompts, outputs)]
        ours = processors(logits.clone(), [f"r{i}" for i in range(num_rows)], params,
                          [len(o) for o in outputs], histories)
        torch.testing.assert_close(ours, reference(logits, params, prompts, outputs, (0,)))
        for out in outputs:
            out.append(rand(1)[0])


def test_a_resumed_request_continues_as_if_never_interrupted(engine, prompts):
    """A stream resumed elsewhere: the prompt carries the first k output tokens, which the
    penalties and a seed's draws count as output; the rest equals the uninterrupted run."""
    base = dict(max_tokens=16, presence_penalty=0.7, frequency_penalty=0.5, repetition_penalty=1.1,
                temperature=0.9, seed=5)
    whole = engine.generate(prompts[:1], SamplingParams(**base))[0].token_ids
    k = 6
    rest = engine.generate([prompts[0] + whole[:k]], SamplingParams(
        **{**base, "max_tokens": 16 - k}, num_resumed_tokens=k))[0].token_ids
    assert whole[:k] + rest == whole


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0), ("logit_bias", {5: 101}),
    ("logit_bias", {10**6: 1}), ("min_tokens", -1), ("bad_words_token_ids", [[]]), ("logprobs", 21),
    ("num_resumed_tokens", -1),
])
def test_bad_processor_params_name_the_field(field, value):
    name = field.replace("_token_ids", "")
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{field: value}).validate(vocab_size=1000)


def test_prompt_logprobs_equal_transformers_across_chunks_and_skip_the_cache(hf, prompts):
    engine = Engine(model="smollm2-135m", num_kv_blocks=256, max_num_batched_tokens=16)  # chunks of 16
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    for _ in range(2):  # the second time the prompt is in the prefix cache, which it must not use
        [result] = engine.generate(prompts[2:3], params)
        prompt = prompts[2]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
        assert [lp.token_id for lp in result.prompt_logprobs] == prompt[1:]
        for i, lp in enumerate(result.prompt_logprobs):
            assert abs(lp.logprob - ref[i, prompt[i + 1]].item()) < 1e-4
            assert [t for t, _ in lp.top] == ref[i].topk(2).indices.tolist()
        assert result.num_cached_tokens == 0


def test_a_pending_token_counts_as_if_the_history_held_it():
    """A step launched behind another knows its latest token on the device only
    (`pending_token_ids`): the penalties come out as if the history held it."""
    from dataclasses import dataclass, field

    @dataclass
    class History:
        prompt_token_ids: list[int]
        output_token_ids: list[int] = field(default_factory=list)

    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3),
              SamplingParams(repetition_penalty=1.8, num_resumed_tokens=2)]
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    outputs, pending = [[7, 9, 7], [11]], [7, 40]
    behind, known = LogitsProcessors(torch.device("cpu")), LogitsProcessors(torch.device("cpu"))
    got = behind(logits.clone(), ["a", "b"], params, [4, 2],
                 [History([1, 2, 3], list(o)) for o in outputs], torch.tensor(pending))
    want = known(logits.clone(), ["a", "b"], params, [4, 2],
                 [History([1, 2, 3], o + [t]) for o, t in zip(outputs, pending)])
    assert torch.equal(got, want) and not torch.equal(got, logits)
    # the pending token was this step's only: the next step, with it in the history, counts it once
    again = [History([1, 2, 3], o + [t]) for o, t in zip(outputs, pending)]
    assert torch.equal(behind(logits.clone(), ["a", "b"], params, [4, 2], again),
                       known(logits.clone(), ["a", "b"], params, [4, 2], again))


def test_penalty_rows_are_reused_and_grow_without_mixing_requests():
    """40 penalized requests in batches larger than the first 16 rows, finishing at different
    lengths so that later requests take rows given back: each one's tokens equal its run alone."""
    import random

    rng = random.Random(4)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 30))] for _ in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(2, 20), ignore_eos=True, presence_penalty=1.5,
                             frequency_penalty=1.0, repetition_penalty=1.5) for _ in range(40)]
    engine = Engine(model="dummy:tiny", num_kv_blocks=256, max_num_seqs=24)
    together = engine.generate(prompts, params)
    counts = engine.runner.sampler.processors.penalty_counts
    assert len(counts.output_counts) == 32 and not counts.slots  # grew once; every row given back
    alone = Engine(model="dummy:tiny", num_kv_blocks=256)
    assert [r.token_ids for r in together] == [alone.generate([p], s)[0].token_ids for p, s in zip(prompts, params)]
