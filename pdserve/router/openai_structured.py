"""The request fields that ask for structured output, in OpenAI's and vLLM's spellings, as one
StructuredOutput for the nodes (torch-free; the nodes compile it and refuse what does not).

- OpenAI: `response_format` {"type": "text" | "json_object" | "json_schema", "json_schema":
  {"name", "schema", "strict"}};
- vLLM: `structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object"}, and the
  older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
At most one of them may ask for something.
"""

from __future__ import annotations

import json

from pdserve.engine.sampling_params import MAX_STRUCTURED_SPEC_CHARS
from pdserve.protos import pdserve_pb2 as pb

from .api_errors import bad

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
VLLM_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json_object"}


def structured_output(body: dict) -> pb.StructuredOutput | None:
    asked = [(name, spec) for name, spec in (_response_format(body), _structured_outputs(body), *_guided(body))
             if spec is not None]
    if len(asked) > 1:
        raise bad(asked[1][0], f"only one of response_format, structured_outputs and guided_* may be set "
                               f"(also got {asked[0][0]})")
    if not asked:
        return None
    name, (kind, spec) = asked[0]
    if len(spec) > MAX_STRUCTURED_SPEC_CHARS:
        raise bad(name, f"longer than {MAX_STRUCTURED_SPEC_CHARS} characters")
    return pb.StructuredOutput(kind=kind, spec=spec)


def _response_format(body: dict):
    fmt = body.get("response_format")
    if fmt is None:
        return "response_format", None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                     "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}")
    if fmt["type"] == "text":
        return "response_format", None
    if fmt["type"] == "json_object":
        return "response_format", ("json_object", "")
    schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema", "expected a JSON schema object")
    return "response_format", ("json", json.dumps(schema))


def _structured_outputs(body: dict):
    spec = body.get("structured_outputs")
    if spec is None:
        return "structured_outputs", None
    if not isinstance(spec, dict):
        raise bad("structured_outputs", "expected an object with one of " + ", ".join(VLLM_KINDS))
    unknown = sorted(set(spec) - set(VLLM_KINDS))
    if unknown:
        raise bad(f"structured_outputs.{unknown[0]}", "is not supported by pdserve")
    asked = [k for k, v in spec.items() if v not in (None, False)]
    if len(asked) != 1:
        raise bad("structured_outputs", "expected exactly one of " + ", ".join(VLLM_KINDS))
    kind = asked[0]
    return "structured_outputs", _spec(f"structured_outputs.{kind}", VLLM_KINDS[kind], spec[kind])


def _guided(body: dict):
    for name, kind in GUIDED.items():
        value = body.get(name)
        yield name, None if value is None else _spec(name, kind, value)


def _spec(param: str, kind: str, value) -> tuple[str, str]:
    """(kind, spec text) from a field's value, checked for its shape."""
    if kind == "json_object":
        if value is not True:
            raise bad(param, "expected true")
        return kind, ""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad(param, "expected a JSON schema (an object, or its JSON text)") from None
        if not isinstance(value, dict):
            raise bad(param, "expected a JSON schema object")
        return kind, json.dumps(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad(param, "expected a non-empty list of non-empty strings")
        return kind, json.dumps(value)
    if not isinstance(value, str) or not value:
        raise bad(param, "expected a non-empty string")
    return kind, value
