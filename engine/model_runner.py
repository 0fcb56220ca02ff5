"""Runs one scheduled step on the model: builds the flat batch, runs it, samples.

The batch is flat (no padding): the new tokens of every scheduled request one after another,
`cu_seqlens_q` marking where each request's tokens start, and `slot_mapping` saying where
each token's K/V goes in the paged cache.
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionMetadata, get_attention_backend
from .config import EngineConfig, ModelConfig
from .model_source import ModelSource
from .sampler import Sampler
from .scheduler import SchedulerOutput
from .weights import load_model

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, source: ModelSource, model_config: ModelConfig, config: EngineConfig,
                 max_model_len: int):
        self.device = torch.device(config.device)
        self.use_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model_config = model_config
        self.keep_logits = config.keep_logits
        self.model = load_model(source, model_config, max_model_len, self.device, self.dtype, config.seed)
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.sampler = Sampler(self.device, config.seed)
        self.num_blocks = config.num_kv_blocks or self._blocks_for(config.kv_cache_memory_gb)
        shape = (self.num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(model_config.num_layers)]

    def use_device(self) -> None:
        """Makes the engine's GPU the calling thread's current device (Triton launches there)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def block_bytes(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_layers * self.block_size * cfg.kv_size * self.dtype.itemsize

    def _blocks_for(self, memory_gb: float) -> int:
        return max(1, int(memory_gb * 2**30) // self.block_bytes())

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, block_tables: list[list[int]], layer_hook=None):
        """Returns ({request_id: sampled token id}, {request_id: logits} or None).
        `layer_hook(i)` runs right after layer i (its K/V for this step are then in the cache)."""
        input_ids, positions, meta, sample_rows = self._prepare(out, block_tables)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend, layer_hook)
        if not sample_rows:
            return {}, None
        rows, requests = zip(*sample_rows)
        logits = self.model.compute_logits(hidden[list(rows)]).float()
        ids = [r.request_id for r in requests]
        tokens = self.sampler(logits, ids, [r.params for r in requests],
                              [len(r.output_token_ids) for r in requests]).tolist()
        kept = dict(zip(ids, logits.cpu())) if self.keep_logits else None
        return dict(zip(ids, tokens)), kept

    def _prepare(self, out: SchedulerOutput, block_tables: list[list[int]]):
        input_ids, positions, slots, query_lens, seq_lens, sample_rows = [], [], [], [], [], []
        bs = self.block_size
        for s, table in zip(out.scheduled, block_tables):
            request = s.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + s.num_new_tokens
            input_ids += request.token_ids(start, end)
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                sample_rows.append((len(input_ids) - 1, request))
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu_seqlens_q = [0]
        for n in query_lens:
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        return (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta, sample_rows)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]
