"""The in-process engine: add requests, `step()` them (schedule -> run -> update), or
`generate()` a list of prompts to completion. Prefill and decode nodes drive the step API.

Async scheduling (on by default): a decode step is launched without waiting for its tokens;
the next `step()` launches the one after it (fed those tokens on the device) before reading
them, so the GPU runs step N+1 while the host updates step N and schedules N+2. A step's
outputs therefore come from the `step()` call after the one that launched it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .config import EngineConfig, default_max_model_len
from .kv_cache_manager import KVCacheManager
from .model_runner import LaunchedStep, ModelRunner, StepResult
from .model_source import resolve_model
from .request import FinishReason, Request, RequestOutput, TokenLogprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .structured_output import Grammars

log = logging.getLogger(__name__)


class Reservation(NamedTuple):
    """A decode node's blocks for a prompt: all of them, in prompt order; the first
    `num_cached_blocks` hold the prompt's KV already (prefix cache), the rest wait for it."""

    block_ids: list[int]
    num_cached_blocks: int


@dataclass
class Completion:
    """A finished request, as `generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int
    text: str | None = None
    logits: list = field(default_factory=list)  # per step, only with keep_logits
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per token, where params.logprobs asks
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.., where asked


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = (config or EngineConfig()).replace(**overrides)
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = self.source.model_config()
        self.tokenizer = self.source.tokenizer()
        self.fingerprint = self.model_config.fingerprint(self.source.weights_id())
        max_len = default_max_model_len(self.model_config, config.max_model_len)
        self.runner = ModelRunner(self.source, self.model_config, config, max_len)
        self.grammars = (Grammars(self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids)
                         if self.tokenizer is not None else None)
        self.runner.sampler.processors.grammars = self.grammars
        num_blocks = self.runner.num_blocks
        # a request must always fit the whole cache, or preemption could never make room
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        if self.max_model_len < max_len:
            log.warning("max_model_len lowered from %d to %d: the KV cache holds %d blocks of %d",
                        max_len, self.max_model_len, num_blocks, config.block_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, self.fingerprint,
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._in_flight: LaunchedStep | None = None  # async scheduling: launched, tokens not yet read
        log.info("engine ready: %s, %d KV blocks of %d tokens, max_model_len %d, fingerprint %s",
                 config.model, num_blocks, config.block_size, self.max_model_len, self.fingerprint)

    # ---- step API -------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None,
                    prefill_only: bool = False) -> str:
        """Validates and queues a request; raises ValueError naming the bad field.
        `prefill_only` (prefill nodes): the request ends once its first token is sampled."""
        request = self._new_request(prompt_token_ids, params, request_id, cache_salt, prefill_only)
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def reserve(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                request_id: str | None = None, cache_salt: str | None = None) -> Reservation | None:
        """Decode nodes: validates a request whose prompt KV another node computes and
        allocates its blocks, the leading ones from the prefix cache where it holds them.
        None when the cache has no room."""
        request = self._new_request(prompt_token_ids, params, request_id, cache_salt)
        if not self.scheduler.reserve(request):
            return None
        self.requests[request.request_id] = request
        return Reservation(self.kv.block_ids(request.request_id), request.num_cached_tokens // self.config.block_size)

    def admit(self, request_id: str, first_token_id: int) -> RequestOutput | None:
        """Decode nodes: the reserved request's KV has arrived; it joins the running batch.
        ValueError for a first token that is no token of this model (the sender's word, checked
        here so a bad transfer fails its own request, never the step of all of them)."""
        vocab = self.model_config.vocab_size
        if not isinstance(first_token_id, int) or not 0 <= first_token_id < vocab:
            raise ValueError(f"first_token_id {first_token_id!r} is not a token id of this model (vocabulary of {vocab})")
        output = self.scheduler.admit(request_id, first_token_id)
        if output is not None and output.finished:
            self._forget(request_id)
        return output

    def _new_request(self, prompt_token_ids, params, request_id, cache_salt, prefill_only=False) -> Request:
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        self.validate_prompt(prompt_token_ids)
        if params.structured_output is not None:
            if self.grammars is None:
                raise ValueError("structured output needs the model's tokenizer; this model has none")
            self.grammars.check(params.structured_output)
        if params.num_resumed_tokens >= len(prompt_token_ids):
            raise ValueError(f"num_resumed_tokens: {params.num_resumed_tokens} of a {len(prompt_token_ids)}-token "
                             "prompt (the prompt must keep at least one token of its own)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return Request(request_id, list(prompt_token_ids), params, cache_salt, prefill_only)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: the prompt is empty")
        bad = next((t for t in prompt_token_ids
                    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: {bad!r} is not a token id of this model "
                             f"(vocabulary of {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt_token_ids: the prompt has {len(prompt_token_ids)} tokens, "
                             f"max_model_len is {self.max_model_len} (prompt + at least 1 new token)")

    def abort_request(self, request_id: str) -> bool:
        """Stops a request and frees its blocks; False if it is unknown or finished."""
        request = self.scheduler.abort(request_id)
        self._forget(request_id)
        return request is not None

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.runner.sampler.forget(request_id)

    def step(self, on_layer: Callable[[int, SchedulerOutput], None] | None = None) -> list[RequestOutput]:
        """One engine step: schedule -> run -> update. Returns what each request produced.
        `on_layer(i, scheduled)` runs after layer i of the step (prefill nodes push KV there)."""
        try:
            if self._in_flight is not None:
                return self._step_after_in_flight()
            return self._step(on_layer)
        except BaseException:
            self._in_flight = None  # a failed step: nothing more is read from it, nothing held
            self.kv.release_held()
            raise

    def _step(self, on_layer) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return []
        if on_layer is None and self._can_launch(scheduled):
            self._launch(scheduled)  # its outputs come with the next step
            return []
        hook = None if on_layer is None else (lambda i: on_layer(i, scheduled))
        result = self.runner.run(scheduled, self._block_tables(scheduled), hook)
        return self._update(scheduled, result)

    def _step_after_in_flight(self) -> list[RequestOutput]:
        """Launches the decode step after the one in flight (when the batch stays the same),
        then waits for the one in flight and updates from its tokens."""
        done, self._in_flight = self._in_flight, None
        following = self.scheduler.schedule_next_decode(done.scheduled)
        if following is not None:
            self._launch(following, after=done)  # the GPU runs it while the host waits and updates
        sampled = done.sampled()  # waits for `done` only
        # what was freed while `done` ran is written by no launched step any more (a step in
        # flight now holds only running requests); what `done` ends waits for `following`
        self.kv.release_held()
        if self._in_flight is not None:
            self.kv.hold_frees()
        return self._update(done.scheduled, StepResult(sampled, logprobs=done.logprobs()))

    def _can_launch(self, scheduled: SchedulerOutput) -> bool:
        """Whether this step may run without the host waiting: a decode step (each request one
        new token, sampled), async scheduling on, no logits to keep, and no request whose
        sampling reads its latest tokens on the host (bad words, a grammar). Logprobs come back
        with the tokens; penalties count the token a step is behind on the device. The steps
        launched after it keep its requests, so they qualify too."""
        return (self.config.async_scheduling and not self.config.keep_logits
                and all(s.num_new_tokens == 1 and s.samples and not s.request.params.needs_latest_tokens
                        for s in scheduled.scheduled))

    def _launch(self, scheduled: SchedulerOutput, after: LaunchedStep | None = None) -> None:
        self._in_flight = self.runner.launch(scheduled, self._block_tables(scheduled), after)
        self.kv.hold_frees()  # its requests' blocks may not be reused until it has run

    def _block_tables(self, scheduled: SchedulerOutput) -> list[list[int]]:
        return [self.kv.block_ids(s.request.request_id) for s in scheduled.scheduled]

    def _update(self, scheduled: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        for request_id, logprobs in (result.prompt_logprobs or {}).items():
            self.requests[request_id].prompt_logprobs += logprobs
        outputs = self.scheduler.update(scheduled, result.sampled, result.logits, result.logprobs)
        for output in outputs:
            if output.finished:
                self._forget(output.request_id)
        return outputs

    def has_unfinished(self) -> bool:
        """Whether a request waits or runs, or a launched step's outputs are still to come."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- offline API ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]] | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 cache_salt: str | None = None) -> list[Completion]:
        """Runs prompts (token id lists, or strings to tokenize) to completion, in order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(self._as_token_ids(p), sp, cache_salt=cache_salt)
               for p, sp in zip(prompts, params_list)]
        results = {i: Completion(i, self.requests[i].prompt_token_ids, [], FinishReason.ABORT, 0)
                   for i in ids}
        while self.has_unfinished():
            for output in self.step():
                result = results.get(output.request_id)
                if result is None:
                    continue
                result.token_ids += output.new_token_ids
                result.num_cached_tokens = output.num_cached_tokens
                if output.logits is not None:
                    result.logits.append(output.logits)
                result.logprobs += output.logprobs or []
                result.prompt_logprobs += output.prompt_logprobs or []
                if output.finished:
                    result.finish_reason = output.finish_reason
        if self.tokenizer is not None:
            for result in results.values():
                result.text = self.tokenizer.decode(result.token_ids)
        return [results[i] for i in ids]

    def chat(self, conversations: list[list[dict]], params=None) -> list[Completion]:
        """`generate` for conversations, each rendered with the model's chat template."""
        self._need_tokenizer()
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)

    def _as_token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer()
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"model {self.config.model!r} has no tokenizer: pass token ids")

    def stats(self) -> dict:
        return {
            "num_kv_blocks": self.kv.pool.num_blocks,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_reserved": len(self.scheduler.reserved),
            "num_prompt_tokens_computed": self.scheduler.num_prompt_tokens_computed,
            "num_cached_tokens": self.scheduler.num_cached_tokens,
            "num_prefix_cache_queries": self.scheduler.num_prefix_cache_queries,
            "num_generated_tokens": self.scheduler.num_generated_tokens,
            "num_preemptions": self.scheduler.num_preempted,
            "num_cache_events": len(self.kv.pool.events.changes),  # prefix-cache changes not yet drained
            "num_queued_prefill_tokens": sum(  # prompt tokens still to compute: a node's prefill load
                max(0, r.num_prompt_tokens - r.num_computed_tokens)
                for r in (*self.scheduler.waiting, *self.scheduler.running)),
        }


__all__ = ["Engine", "Completion", "SamplingParams", "EngineConfig"]
