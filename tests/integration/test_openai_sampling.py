"""Logprobs, penalties, logit_bias, min_tokens and bad_words through the whole system (gateway,
router, one prefill and one decode node serving SmolLM2-135M), called with the official
`openai` client; oracle: the in-process Engine with the same SamplingParams. And every field
the gateway does not implement is refused with a 400 naming it."""

import concurrent.futures
import json
import math
import re

import jsonschema
import openai
import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.api_fields import IMPLEMENTED, NOT_IMPLEMENTED

from ..schemas import SCHEMAS
from .serving import all_blocks_free, node_stats, wait_for

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Name three primary colors."}]
PROMPT = "The three most useful things to pack for a hike are"


@pytest.fixture(scope="module")
def cluster():
    with Cluster(MODEL, 1, 1, gateway_port=0) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.gateway_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return Engine(model=MODEL)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=1e-4)


def test_chat_logprobs_streaming_or_not_equal_the_engine(client, engine):
    [want] = engine.chat([CHAT], SamplingParams(temperature=0, max_tokens=12, logprobs=3))
    done = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    entries = done.choices[0].logprobs.content
    streamed_entries = [e for c in streamed for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in streamed_entries]  # the second hits the prefix
    assert all(close(a.logprob, b.logprob) for a, b in zip(entries, streamed_entries))  # cache: not bit-equal
    assert len(entries) == 12 and "".join(e.token for e in entries) == want.text == done.choices[0].message.content
    for entry, lp in zip(entries, want.logprobs):
        assert close(entry.logprob, lp.logprob) and bytes(entry.bytes) == entry.token.encode()
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([t]) for t, _ in lp.top]
        assert all(close(t.logprob, v) for t, (_, v) in zip(entry.top_logprobs, lp.top))
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None  # only when asked for


def test_completion_logprobs_carry_tokens_and_offsets(client, engine):
    [want] = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, logprobs=2))
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text == want.text
    assert all(close(a, b.logprob) for a, b in zip(lp.token_logprobs, want.logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    assert [len(top) for top in lp.top_logprobs] == [2] * 10
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                            logprobs=2, stream=True))
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def bad_word_ids(engine, word: str) -> list[list[int]]:
    """The router's rule: the word as it would start the text and after a space."""
    tok = engine.tokenizer
    return sorted({tuple(tok.encode(p + word, add_special_tokens=False)) for p in ("", " ")})


def test_penalties_bias_min_tokens_and_bad_words_equal_the_engine(client, engine):
    tok = engine.tokenizer
    bias = {tok.encode(" water")[0]: 5.0, tok.encode(" a")[0]: -4.0}
    fields = dict(presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=24)
    params = SamplingParams(temperature=0, max_tokens=32, logit_bias=bias, **fields,
                            bad_words_token_ids=[list(w) for w in bad_word_ids(engine, "snacks")])
    [want] = engine.generate([PROMPT], params)
    [plain] = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=32))
    assert want.token_ids != plain.token_ids
    done = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, presence_penalty=0.6, frequency_penalty=0.3,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"repetition_penalty": 1.2, "min_tokens": 24, "bad_words": ["snacks"], "return_token_ids": True})
    assert done.choices[0].token_ids == want.token_ids
    assert "snacks" not in done.choices[0].text


@pytest.mark.parametrize("name", sorted(NOT_IMPLEMENTED))
def test_every_field_not_implemented_is_refused_naming_it(client, name):
    value = {"best_of": 3, "skip_special_tokens": False, "add_generation_prompt": False,
             "service_tier": "flex"}.get(name, {"asks": "for something"})
    with pytest.raises(openai.BadRequestError, match=name) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={name: value})
    assert error.value.body["param"] == name
    if name not in IMPLEMENTED[True]:  # chat implements the tool fields
        with pytest.raises(openai.BadRequestError, match=name) as error:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={name: value})
        assert error.value.body["param"] == name


def test_unknown_fields_and_impossible_lengths_are_refused(client, cluster):
    with pytest.raises(openai.BadRequestError, match="max_token.*unknown"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_token": 5})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=CHAT, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens.*context"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="logit_bias.*vocabulary"):
        client.completions.create(model=MODEL, prompt="x", logit_bias={"99999999": 1})
    inert = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=1, presence_penalty=0,
                                           extra_body={"echo": False, "tools": [], "best_of": 1})
    assert inert.choices[0].finish_reason == "length"  # values that ask for nothing pass
    assert wait_for(lambda: all_blocks_free(cluster))


def test_n_completions_differ_repeat_with_their_seed_and_share_the_prompt(client, cluster, engine):
    prompt = "Write one sentence about the weather. " * 12  # several full KV blocks
    num_blocks = (len(engine.tokenizer.encode(prompt)) - 1) // 16
    hits_before = node_stats(cluster.prefill[0]).num_prefix_cache_hit_tokens
    ask = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.8, seed=7, n=4, extra_body={"ignore_eos": True})
    first = client.completions.create(**ask)
    hits = node_stats(cluster.prefill[0]).num_prefix_cache_hit_tokens - hits_before
    assert hits >= 3 * num_blocks * 16  # copies 2-4 found the first one's prompt blocks
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert len(set(texts)) > 1
    assert [c.text for c in sorted(client.completions.create(**ask).choices, key=lambda c: c.index)] == texts
    assert first.usage.completion_tokens == 48
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)]
    assert streamed == texts and chunks[-1].usage.completion_tokens == 48
    assert wait_for(lambda: all_blocks_free(cluster))


def structured_answer(client, schema: dict, stream: bool) -> str:
    ask = dict(model=MODEL, max_tokens=200, temperature=0, messages=[
        {"role": "user", "content": "Fill in an example that fits this schema."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    if not stream:
        return client.chat.completions.create(**ask).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True))


@pytest.mark.parametrize("stream", [False, True])
def test_answers_to_twenty_json_schemas_validate(client, cluster, stream):
    with concurrent.futures.ThreadPoolExecutor(10) as pool:  # batched on the nodes, grammars side by side
        answers = list(pool.map(lambda schema: structured_answer(client, schema, stream), SCHEMAS))
    for schema, answer in zip(SCHEMAS, answers):
        jsonschema.validate(json.loads(answer), schema)
    assert wait_for(lambda: all_blocks_free(cluster))


def test_vllm_structured_outputs_choice_regex_and_bad_schemas(client):
    ask = dict(model=MODEL, max_tokens=20, temperature=0.8, messages=CHAT)
    choice = client.chat.completions.create(**ask, extra_body={"structured_outputs": {"choice": ["cyan", "magenta"]}})
    assert choice.choices[0].message.content in ("cyan", "magenta")
    regex = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body={"guided_regex": "[a-c]{4}"})
    assert re.fullmatch("[a-c]{4}", regex.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="json does not compile"):
        client.chat.completions.create(**ask, extra_body={"guided_json": {"type": "object", "properties": 5}})
    with pytest.raises(openai.BadRequestError, match="only one of"):
        client.chat.completions.create(**ask, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(stream) -> tuple[list[dict], str, int, str]:
    """The tool calls a stream's deltas build, as a client accumulates them, its finish, how
    many chunks carried a piece of arguments, and the content."""
    calls, finish, num_fragments, content = {}, None, 0, ""
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
            num_fragments += bool(delta.function.arguments)
    return [calls[i] for i in sorted(calls)], finish, num_fragments, content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_tool_calls_match_their_parameters(client, tool_choice):
    ask = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=80, temperature=0)
    done = client.chat.completions.create(**ask)
    (call,) = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and done.choices[0].message.content is None
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    calls, finish, num_fragments, _ = streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert calls == [{"name": call.function.name, "arguments": call.function.arguments}] and finish == "tool_calls"
    assert num_fragments > 2  # the arguments stream as they are written, not whole at the end


def test_auto_and_none_tool_choice_and_a_conversation_with_calls(client, engine):
    [plain] = engine.chat([ASK], SamplingParams(temperature=0, max_tokens=16))
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=16, temperature=0)
    assert none.choices[0].message.content == plain.text  # the tools are not shown
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=16, temperature=0)
    assert auto.usage.prompt_tokens > none.usage.prompt_tokens + 50  # they are shown
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
    calls, finish, _, content = streamed_calls(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=16, temperature=0, stream=True))
    assert (content or None, finish) == (auto.choices[0].message.content, auto.choices[0].finish_reason)
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments}
                     for c in auto.choices[0].message.tool_calls or []]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=16, temperature=0)
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > none.usage.prompt_tokens


@pytest.mark.parametrize("fields, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **fields)
    assert error.value.body["param"] == param


def test_echo_with_logprobs_scores_the_prompt_like_the_engine(client, engine):
    """What evaluation harnesses send for a log-likelihood: echo, logprobs, one new token."""
    [want] = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1))
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    choice = done.choices[0]
    assert choice.text == PROMPT + want.text
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [p.logprob for p in want.prompt_logprobs] + [want.logprobs[0].logprob]
    assert len(lp.token_logprobs) == len(expected) + 1
    assert all(close(a, b) for a, b in zip(lp.token_logprobs[1:], expected))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks).startswith(PROMPT) and chunks[0].choices[0].text.startswith(PROMPT)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"echo": True})


def test_a_list_of_prompts_answers_each_with_n_choices(client, engine):
    prompts = ["The capital of France is", [1, 504, 3045, 2136], "Three colors are"]
    want = [c.text for c in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))]
    done = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    texts = {c.index: c.text for c in done.choices}
    assert texts == {i: want[i // 2] for i in range(6)}  # choice i: prompt i // n
    lengths = [len(engine.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    assert done.usage.prompt_tokens == sum(lengths) and done.usage.completion_tokens == 36
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == want and chunks[-1].usage.completion_tokens == 18
