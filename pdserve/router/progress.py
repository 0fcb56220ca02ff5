"""What one Generate call has streamed so far, across attempts, and the chunks an attempt
yields (torch-free)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.service.convert import sampling_to_proto

from .stop_strings import StopStringMatcher


@dataclass
class Progress:
    """What one Generate call has streamed so far, across attempts."""

    prompt: list[int]
    params: SamplingParams
    stop: StopStringMatcher | None = None
    start: float = field(default_factory=time.monotonic)
    sent: list[int] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    num_attempts: int = 0
    prefill: pb.PrefillResponse | None = None
    num_cached_tokens: int = 0  # prefilled on a decode node: what its prefix cache held

    index: int = 0  # which of the request's n completions
    echo: bool = False  # the first response carries the prompt's text
    pending_text: str = ""  # resumed from another router: text of `sent` the client has not seen (resume.py)
    trace: tuple = ()  # gRPC metadata that makes the node calls' spans children of the request's

    def copy_for(self, index: int) -> "Progress":
        """A fresh Progress for the request's completion `index` (a seeded request's copy i
        samples with seed + i, so the copies differ and the request stays reproducible)."""
        seed = self.params.seed
        params = self.params if seed is None else dataclasses.replace(self.params, seed=(seed + index) % 2**64)
        return Progress(self.prompt, params, StopStringMatcher(self.stop.stop) if self.stop else None, index=index,
                        echo=self.echo, trace=self.trace)

    def remaining_params(self) -> pb.SamplingParams:
        """The params of the next attempt, whose prompt ends with the tokens already sent: they
        count against max_tokens and min_tokens, and as output for penalties and seeds."""
        msg = sampling_to_proto(self.params)
        if self.params.max_tokens is not None:
            msg.max_tokens = self.params.max_tokens - len(self.sent)
        msg.min_tokens = max(0, self.params.min_tokens - len(self.sent))
        msg.num_resumed_tokens = len(self.sent)
        if self.sent:  # the prompt's logprobs went out with the first token
            msg.ClearField("prompt_logprobs")
        return msg


class Chunk(NamedTuple):
    """New tokens of an attempt, with a finish reason on the last, and their logprobs (protos,
    passed through) where the request asks for them."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: Sequence[pb.TokenLogprob] = ()
    prompt_logprobs: Sequence[pb.TokenLogprob] = ()  # the attempt's first chunk
