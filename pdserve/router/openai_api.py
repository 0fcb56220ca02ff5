"""The OpenAI API's request and response shapes, checked field by field (torch-free).

`parse_request` turns a /v1/completions or /v1/chat/completions body into a GenerateRequest
for the router, or raises APIError(400) naming the field; a field pdserve does not implement
is refused, never ignored (api_fields.py). The `*_body` and `*_chunk` functions build the
answers in OpenAI's shapes. Extensions, as in vLLM: top_k, min_p, repetition_penalty,
min_tokens, bad_words, stop_token_ids, ignore_eos, cache_salt, return_token_ids (each choice,
and each streamed chunk's choice, also carries the ids of its generated tokens as `token_ids`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pdserve.engine.sampling_params import MAX_BAD_WORDS, MAX_LOGIT_BIAS, MAX_LOGPROBS
from pdserve.protos import pdserve_pb2 as pb

from .api_errors import APIError, bad
from .api_fields import check_fields
from .openai_structured import structured_output
from .openai_tools import ToolPlan, add_tools, calls_as_text, parse_calls, tool_plan
from .openai_logprobs import chat_logprobs, completion_logprobs

MAX_TOKENS_LIMIT = 1 << 31
MAX_N = 16  # as the router
MAX_PROMPTS = 64  # in one completions request
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    generate: pb.GenerateRequest
    return_token_ids: bool = False
    logprobs: bool = False  # each choice carries its tokens' logprobs
    tools: ToolPlan | None = None  # chat with tools in play: calls are parsed from the answers
    echo: bool = False  # completions: the prompt's text (and logprobs) before each answer's
    more: list[pb.GenerateRequest] = field(default_factory=list)  # completions: prompts 2.. of a list

    @property
    def num_choices(self) -> int:
        return (1 + len(self.more)) * self.generate.n


def parse_request(body, chat: bool, model_name: str) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _get(body, "model", str, required=True)
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{model_name}`",
                       param="model", code="model_not_found")
    refused = check_fields(body, chat)
    if refused is not None:
        raise bad(*refused)
    n = _get(body, "n", int)
    if n is not None and not 1 <= n <= MAX_N:
        raise bad("n", f"must be between 1 and {MAX_N}, got {n}")
    stream = bool(_get(body, "stream", bool))
    options = _get(body, "stream_options", dict) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", f"expected a boolean, got {include_usage!r}")
    _get(body, "user", str)  # accepted; not used
    request = pb.GenerateRequest(sampling=_sampling(body, chat),
                                 cache_salt=_get(body, "cache_salt", str) or "", stop=_stop(body))
    request.n = n or 1
    plan = None
    if chat:
        request.messages.CopyFrom(_messages(body))
        plan = _tools(body, request)
    more = []
    if not chat:
        request.echo = bool(_get(body, "echo", bool))
        if request.echo and request.sampling.HasField("logprobs"):  # OpenAI: the prompt's logprobs too
            request.sampling.prompt_logprobs = request.sampling.logprobs
        more = _prompts(body, request)
    return ParsedRequest(chat, model, stream, include_usage, request, bool(_get(body, "return_token_ids", bool)),
                         request.sampling.HasField("logprobs"), plan, request.echo, more)


def _tools(body: dict, request: pb.GenerateRequest) -> ToolPlan | None:
    """The tools into the conversation, and `required` or a named call as the answer's schema."""
    _get(body, "parallel_tool_calls", bool)  # either way: an answer holds one call or several
    plan = tool_plan(body)
    if plan is None:
        return None
    add_tools(request.messages, plan)
    schema = plan.schema()
    if schema is not None:
        if request.sampling.HasField("structured_output"):
            raise bad("tool_choice", "a required or named tool call cannot be combined with a structured output")
        request.sampling.structured_output.CopyFrom(pb.StructuredOutput(kind="json", spec=json.dumps(schema)))
    return plan


def _sampling(body: dict, chat: bool) -> pb.SamplingParams:
    msg = pb.SamplingParams()
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                      else "max_tokens", int)
    if max_tokens is not None:
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise bad("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}")
        msg.max_tokens = max_tokens
    elif chat:
        msg.max_tokens = 0  # chat: until the context is full (OpenAI's default)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        value = _get(body, name, float)
        if value is not None:
            if not low <= value <= high or (name == "top_p" and value == 0):
                raise bad(name, f"must be in {'(' if name == 'top_p' else '['}{low}, {high}], got {value}")
            setattr(msg, name, value)
    top_k = _get(body, "top_k", int)
    if top_k is not None:
        if top_k < -1 or top_k > MAX_TOKENS_LIMIT:
            raise bad("top_k", f"must be -1 (off) or a positive integer, got {top_k}")
        msg.top_k = top_k
    seed = _get(body, "seed", int)
    if seed is not None:
        if not -2**63 <= seed < 2**63:
            raise bad("seed", "must fit in 64 bits")
        msg.seed = seed
    stop_ids = _get(body, "stop_token_ids", list) or []
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < MAX_TOKENS_LIMIT for t in stop_ids):
        raise bad("stop_token_ids", "expected a list of token ids")
    msg.stop_token_ids.extend(stop_ids)
    msg.ignore_eos = bool(_get(body, "ignore_eos", bool))
    _processors(body, msg)
    _logprobs(body, chat, msg)
    structured = structured_output(body)
    if structured is not None:
        if msg.ignore_eos:
            raise bad("ignore_eos", "a structured output ends with its grammar; it cannot ignore EOS")
        msg.structured_output.CopyFrom(structured)
    return msg


def _processors(body: dict, msg: pb.SamplingParams) -> None:
    """Penalties, logit_bias, min_tokens and bad_words (the router checks token ids)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _get(body, name, float)
        if value is not None:
            if not -2 <= value <= 2:
                raise bad(name, f"must be in [-2, 2], got {value}")
            setattr(msg, name, value)
    repetition = _get(body, "repetition_penalty", float)
    if repetition is not None:
        if not 0 < repetition <= 10:
            raise bad("repetition_penalty", f"must be in (0, 10], got {repetition}")
        msg.repetition_penalty = repetition
    bias = _get(body, "logit_bias", dict) or {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise bad("logit_bias", f"keys must be token ids, got {key!r}"[:200])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad("logit_bias", f"the bias of token {key} must be a number in [-100, 100], got {value!r}"[:200])
        msg.logit_bias[int(key)] = float(value)
    min_tokens = _get(body, "min_tokens", int)
    if min_tokens is not None:
        if not 0 <= min_tokens <= MAX_TOKENS_LIMIT or (msg.HasField("max_tokens") and 0 < msg.max_tokens < min_tokens):
            raise bad("min_tokens", f"must be between 0 and max_tokens, got {min_tokens}")
        msg.min_tokens = min_tokens
    words = _get(body, "bad_words", list) or []
    if len(words) > MAX_BAD_WORDS or not all(isinstance(w, str) and w.strip() and len(w) <= 200 for w in words):
        raise bad("bad_words", f"expected at most {MAX_BAD_WORDS} non-empty strings of at most 200 characters")
    msg.bad_words.extend(words)


def _logprobs(body: dict, chat: bool, msg: pb.SamplingParams) -> None:
    """Chat: `logprobs` true, with `top_logprobs` k; completions: `logprobs` k."""
    if chat:
        top = _get(body, "top_logprobs", int)
        if not _get(body, "logprobs", bool):
            if top is not None:
                raise bad("top_logprobs", "needs logprobs: true")
            return
        k = top or 0
        name = "top_logprobs"
    else:
        k, name = _get(body, "logprobs", int), "logprobs"
        if k is None:
            return
    if not 0 <= k <= MAX_LOGPROBS:
        raise bad(name, f"must be between 0 and {MAX_LOGPROBS}, got {k}")
    msg.logprobs = k


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "expected a string or a list of strings")
    return stop


def _prompts(body: dict, request: pb.GenerateRequest) -> list[pb.GenerateRequest]:
    """The prompt into `request`; a list of prompts: the first into it, and a copy of it for
    each other one (returned)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad("prompt", f"at most {MAX_PROMPTS} prompts in one request")
        more = []
        for i, p in enumerate(prompt[1:], 1):
            other = pb.GenerateRequest()
            other.CopyFrom(request)
            _prompt(p, other, f"prompt[{i}]")
            more.append(other)
        _prompt(prompt[0], request, "prompt[0]")
        return more
    _prompt(prompt, request, "prompt")
    return []


def _prompt(prompt, request: pb.GenerateRequest, param: str) -> None:
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < 2**32 for t in prompt):
            raise bad(param, "token ids must be non-negative 32-bit integers")
        request.token_ids.ids.extend(prompt)
    elif prompt is None:
        raise bad(param, "required")
    else:
        raise bad(param, "expected a string, a list of token ids, or a list of those")


def _messages(body: dict) -> pb.ChatMessages:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    out = pb.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "expected an object with a string role")
        if m["role"] == "assistant" and m.get("tool_calls"):  # an earlier turn's calls, as written
            content = "\n".join(t for t in (_content(m.get("content") or "", f"messages[{i}].content"),
                                            calls_as_text(m["tool_calls"], f"messages[{i}].tool_calls")) if t)
        else:
            content = _content(m.get("content"), f"messages[{i}].content")
        out.messages.add(role=m["role"], content=content)
    return out


def _content(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(param, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(param, "expected a string or a list of text parts")


def _get(body: dict, name: str, kind: type, required: bool = False):
    """body[name] checked against `kind` (None when absent or null)."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad(name, "required")
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise bad(name, f"expected {_KIND_NAMES[kind]}, got {value!r}"[:200])
    return float(value) if kind is float else value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "a list"}


# ---- answers ---------------------------------------------------------------------------

def total_usage(usages: dict[int, pb.Usage], n: int) -> pb.Usage:
    """The usage of a request's choices ({index: its usage}): each prompt once (its n
    completions share it), every completion's tokens."""
    prompts = {index // n: u for index, u in usages.items()}
    return pb.Usage(prompt_tokens=sum(u.prompt_tokens for u in prompts.values()),
                    cached_tokens=sum(u.cached_tokens for u in prompts.values()),
                    completion_tokens=sum(u.completion_tokens for u in usages.values()))


def usage_body(usage: pb.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass
class Choice:
    """One of a request's n completions, as collected for a non-streamed answer."""

    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_text: str = ""  # with echo
    prompt_logprobs: list = field(default_factory=list)  # with echo and logprobs: prompt tokens 1..

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids += response.token_ids
        self.logprobs += response.logprobs
        self.prompt_text += response.prompt_text
        self.prompt_logprobs += response.prompt_logprobs


def response_body(parsed: ParsedRequest, request_id: str, created: int, choices: list[Choice],
                  usage: pb.Usage) -> dict:
    body = []
    for index, c in enumerate(choices):
        finish_reason = c.finish_reason
        if parsed.chat:
            message, finish_reason = chat_message(parsed, c)
            choice = {"index": index, "message": message}
        else:
            choice = {"index": index, "text": c.prompt_text + c.text}
        choice |= {"logprobs": _logprobs_body(parsed, c.logprobs, 0, c.prompt_text, c.prompt_logprobs),
                   "finish_reason": finish_reason}
        if parsed.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        body.append(choice)
    return {"id": request_id, "object": "chat.completion" if parsed.chat else "text_completion",
            "created": created, "model": parsed.model, "choices": body, "usage": usage_body(usage)}


def chat_message(parsed: ParsedRequest, choice: Choice) -> tuple[dict, str | None]:
    """A chat choice's message and finish reason; with tools, the calls parsed out of it
    (finish reason "tool_calls" when the answer ended by itself and made calls)."""
    if parsed.tools is None:
        return {"role": "assistant", "content": choice.text}, choice.finish_reason
    content, calls = parse_calls(parsed.tools, choice.text)
    message = {"role": "assistant", "content": content}
    if not calls:
        return message, choice.finish_reason
    message["tool_calls"] = calls
    return message, "tool_calls" if choice.finish_reason == "stop" else choice.finish_reason


def chunk_body(parsed: ParsedRequest, request_id: str, created: int, text: str | None,
               finish_reason: str | None, usage: pb.Usage | None = None, first: bool = False,
               token_ids: list[int] = (), logprobs=(), text_offset: int = 0, index: int = 0,
               prompt_text: str = "", prompt_logprobs=(), delta: dict | None = None) -> dict:
    """One streamed chunk of completion `index`; `text` None with `usage`: the final
    usage-only chunk. `text_offset` (completions' logprobs): where this chunk's text starts in
    its whole completion. With echo the first chunk carries the prompt's text (and logprobs).
    `delta` (chat with tools): what the chunk's delta says instead of `text`."""
    lp = _logprobs_body(parsed, logprobs, text_offset, prompt_text, prompt_logprobs)
    text = prompt_text + text if text is not None else None
    if parsed.chat:
        delta = {"content": text} if delta is None else delta
        delta = {"role": "assistant", **delta} if first else delta
        choices = [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]
        kind = "chat.completion.chunk"
    else:
        choices = [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}]
        kind = "text_completion"
    if parsed.return_token_ids:
        choices[0]["token_ids"] = list(token_ids)
    body = {"id": request_id, "object": kind, "created": created, "model": parsed.model,
            "choices": [] if text is None else choices}
    if parsed.include_usage:
        body["usage"] = usage_body(usage) if usage is not None else None
    return body


def _logprobs_body(parsed: ParsedRequest, logprobs, text_offset: int = 0, prompt_text: str = "",
                   prompt_logprobs=()) -> dict | None:
    if not parsed.logprobs:
        return None
    if parsed.chat:
        return chat_logprobs(logprobs)
    if not prompt_text:
        return completion_logprobs(logprobs, text_offset)
    return completion_logprobs(logprobs, text_offset, prompt_text, prompt_logprobs)
