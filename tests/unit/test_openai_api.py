"""Stop strings across chunk edges, and the OpenAI request checks (pure functions)."""

import json
import random

import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.openai_api import APIError, parse_request
from pdserve.router.stop_strings import StopStringMatcher


def stream_through(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for i, piece in enumerate(pieces):
        text, stopped = matcher.push(piece, final=i == len(pieces) - 1)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out), False


@pytest.mark.parametrize("seed", range(50))
def test_stop_strings_cut_exactly_however_the_text_is_split(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c\n") for _ in range(rng.randrange(0, 40)))
    stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[:min(hits)], True) if hits else (text, False)  # oracle: the whole text at once
    assert stream_through(StopStringMatcher(stops), pieces) == expected


def test_text_that_cannot_start_a_stop_string_is_not_held():
    matcher = StopStringMatcher(["END"])
    assert matcher.push("hello E") == ("hello ", False)  # "E" might begin "END"
    assert matcher.push("X") == ("EX", False)
    assert matcher.push("EN") == ("", False)
    assert matcher.push("D!") == ("", True)


BASE = {"model": "m", "prompt": "hi", "max_tokens": 3}


def parse(chat=False, **fields):
    body = {**BASE, **fields}
    if chat:
        body.pop("prompt")
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_request({k: v for k, v in body.items() if v is not ...}, chat, "m")


@pytest.mark.parametrize("fields, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"n": 17}, "n"), ({"seed": 2**70}, "seed"),
    ({"stop": 5}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"prompt": ...}, "prompt"),
    ({"prompt": ["a", [1, -5]]}, "prompt[1]"), ({"prompt": ["a", 5]}, "prompt"), ({"prompt": [1, -2]}, "prompt"), ({"prompt": ["a"] * 65}, "prompt"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"echo": "yes"}, "echo"), ({"max_token": 5}, "max_token"),
    ({"response_format": {"type": "xml"}}, "response_format"), ({"best_of": 2}, "best_of"),
    ({"guided_json": "{bad"}, "guided_json"), ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"min_tokens": 4}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"skip_special_tokens": False}, "skip_special_tokens"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": ...}, "model"), ({"presence_penalty": 2.5}, "presence_penalty"),
])
def test_bad_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as error:
        parse(**fields)
    assert error.value.status == 400 and error.value.param == param and param in error.value.message


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ("hi", "messages"), ([{"content": "x"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
])
def test_bad_messages_are_400(messages, param):
    with pytest.raises(APIError) as error:
        parse(chat=True, messages=messages)
    assert error.value.status == 400 and error.value.param == param


def test_unknown_model_is_404_and_good_requests_map_to_the_router_api():
    with pytest.raises(APIError) as error:
        parse(model="other")
    assert error.value.status == 404 and error.value.code == "model_not_found"
    parsed = parse(prompt=[5, 6], temperature=0, top_k=3, seed=7, stop="x", ignore_eos=True, user="u",
                   stream=True, stream_options={"include_usage": True}, echo=False, best_of=1, tools=[],
                   presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"7": -3},
                   min_tokens=2, bad_words=["no"], logprobs=2)
    g = parsed.generate
    assert list(g.token_ids.ids) == [5, 6] and list(g.stop) == ["x"] and parsed.include_usage
    assert (g.sampling.temperature, g.sampling.top_k, g.sampling.seed, g.sampling.max_tokens) == (0, 3, 7, 3)
    assert not g.sampling.HasField("top_p") and g.sampling.ignore_eos
    assert (g.sampling.presence_penalty, g.sampling.frequency_penalty, g.sampling.repetition_penalty) == (0.5, -1, 1.2)
    assert dict(g.sampling.logit_bias) == {7: -3.0} and g.sampling.min_tokens == 2 and g.sampling.logprobs == 2
    assert list(g.sampling.bad_words) == ["no"] and parsed.logprobs
    chat = parse(chat=True, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}],
                 max_tokens=..., max_completion_tokens=9)
    assert chat.generate.messages.messages[0].content == "ab" and chat.generate.sampling.max_tokens == 9
    assert parse(chat=True, max_tokens=...).generate.sampling.max_tokens == 0  # chat: until the end
    assert isinstance(chat.generate, pb.GenerateRequest)


TOOL_ANSWERS = [
    'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, {"y": 2}], "s": "a}\\"b"}}\n</tool_call>\n'
    '<tool_call>{"name": "g"}</tool_call>\nDone.',
    'no calls <tool_call>not json</tool_call> end ',
    '  a plain answer with < and <tool_ and trailing space  ',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
    '<tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call>',
]


def accumulated(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """What a client builds from a stream's deltas: content, and each call's name and arguments."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            call["name"] += part["function"].get("name", "")
            call["arguments"] += part["function"].get("arguments", "")
    return content or None, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", TOOL_ANSWERS)
def test_tool_calls_streamed_in_any_pieces_equal_the_collected_answer(text):
    from pdserve.router.openai_tools import ToolPlan, parse_calls
    from pdserve.router.tool_stream import ToolStream
    content, calls = parse_calls(ToolPlan("auto", []), text)
    want = (content, [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls])
    for seed in range(40):
        rng, stream, deltas, i = random.Random(seed), ToolStream(wrapped=True), [], 0
        while i < len(text):
            n = rng.randint(1, 5)
            deltas.append(stream.push(text[i:i + n]))
            i += n
        deltas.append(stream.finish())
        assert accumulated(deltas) == want
        starts = [p for d in deltas for p in d.get("tool_calls", []) if "id" in p]
        assert [p["index"] for p in starts] == list(range(len(calls)))  # each call opens once, in order


def test_a_call_streams_its_arguments_as_they_are_written():
    from pdserve.router.tool_stream import ToolStream
    stream = ToolStream(wrapped=False)  # required / named: the answer is the call's object
    pieces = ['{"name": "get_', 'weather", "argu', 'ments": {"ci', 'ty": "Par', 'is", "unit": "C"', '}}']
    deltas = [stream.push(p) for p in pieces] + [stream.finish()]
    assert deltas[0] == {} and deltas[1] == {}  # the name is not known yet
    (start,) = deltas[2]["tool_calls"]
    assert start["id"].startswith("call_") and start["function"] == {"name": "get_weather", "arguments": '{"ci'}
    fragments = [p["function"]["arguments"] for d in deltas[3:] for p in d.get("tool_calls", [])]
    assert fragments == ['ty": "Par', 'is", "unit": "C"', "}"] and not any("content" in d for d in deltas)
    cut = ToolStream(wrapped=False)
    cut.push('{"name": "f", "arguments": {"x": "ab')
    assert cut.cut and cut.finish() == {}  # max_tokens inside the arguments: nothing more to say


def test_auto_tool_calls_are_parsed_out_of_the_answer_and_bad_ones_stay_content():
    from pdserve.router.openai_tools import ToolPlan, parse_calls
    plan = ToolPlan("auto", [{"name": "f", "description": "", "parameters": {}}])
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    content, calls = parse_calls(plan, text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1} and calls[1]["function"]["arguments"] == "{}"
    assert parse_calls(plan, "no calls <tool_call>not json</tool_call>") == ("no calls <tool_call>not json</tool_call>", [])
    required = ToolPlan("required", plan.tools)
    assert parse_calls(required, '{"name": "f", "arguments": {}}')[0] is None
    assert parse_calls(required, '{"name": "f", "argu') == ('{"name": "f", "argu', [])  # cut by max_tokens
