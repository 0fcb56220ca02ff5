"""Structured output in the engine with the real SmolLM2 model: every answer to 20 JSON schemas
parses and validates (jsonschema), and regexes, choices and grammars hold; a resumed request
keeps its grammar's state; what does not compile is refused naming the field."""

import json
import re

import jsonschema
import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput

from ..schemas import SCHEMAS

QUESTIONS = ["Describe a person.", "Tell me about a city.", "Pick a color.", "Write a blog post header.",
             "Name a book.", "Is the sky blue?", "Price a coffee.", "Give some numbers.", "How to boil water?",
             "A point on a plane.", "I love this movie!", "Make a user record.", "A shopping list.",
             "What is 6 times 7?", "Your favourite language?", "A historical event.", "A 2x2 matrix.",
             "Where do you live?", "Is the ticket open?", "Summarize: cats sleep a lot."]


@pytest.fixture(scope="module")
def engine():
    return Engine(model="smollm2-135m", num_kv_blocks=1024)


def chat(engine, question: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": f"{question} Answer in JSON."}])


def test_every_answer_to_twenty_schemas_validates(engine):
    prompts = [chat(engine, q) for q in QUESTIONS]
    params = [SamplingParams(temperature=0, max_tokens=200, structured_output=StructuredOutput("json", json.dumps(s)))
              for s in SCHEMAS]
    for schema, result in zip(SCHEMAS, engine.generate(prompts, params)):  # one batch, all grammars
        assert result.finish_reason.value == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    assert not engine.grammars.matchers and engine.stats()["num_free_blocks"] == 1024


@pytest.mark.parametrize("kind, spec, check", [
    ("json_object", "", lambda text: isinstance(json.loads(text), dict)),
    ("regex", r"[0-9]{3}-[a-z]{2}", lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
    ("choice", json.dumps(["yes", "no", "maybe"]), lambda text: text in ("yes", "no", "maybe")),
    ("grammar", 'root ::= "The answer is " [0-9]+ "."', lambda text: re.fullmatch(r"The answer is [0-9]+\.", text)),
])
def test_regexes_choices_and_grammars_hold(engine, kind, spec, check):
    prompts = [chat(engine, q) for q in ("Is the sky blue?", "What is 6 times 7?", "Pick a color.", "Is it open?")]
    # free-form JSON from a 135M model loops (nested objects without end): a repetition penalty ends it
    extra = dict(temperature=0, repetition_penalty=1.3) if kind == "json_object" else dict(temperature=0.7, seed=3)
    params = SamplingParams(**extra, max_tokens=200, structured_output=StructuredOutput(kind, spec))
    for result in engine.generate(prompts, params):
        assert result.finish_reason.value == "stop" and check(result.text), result.text


def test_a_resumed_request_keeps_its_grammar_state(engine):
    """The prompt carries the first k output tokens (a stream resumed on another node): the
    matcher accepts them first, so the rest equals the uninterrupted answer."""
    so = StructuredOutput("json", json.dumps(SCHEMAS[4]))
    prompt = chat(engine, QUESTIONS[4])
    whole = engine.generate([prompt], SamplingParams(temperature=0.9, seed=1, max_tokens=200, structured_output=so))[0]
    k = 7
    rest = engine.generate([prompt + whole.token_ids[:k]], SamplingParams(
        temperature=0.9, seed=1, max_tokens=200 - k, structured_output=so, num_resumed_tokens=k))[0]
    assert whole.token_ids[:k] + rest.token_ids == whole.token_ids


@pytest.mark.parametrize("so, message", [
    (StructuredOutput("json", "{not json"), "json does not compile"),
    (StructuredOutput("regex", "(unclosed"), "regex does not compile"),
    (StructuredOutput("grammar", "root ::= undefined_rule"), "grammar does not compile"),
    (StructuredOutput("xml", ""), "structured_output: kind must be one of"),
])
def test_what_does_not_compile_is_refused(engine, so, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request([1, 2, 3], SamplingParams(structured_output=so))
    assert not engine.requests


def test_a_model_without_a_tokenizer_refuses_structured_output():
    engine = Engine(model="dummy:tiny", num_kv_blocks=16)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(structured_output=StructuredOutput("json_object")))
