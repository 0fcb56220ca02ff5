"""A Generate request checked field by field and turned into the Progress of its first
completion (torch-free). Every problem is a ValueError naming the field."""

from __future__ import annotations

from pdserve.protos import pdserve_pb2 as pb
from pdserve.service.convert import sampling_from_proto

from .progress import Progress
from .prompts import prompt_token_ids
from .resume import resume
from .stop_strings import StopStringMatcher, validate_stop

MAX_REQUEST_ID_CHARS = 256
MAX_N = 16  # completions per request
MAX_CACHE_SALT_CHARS = 256


async def checked_request(request: pb.GenerateRequest, tokenizer, vocab_size: int, max_model_len: int) -> Progress:
    if request.n > MAX_N:
        raise ValueError(f"n: at most {MAX_N} completions per request, got {request.n}")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id: longer than {MAX_REQUEST_ID_CHARS} characters")
    if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt: longer than {MAX_CACHE_SALT_CHARS} characters")
    prompt = await prompt_token_ids(request, tokenizer, max_model_len)
    params = sampling_from_proto(request.sampling, (lambda word: bad_word_ids(tokenizer, word)) if tokenizer else None)
    params.validate(vocab_size)
    if params.num_resumed_tokens:
        raise ValueError("sampling.num_resumed_tokens: set by the router for the nodes, not by clients")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt.token_ids: {bad} is not a token id of this model (vocabulary of {vocab_size})")
    if len(prompt) >= max_model_len:
        raise ValueError(f"prompt: {len(prompt)} tokens, the model takes at most "
                         f"{max_model_len - 1} (max_model_len {max_model_len})")
    if params.max_tokens is not None and len(prompt) + params.max_tokens > max_model_len:
        raise ValueError(f"max_tokens: {params.max_tokens} new tokens after a prompt of {len(prompt)} "
                         f"exceed the context of {max_model_len} tokens (leave max_tokens unset for "
                         "'until the context is full')")
    validate_stop(list(request.stop))
    if request.stop and tokenizer is None:
        raise ValueError("stop: this model has no tokenizer to match text; use stop_token_ids")
    if request.echo and tokenizer is None:
        raise ValueError("echo: this model has no tokenizer to write the prompt's text")
    progress = Progress(prompt, params, StopStringMatcher(list(request.stop)) if request.stop else None,
                        echo=request.echo)
    resume(progress, request, tokenizer, vocab_size, max_model_len)
    return progress


def bad_word_ids(tokenizer, word: str) -> list[list[int]]:
    """A bad word's token ids as it would start the text and after a space (vLLM's rule)."""
    if not word.strip():
        raise ValueError("bad_words: a word must not be empty")
    variants = {tuple(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)) for prefix in ("", " ")}
    return [list(ids) for ids in sorted(variants) if ids]
