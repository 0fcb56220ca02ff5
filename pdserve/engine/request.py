"""A request's state inside an engine (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    prefill_only: bool = False  # a prefill node's request: done once its first token is sampled
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose KV is in this request's blocks
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    num_preemptions: int = 0
    scheduled_at: float | None = None  # time.monotonic() when first scheduled (prefilled here)
    first_token_at: float | None = None  # ... when its first token was sampled or admitted here
    block_hashes: list[bytes] = field(default_factory=list)  # of every full block of all tokens
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprobs of prompt tokens 1.. computed so far

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (hot path: decode)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability and the likeliest tokens' ((token_id, logprob), ...),
    likeliest first, from the model's raw logits."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestTimes(NamedTuple):
    """A finished request's phases here, in seconds (vLLM's request-level times); None where
    the phase was another node's: a prefill node decodes nothing, a decode node that was sent
    the KV neither queued nor prefilled the prompt."""

    queue: float | None  # arrival to first scheduled
    prefill: float | None  # first scheduled to first token
    decode: float | None  # first token to the end
    inference: float  # first scheduled (or admitted) to the end

    @classmethod
    def of(cls, request: "Request", now: float) -> "RequestTimes":
        first = request.first_token_at if request.first_token_at is not None else now
        if request.scheduled_at is None:  # admitted with KV from elsewhere
            return cls(None, None, now - first, now - first)
        decode = None if request.prefill_only else now - first
        return cls(request.scheduled_at - request.arrival_time, first - request.scheduled_at, decode,
                   now - request.scheduled_at)


@dataclass
class RequestOutput:
    """What one engine step produced for one request. `finished` with no `finish_reason`: a
    prefill-only request handed over to a decode node after its first token."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logits: object = None  # torch.Tensor [vocab_size], only with EngineConfig.keep_logits
    logprobs: list[TokenLogprobs] | None = None  # one per new token, where params.logprobs asks
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.. (first output, where asked)
    times: RequestTimes | None = None  # with the last output of a request that finished
