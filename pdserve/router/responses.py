"""A decode node's chunk, as the router streams it to its client."""

from __future__ import annotations

import time

from pdserve.engine.request import FinishReason
from pdserve.protos import pdserve_pb2 as pb
from pdserve.service.convert import FINISH_TO_PROTO

from . import request_metrics
from .detokenizer import named_logprobs
from .progress import Chunk, Progress


def chunk_response(tokenizer, request_id: str, progress: Progress, detok, chunk: Chunk) -> pb.GenerateResponse:
    """The GenerateResponse of a decode chunk: its tokens and their text (stop strings applied),
    the prompt's logprobs and text with the first, usage and timings with the last; `progress`
    takes the tokens and the time."""
    token_ids, reason = chunk.token_ids, chunk.finish_reason
    now = time.monotonic()
    first = progress.first_at is None
    request_metrics.on_tokens(progress, len(token_ids), now)
    if first:
        progress.first_at = now
    progress.last_at = now
    progress.sent += token_ids
    text = detok.push(token_ids, final=reason is not None) if detok else ""
    if progress.stop is not None:
        text, stopped = progress.stop.push(text, final=reason is not None)
        reason = FinishReason.STOP if stopped else reason
    if first and progress.pending_text:
        text = progress.pending_text + text
    response = pb.GenerateResponse(request_id=request_id, token_ids=token_ids, text=text, index=progress.index,
                                   finish_reason=FINISH_TO_PROTO[reason], logprobs=named_logprobs(tokenizer, chunk.logprobs))
    if first:
        response.prompt_logprobs.extend(named_logprobs(tokenizer, chunk.prompt_logprobs))
        if progress.echo and tokenizer is not None:
            response.prompt_text = tokenizer.decode(progress.prompt, skip_special_tokens=False)
    if reason is not None:
        pre = progress.prefill
        response.usage.CopyFrom(pb.Usage(prompt_tokens=len(progress.prompt),
                                         completion_tokens=len(progress.sent),
                                         cached_tokens=pre.num_cached_tokens if pre else progress.num_cached_tokens))
        response.timings.CopyFrom(pb.Timings(
            time_to_first_token_seconds=progress.first_at - progress.start,
            total_seconds=now - progress.start, num_attempts=progress.num_attempts,
            prefill_seconds=pre.prefill_seconds if pre else 0.0,
            kv_transfer_seconds=pre.kv_transfer_seconds if pre else 0.0))
    return response
