"""Log probabilities in OpenAI's two shapes, from the router's TokenLogprob messages (torch-free).

Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.protos import pdserve_pb2 as pb


def chat_logprobs(logprobs: Sequence[pb.TokenLogprob]) -> dict:
    return {"content": [
        {**_entry(lp.token, lp.logprob),
         "top_logprobs": [_entry(t, v) for t, v in zip(lp.top_tokens, lp.top_logprobs)]}
        for lp in logprobs]}


def completion_logprobs(logprobs: Sequence[pb.TokenLogprob], text_offset: int = 0, prompt_text: str = "",
                        prompt_logprobs: Sequence[pb.TokenLogprob] = ()) -> dict:
    """`text_offset`: where the first token's text starts in the completion's text. With echo
    (`prompt_text`), the prompt's tokens come first, the first of them without a logprob (its
    text: what the prompt's text has before the others')."""
    entries = list(prompt_logprobs) + list(logprobs)
    tokens = [lp.token for lp in entries]
    values: list = [lp.logprob for lp in entries]
    tops: list = [dict(zip(lp.top_tokens, lp.top_logprobs)) for lp in entries]
    if prompt_text:
        tokens.insert(0, prompt_text[:max(0, len(prompt_text) - sum(len(lp.token) for lp in prompt_logprobs))])
        values.insert(0, None)
        tops.insert(0, None)
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
