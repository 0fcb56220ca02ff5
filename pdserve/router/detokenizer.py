"""Incremental detokenization for streaming (torch-free).

Decoding each new token alone breaks words and multi-byte characters, decoding everything
again each time is quadratic. Like vLLM, decode a short window before the new tokens and
emit only what the new tokens added; hold text back while it ends in a partial UTF-8
character (U+FFFD) until more tokens complete it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-6:])  # a little context for the first word
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def push(self, new_token_ids: list[int], final: bool = False) -> str:
        """The text that `new_token_ids` add. `final`: flush, even a partial character."""
        self.token_ids += new_token_ids
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix):]


def named_logprobs(tokenizer, logprobs) -> list:
    """The TokenLogprob messages with each token's text (a token cut inside a UTF-8 character
    reads as U+FFFD), for clients that show them; as they are without a tokenizer."""
    if not logprobs or tokenizer is None:
        return list(logprobs)
    for lp in logprobs:
        lp.token = tokenizer.decode([lp.token_id], skip_special_tokens=False)
        lp.top_tokens[:] = [tokenizer.decode([t], skip_special_tokens=False) for t in lp.top_token_ids]
    return list(logprobs)
