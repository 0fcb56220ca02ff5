"""Attention over the paged KV cache: batch metadata, the torch (reference) back-end and the
Triton back-end (kernels/).

The cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
Token t of a sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`.
A back-end first writes the step's new K/V into their slots, then lets each new query token
attend to every earlier token of its sequence (cached prefix, earlier chunks, this chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve.kernels.store_kv import store_kv_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1: do not store
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    plan: dict = field(default_factory=dict)  # back-end state derived once per step, for all layers

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class _TorchPlan:
    """What the torch back-end derives from the metadata once per step: decodes go through one
    padded gather, each prefill chunk alone; masks are additive (0 or -inf)."""

    decode_rows: torch.Tensor | None  # [num_decodes] token rows of the one-token sequences
    decode_blocks: torch.Tensor | None  # [num_decodes * width] their block ids, padded
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, width * block_size]
    prefills: list  # (token rows, block ids, seq_len, mask [1, 1, group * q_len, seq_len])

    @classmethod
    def build(cls, meta: AttentionMetadata, block_size: int, group: int, dtype: torch.dtype) -> "_TorchPlan":
        device = meta.slot_mapping.device
        seqs = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
        plan = cls(None, None, None, [])
        if seqs:
            idx = torch.tensor(seqs, device=device)
            width = -(-max(meta.seq_lens_cpu[i] for i in seqs) // block_size)
            plan.decode_rows = meta.cu_seqlens_q[idx].long()
            plan.decode_blocks = meta.block_tables[idx, :width].long().reshape(-1)
            valid = torch.arange(width * block_size, device=device)[None, :] < meta.seq_lens[idx][:, None]
            plan.decode_mask = _additive(valid, dtype)[:, None, None, :]
        starts = [0]
        for q_len in meta.query_lens_cpu:  # host copy of cu_seqlens_q, without a device sync
            starts.append(starts[-1] + q_len)
        for i, q_len in enumerate(meta.query_lens_cpu):
            if q_len > 1:
                seq_len = meta.seq_lens_cpu[i]
                blocks = meta.block_tables[i, :-(-seq_len // block_size)].long()
                # query j sits at position seq_len - q_len + j and sees keys 0 .. that position
                causal = torch.ones(q_len, seq_len, dtype=torch.bool, device=device).tril(seq_len - q_len)
                mask = _additive(causal, dtype).repeat(group, 1)[None, None]
                plan.prefills.append((slice(starts[i], starts[i] + q_len), blocks, seq_len, mask))
        return plan


class TorchAttentionBackend:
    """Reference back-end in plain torch: decodes batched through one padded gather, each
    prefill chunk on its own. Correct on any device; the Triton back-end is for speed."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        block_size, group = k_cache.shape[1], q.shape[1] // k.shape[1]
        plan = meta.plan.get(self.name)
        if plan is None:
            plan = meta.plan[self.name] = _TorchPlan.build(meta, block_size, group, q.dtype)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            num_decodes = plan.decode_rows.shape[0]
            keys = _gather(k_cache, plan.decode_blocks, num_decodes)
            values = _gather(v_cache, plan.decode_blocks, num_decodes)
            o = _sdpa(q[plan.decode_rows][:, None], keys, values, plan.decode_mask, scale)
            out[plan.decode_rows] = o[:, 0]
        for rows, blocks, seq_len, mask in plan.prefills:
            keys = _gather(k_cache, blocks, 1)[:, :seq_len]
            values = _gather(v_cache, blocks, 1)[:, :seq_len]
            out[rows] = _sdpa(q[rows][None], keys, values, mask, scale)[0]
        return out


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Flat block ids (num_seqs tables of equal width) -> [num_seqs, width * block_size, kv_heads, dim]."""
    rows = cache.flatten(1).index_select(0, blocks)
    return rows.view(num_seqs, -1, *cache.shape[2:])


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """GQA attention without repeating K/V: the query heads of each KV head are folded into
    the query axis. q: [b, q_len, heads, dim]; k, v: [b, kv_len, kv_heads, dim]; mask:
    additive, [b or 1, 1, group * q_len or 1, kv_len]. Returns [b, q_len, heads, dim]."""
    b, q_len, num_heads, dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    # [b, q_len, kv_heads, group, dim] -> [b, kv_heads, group * q_len, dim]
    q = q.view(b, q_len, num_kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * q_len, dim)
    k = k.transpose(1, 2).contiguous()  # [b, kv_heads, kv_len, dim]: contiguous is faster on CPU
    v = v.transpose(1, 2).contiguous()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.view(b, num_kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4).reshape(b, q_len, num_heads, dim)


class TritonAttentionBackend:
    """The Triton kernels: store_kv, then paged decode attention when every sequence has one
    new token, else varlen prefill attention over the paged cache (which also serves the
    one-token sequences of a mixed batch)."""

    name = "triton"

    def __init__(self):
        from pdserve.kernels.paged_decode_attention import paged_decode_attention
        from pdserve.kernels.prefill_attention import prefill_attention
        from pdserve.kernels.store_kv import store_kv
        self._store_kv, self._decode, self._prefill = store_kv, paged_decode_attention, prefill_attention

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len)
        return self._prefill(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale,
                             meta.max_query_len)


def get_attention_backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {name!r}")
