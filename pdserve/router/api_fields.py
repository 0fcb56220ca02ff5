"""Which request fields the OpenAI gateway implements, and the refusal of every other one.

A field that would change the answer is implemented or refused with a 400 naming it, never
accepted and ignored. Three kinds:
- implemented (per endpoint): parsed and checked by `openai_api`;
- documented by OpenAI or vLLM but not implemented here: refused unless its value is one
  that asks for nothing (null, false, 0, an empty list, or the field's own default such as
  `best_of: 1`), since clients and frameworks send those by habit;
- anything else: refused as unknown (a typo such as `max_token` must not pass unnoticed).
"""

from __future__ import annotations

COMMON = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "stop", "stop_token_ids", "ignore_eos", "cache_salt", "return_token_ids", "user", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
    "bad_words", "logprobs", "response_format", "structured_outputs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar",
})
IMPLEMENTED = {
    True: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                    "parallel_tool_calls"},  # chat
    False: COMMON | {"prompt", "echo"},  # completions
}
_NOTHING = (None, False, 0, [], {}, "")
# documented elsewhere, not implemented here: the values that ask for nothing
NOT_IMPLEMENTED: dict[str, tuple] = {
    **{name: _NOTHING for name in (
        "echo", "suffix", "tools", "tool_choice", "functions", "function_call", "guided_decoding_backend", "guided_whitespace_pattern", "prompt_logprobs", "allowed_token_ids",
        "include_stop_str_in_output", "truncate_prompt_tokens", "use_beam_search", "length_penalty",
        "continue_final_message", "documents", "chat_template", "chat_template_kwargs",
        "mm_processor_kwargs", "logits_processors", "priority", "request_id", "store", "metadata",
        "modalities", "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
        "prompt_cache_key", "safety_identifier", "kv_transfer_params", "vllm_xargs",
        "spaces_between_special_tokens", "add_special_tokens", "min_tokens_ratio")},
    "parallel_tool_calls": (None, True, False),  # without tools it asks for nothing
    "best_of": (None, 1),
    "skip_special_tokens": (None, True),  # what pdserve does
    "add_generation_prompt": (None, True),  # what pdserve does for chats
    "service_tier": (None, "auto", "default"),
}


def check_fields(body: dict, chat: bool) -> tuple[str, str] | None:
    """(field, reason) for the first field this endpoint must refuse, or None."""
    implemented = IMPLEMENTED[chat]
    for name, value in body.items():
        if name in implemented:
            continue
        inert = NOT_IMPLEMENTED.get(name)
        if inert is None:
            where = "/v1/chat/completions" if chat else "/v1/completions"
            return name, f"is not a field of {where} (unknown fields are refused, not ignored)"
        if not any(value == v and type(value) is type(v) for v in inert):  # 0.0 is not 0, nor False
            return name, "is not supported by pdserve"
    return None
