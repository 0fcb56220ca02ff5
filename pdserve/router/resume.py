"""A stream that another router was serving when it went away, taken over here (torch-free).

The gateway sends the same request with the tokens the client has received
(`resume_token_ids`) and how many characters of their text it has seen (`resume_text_chars`).
The tokens become the Progress's `sent`, as after a node died mid-stream (they count against
max_tokens, min_tokens and as output for penalties; the node's prompt ends with them). Their
text is what the other router made of them: the same detokenizer and stop-string matcher run
over them here, and whatever that releases past the characters the client has seen goes out
first (text the other router still held back, a stop string's possible start or part of a
character); the matcher keeps holding what it holds, as the other router did.
"""

from __future__ import annotations

from pdserve.protos import pdserve_pb2 as pb

from .detokenizer import IncrementalDetokenizer
from .progress import Progress


def resume(progress: Progress, request: pb.GenerateRequest, tokenizer, vocab_size: int, max_model_len: int) -> None:
    """Sets `progress` to continue after `request.resume_token_ids`. Raises ValueError."""
    tokens = list(request.resume_token_ids)
    if not tokens:
        if request.resume_text_chars:
            raise ValueError("resume_text_chars: only with resume_token_ids")
        return
    if request.n > 1:
        raise ValueError("resume_token_ids: only a request of one completion (n 1) resumes")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"resume_token_ids: {bad} is not a token id of this model")
    max_tokens = progress.params.max_tokens
    if max_tokens is not None and len(tokens) >= max_tokens:
        raise ValueError(f"resume_token_ids: {len(tokens)} tokens, the request ends after max_tokens {max_tokens}")
    if len(progress.prompt) + len(tokens) >= max_model_len:
        raise ValueError(f"resume_token_ids: with the prompt, {len(progress.prompt) + len(tokens)} tokens fill "
                         f"the context of {max_model_len}")
    progress.sent = tokens
    progress.echo = False  # the client has the prompt's text from the first router
    if tokenizer is None:
        return
    text = IncrementalDetokenizer(tokenizer, progress.prompt).push(tokens)
    if progress.stop is not None:
        text, _ = progress.stop.push(text)
    progress.pending_text = text[request.resume_text_chars:]
