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


def completion_logprobs(logprobs: Sequence[pb.TokenLogprob], text_offset: int = 0) -> dict:
    """`text_offset`: where the first token's text starts in the completion's text."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(zip(lp.top_tokens, lp.top_logprobs)) for lp in logprobs],
            "text_offset": offsets}


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
