"""Continuous batching with chunked prefill under a token budget, preemption by recompute.

Each step gives every request a number of new tokens to compute (vLLM v1's unified view: a
decode is a request with one new token, a prefill chunk one with many). Running requests go
first, in arrival order; when blocks run out the last-arrived running request is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
(its tokens so far are kept, and its freed blocks are likely still in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .request import FinishReason, Request, RequestOutput, RequestStatus, RequestTimes


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last known token, so its logits are sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = ()):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: dict[str, Request] = {}  # decode node: request_id -> request awaiting its KV
        self.num_prompt_tokens_computed = 0  # prompt tokens prefilled (not taken from cache)
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache
        self.num_prefix_cache_queries = 0  # ... of the prompt tokens looked up there
        self.num_generated_tokens = 0  # tokens sampled here (not a first token another node sampled)
        self.num_preempted = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.num_preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # the last-arrived, never one scheduled already
                self._preempt(victim)
                out.num_preempted += 1
                self.num_preempted += 1
                if victim is request:
                    return budget
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # prompt logprobs need every prompt position computed here; a reservation for KV
            # computed elsewhere (`reserve`) still adopts the cached blocks
            hits = [] if request.params.prompt_logprobs is not None else self.kv.get_computed_blocks(request)
            num_cached = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.scheduled_at = time.monotonic()
                request.num_cached_tokens = num_cached
                self.num_cached_tokens += num_cached
                if request.params.prompt_logprobs is None:  # it was looked up
                    self.num_prefix_cache_queries += request.num_prompt_tokens
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def schedule_next_decode(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after `in_flight`, a step launched whose sampled tokens the host has
        not read yet (async scheduling): every running request one token further, its input
        the token `in_flight` samples for it (still on the device). None when that may not be
        the step `schedule` would make: a request joined or could join, or blocks run short
        (nothing is preempted here); or when nothing would run. A request whose in-flight
        token is its last by length is left out."""
        in_step = {id(s.request) for s in in_flight.scheduled}
        if any(id(r) not in in_step for r in self.running):
            return None
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        out = SchedulerOutput()
        for request in self.running:
            if self._ends_by_length(request, num_pending=1):
                continue  # its in-flight token is its last: the update of `in_flight` ends it
            if not self.kv.allocate_slots(request, 2):
                return None  # blocks allocated so far are the ones the next steps need anyway
            out.scheduled.append(ScheduledRequest(request, 1))
        return out if out.scheduled else None

    def _ends_by_length(self, request: Request, num_pending: int = 0) -> bool:
        """Whether the request is at its length limit once `num_pending` more tokens are in."""
        max_tokens = request.params.max_tokens
        return ((max_tokens is not None and len(request.output_token_ids) + num_pending >= max_tokens)
                or request.num_tokens + num_pending >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.prompt_logprobs = []  # its chunks run again
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], logits: dict | None = None,
               logprobs: dict | None = None) -> list[RequestOutput]:
        """Advances each scheduled request past its computed tokens, appends its sampled
        token, caches its newly full blocks, and finishes (and frees) what is done."""
        outputs = []
        for s in out.scheduled:
            request = s.request
            if request.is_finished:  # aborted, or ended by the step before, while this one ran
                continue
            self.num_prompt_tokens_computed += max(
                0, min(request.num_prompt_tokens - request.num_computed_tokens, s.num_new_tokens))
            request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(request)
            if request.request_id not in sampled:
                continue
            token_id = sampled[request.request_id]
            request.output_token_ids.append(token_id)
            self.num_generated_tokens += 1
            if request.first_token_at is None:
                request.first_token_at = time.monotonic()
            reason = self._finish_reason(request, token_id)
            handed_over = reason is None and request.prefill_only
            times = None
            if reason is not None or handed_over:
                self._finish(request, reason)
                times = RequestTimes.of(request, time.monotonic())
            outputs.append(RequestOutput(
                request.request_id, [token_id], reason is not None or handed_over, reason,
                request.num_prompt_tokens, request.num_cached_tokens,
                logits.get(request.request_id) if logits else None,
                [logprobs[request.request_id]] if logprobs and request.request_id in logprobs else None,
                self._take_prompt_logprobs(request), times))
        return outputs

    @staticmethod
    def _take_prompt_logprobs(request: Request) -> list | None:
        """With the first output, the prompt logprobs gathered over the prompt's chunks."""
        if request.params.prompt_logprobs is None or len(request.output_token_ids) != 1:
            return None
        logprobs, request.prompt_logprobs = request.prompt_logprobs, []
        return logprobs

    def _finish_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if self._ends_by_length(request):
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason | None) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.running.remove(request)
        self.kv.free(request)

    def reserve(self, request: Request) -> bool:
        """A decode node's reservation for a prompt whose KV another node computes: adopts the
        prompt's leading blocks found in the prefix cache (`request.num_cached_tokens`; their KV
        need not travel) and allocates the rest. False, changing nothing, when the pool cannot
        hold the prompt."""
        hits = self.kv.get_computed_blocks(request)
        num_cached = len(hits) * self.kv.block_size
        if not self.kv.allocate_slots(request, request.num_prompt_tokens - num_cached, hits):
            return False
        request.num_cached_tokens = num_cached
        self.num_cached_tokens += num_cached
        self.num_prefix_cache_queries += request.num_prompt_tokens
        self.reserved[request.request_id] = request
        return True

    def admit(self, request_id: str, first_token_id: int) -> RequestOutput | None:
        """A reserved request's KV has arrived: it joins the running batch with the first token
        the prefill node sampled (an output already streamed, so not repeated here). None if
        the reservation is gone; a finished output if that first token already ends it."""
        request = self.reserved.pop(request_id, None)
        if request is None:
            return None
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_token_ids.append(first_token_id)
        request.first_token_at = time.monotonic()  # its decode here starts now
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        reason = self._finish_reason(request, first_token_id)
        if reason is not None:
            self._finish(request, reason)
        times = RequestTimes.of(request, time.monotonic()) if reason is not None else None
        return RequestOutput(request_id, [], reason is not None, reason, request.num_prompt_tokens, times=times)

    def abort(self, request_id: str) -> Request | None:
        """Removes a request wherever it is (running, waiting or reserved) and frees its
        blocks; None if unknown."""
        reserved = self.reserved.pop(request_id, None)
        if reserved is not None:
            self.kv.free(reserved)
            reserved.status, reserved.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
            return reserved
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self.kv.free(request)
                    request.status = RequestStatus.FINISHED
                    request.finish_reason = FinishReason.ABORT
                    return request
        return None
