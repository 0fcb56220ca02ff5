"""A GenerateRequest's prompt as token ids: given as ids, or tokenized from raw text or chat
messages (the model's chat template), off the event loop; ValueError naming the field."""

from __future__ import annotations

import asyncio

from pdserve.protos import pdserve_pb2 as pb

MAX_CHARS_PER_TOKEN = 32  # a prompt longer than this many characters a token cannot fit the context
CHAT_ROLES = ("system", "user", "assistant", "tool")


async def prompt_token_ids(request: pb.GenerateRequest, tokenizer, max_model_len: int) -> list[int]:
    """The prompt's ids. Text longer than `max_model_len` tokens could hold is refused before
    any tokenizing, so a flood of huge prompts cannot keep the tokenizer threads busy."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt: set one of text, token_ids or messages")
    if kind == "token_ids":
        prompt = list(request.token_ids.ids)
    else:
        if tokenizer is None:
            raise ValueError(f"prompt.{kind}: this model has no tokenizer; send token_ids")
        num_chars = len(request.text) if kind == "text" else sum(len(m.content) for m in request.messages.messages)
        if num_chars > max_model_len * MAX_CHARS_PER_TOKEN:
            raise ValueError(f"prompt.{kind}: {num_chars} characters cannot fit the context of {max_model_len} "
                             f"tokens (at most {max_model_len * MAX_CHARS_PER_TOKEN} characters are taken)")
        prompt = await asyncio.to_thread(_tokenize, request, kind, tokenizer)
    if not prompt:
        raise ValueError(f"prompt.{kind}: the prompt is empty")
    return prompt


def _tokenize(request: pb.GenerateRequest, kind: str, tokenizer) -> list[int]:
    if kind == "text":
        return tokenizer.encode(request.text) if request.text else []
    messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"prompt.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {m['role']!r}")
    if not messages:
        return []
    try:
        return tokenizer.encode_chat(messages)
    except Exception as e:  # a template that rejects the conversation
        raise ValueError(f"prompt.messages: the chat template failed: {e}") from None
