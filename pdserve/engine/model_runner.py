"""Runs one scheduled step on the model: builds the flat batch, runs it, samples.

The batch is flat (no padding): the new tokens of every scheduled request one after another,
`cu_seqlens_q` marking where each request's tokens start, and `slot_mapping` saying where
each token's K/V goes in the paged cache. On CUDA a decode step (one new token per request)
replays a captured graph instead (cuda_graphs.py); the step's one host sync is reading back
the sampled token ids. `launch` starts a decode step without that sync (async scheduling):
its tokens stay on the device as the next step's inputs and reach the host later.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from .attention import AttentionMetadata, get_attention_backend
from .config import EngineConfig, ModelConfig
from .cuda_graphs import DecodeGraphs
from .host_copy import to_device, to_host
from .kv_cache_sizing import kv_cache_bytes
from .kv_pool import allocate_kv_caches
from .model_source import ModelSource
from .request import TokenLogprobs
from .sampler import RowLogprobs, Sampler, prompt_token_logprobs, row_logprobs, token_logprobs
from .scheduler import SchedulerOutput
from .step_batch import StepBatch
from .weights import load_model

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, source: ModelSource, model_config: ModelConfig, config: EngineConfig,
                 max_model_len: int):
        self.device = resolve_device(config.device)
        self.use_device()
        if config.num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)  # nodes sharing a host's cores each take a part
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.keep_logits = config.keep_logits
        self.model = load_model(source, model_config, max_model_len, self.device, self.dtype, config.seed)
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.sampler = Sampler(self.device, config.seed, model_config.eos_token_ids)
        self.num_blocks = config.num_kv_blocks or max(1, kv_cache_bytes(self, config) // self.block_bytes())
        self.kv_caches = allocate_kv_caches(  # views of one pool (engine/kv_pool.py)
            model_config.num_layers, (self.block_size, model_config.num_kv_heads, model_config.head_dim),
            self.num_blocks, self.dtype, self.device, shared=config.kv_cache_shared)
        self.graphs = self._capture_graphs(config)

    def _capture_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        if self.device.type != "cuda" or config.enforce_eager or self.backend.name != "triton":
            return None  # the torch back-end plans each step on the host: not capturable
        max_batch = min(config.max_num_seqs, config.max_graph_batch_size)
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, max_batch, self.max_model_len,
                              self.block_size, self.device)
        graphs.capture()
        return graphs

    def use_device(self) -> None:
        """Makes the engine's GPU the calling thread's current device (Triton launches there)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def block_bytes(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_layers * self.block_size * cfg.kv_size * self.dtype.itemsize

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, block_tables: list[list[int]], layer_hook=None) -> StepResult:
        """Runs the step and waits for its sampled tokens. `layer_hook(i)` runs right after
        layer i (its K/V for this step are then in the cache)."""
        batch = self._gather(out, block_tables)
        hidden, rows = self._forward(batch, layer_hook)
        prompt_logprobs = self._prompt_logprobs(out, hidden)
        if not rows:
            return StepResult({}, prompt_logprobs=prompt_logprobs)
        requests = [s.request for s in out.scheduled if s.samples]
        logits, token_ids = self._sample(hidden[rows], requests)
        ids = [r.request_id for r in requests]
        kept = dict(zip(ids, logits.float().cpu())) if self.keep_logits else None
        logprobs = token_logprobs(logits, token_ids, [r.params for r in requests])
        return StepResult(dict(zip(ids, token_ids.tolist())), kept,
                          {i: lp for i, lp in zip(ids, logprobs) if lp is not None}, prompt_logprobs)

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """The logprobs of the prompt tokens this step's chunks predict, for requests that ask
        (the hidden state at position p predicts token p + 1), in slices to bound the logits."""
        result, offset = {}, 0
        for s in out.scheduled:
            request, start = s.request, s.request.num_computed_tokens
            k = request.params.prompt_logprobs
            end = min(start + s.num_new_tokens, request.num_prompt_tokens - 1)  # the last predicts output
            if k is not None and end > start:
                result[request.request_id] = self._next_token_logprobs(
                    hidden[offset:offset + end - start], request.prompt_token_ids[start + 1:end + 1], k)
            offset += s.num_new_tokens
        return result

    def _next_token_logprobs(self, hidden: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
        logprobs = []
        for a in range(0, len(targets), PROMPT_LOGPROBS_SLICE):
            b = a + PROMPT_LOGPROBS_SLICE
            logprobs += prompt_token_logprobs(self.model.compute_logits(hidden[a:b]), targets[a:b], k)
        return logprobs

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, block_tables: list[list[int]],
               after: "LaunchedStep | None" = None) -> "LaunchedStep":
        """Starts a decode step (one new token per request, every row sampled) and returns
        without waiting for it. `after`: the launched step just before this one, whose tokens
        are not on the host yet; each request is then one token further than the host knows,
        and its input is the token `after` sampled for it, read on the device."""
        num_pending = 1 if after is not None else 0
        batch = self._gather(out, block_tables, num_pending)
        input_ids = None if after is None else after.token_ids_of(out, self.device)
        hidden, rows = self._forward(batch, None, input_ids)
        requests = [s.request for s in out.scheduled]
        logits, token_ids = self._sample(hidden[rows], requests, num_pending, input_ids)
        return LaunchedStep(out, token_ids, row_logprobs(logits, token_ids, [r.params for r in requests]))

    def _sample(self, hidden: torch.Tensor, requests: list, num_pending: int = 0,
                pending_token_ids: torch.Tensor | None = None):
        """Logits [num_rows, vocab] in the model's dtype (greedy rows take their argmax as
        they are; the sampler widens the others) and the sampled ids [num_rows], on the device.
        `pending_token_ids` (on the device): each request's token the host does not know yet."""
        logits = self.model.compute_logits(hidden)
        num_sampled = [len(r.output_token_ids) + num_pending for r in requests]
        return logits, self.sampler(logits, [r.request_id for r in requests], [r.params for r in requests],
                                    num_sampled, requests, pending_token_ids)

    def _gather(self, out: SchedulerOutput, block_tables: list[list[int]], num_pending: int = 0) -> StepBatch:
        """The flat batch. `num_pending` (0 or 1): tokens each request has beyond what the host
        knows (sampled by a step in flight); its input ids are then left for the device."""
        batch = StepBatch(block_tables=block_tables)
        bs = self.block_size
        for s, table in zip(out.scheduled, block_tables):
            request = s.request
            start = request.num_computed_tokens + num_pending
            end = start + s.num_new_tokens
            if not num_pending:
                batch.input_ids += request.token_ids(start, end)
            batch.positions += range(start, end)
            batch.slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            batch.query_lens.append(s.num_new_tokens)
            batch.seq_lens.append(end)
            if s.samples or num_pending:
                batch.sample_rows.append(len(batch.positions) - 1)
        return batch

    def _forward(self, batch: StepBatch, layer_hook, input_ids: torch.Tensor | None = None):
        """Hidden states of the step and the rows to sample (ALL_ROWS: every row).
        `input_ids` (on the device) replaces `batch.input_ids` when given."""
        num_seqs, num_tokens = len(batch.seq_lens), len(batch.positions)
        if (layer_hook is None and self.graphs is not None and num_tokens == num_seqs
                and len(batch.sample_rows) == num_seqs and self.graphs.padded_size(num_seqs)):
            return self.graphs.run(batch, input_ids), ALL_ROWS
        dev = self.device
        if input_ids is None:
            input_ids = to_device(batch.input_ids, torch.int64, dev)
        hidden = self.model(input_ids, to_device(batch.positions, torch.int64, dev),
                            self.kv_caches, self.metadata(batch), self.backend, layer_hook)
        if len(batch.sample_rows) == num_tokens:
            return hidden, ALL_ROWS
        return hidden, batch.sample_rows

    def metadata(self, batch: StepBatch) -> AttentionMetadata:
        width = max(len(t) for t in batch.block_tables)
        padded = [t + [0] * (width - len(t)) for t in batch.block_tables]
        cu_seqlens_q = [0]
        for n in batch.query_lens:
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
        dev = self.device
        return AttentionMetadata(
            slot_mapping=to_device(batch.slot_mapping, torch.int64, dev),
            cu_seqlens_q=to_device(cu_seqlens_q, torch.int32, dev),
            seq_lens=to_device(batch.seq_lens, torch.int32, dev),
            block_tables=to_device(padded, torch.int32, dev),
            query_lens_cpu=batch.query_lens, seq_lens_cpu=batch.seq_lens,
            max_query_len=max(batch.query_lens), max_seq_len=max(batch.seq_lens))


class StepResult(NamedTuple):
    """A step's sampled token per request, and where asked, its logits (debug) and logprobs."""

    sampled: dict[str, int]
    logits: dict | None = None
    logprobs: dict[str, TokenLogprobs] | None = None
    prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None  # this step's chunks' prompt tokens


PROMPT_LOGPROBS_SLICE = 512  # prompt positions whose logits are computed at once
ALL_ROWS = slice(None)  # every row of the step samples (a decode step): a view, no gather
LOGPROB_TENSORS = ("chosen", "chosen_logprobs", "top_ids", "top_values")  # RowLogprobs' tensors


class LaunchedStep:
    """A decode step launched and not waited for: its sampled token ids are on the device
    (the next step's inputs) and on their way to pinned host memory, with the logprobs of the
    rows that ask for them."""

    def __init__(self, scheduled: SchedulerOutput, token_ids: torch.Tensor, logprobs: RowLogprobs | None = None):
        self.scheduled = scheduled
        self.token_ids = token_ids  # [num_seqs] int64 on the device
        self._logprobs = None if logprobs is None else logprobs._replace(
            **{name: to_host(getattr(logprobs, name))[0] for name in LOGPROB_TENSORS})
        self._host, self._ready = to_host(token_ids)  # copied last: ready means all are

    def sampled(self) -> dict[str, int]:
        """{request_id: sampled token id}; waits for this step only (not for later ones)."""
        self._ready()
        return dict(zip(self._request_ids(), self._host.tolist()))

    def logprobs(self) -> dict[str, TokenLogprobs] | None:
        """{request_id: its TokenLogprobs} of the rows that asked; call after `sampled`."""
        if self._logprobs is None:
            return None
        listed = self._logprobs.listed(len(self.scheduled.scheduled))
        return {i: lp for i, lp in zip(self._request_ids(), listed) if lp is not None}

    def _request_ids(self):
        return (s.request.request_id for s in self.scheduled.scheduled)

    def token_ids_of(self, out: SchedulerOutput, device: torch.device) -> torch.Tensor:
        """The token this step sampled for each request of `out` (a subset, in the same order)."""
        if len(out.scheduled) == len(self.scheduled.scheduled):  # the same requests: every row
            return self.token_ids
        row = {id(s.request): i for i, s in enumerate(self.scheduled.scheduled)}
        rows = [row[id(s.request)] for s in out.scheduled]
        return self.token_ids.index_select(0, to_device(rows, torch.int64, device))


def resolve_device(name: str) -> torch.device:
    """The device, with plain `cuda` pinned to the current GPU's index (set_device needs one)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]
